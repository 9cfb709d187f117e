// An NbdBackend over a Device (O_DIRECT, or the page cache with serve --cache writeback). Memory
// comes from a few large aligned arenas (never one allocation per request), registered with the
// process's I/O ring, where each request completes on its own; without a ring, requests queued in the
// same tick go to the addon as one readBatch / writeBatch per arena. Unaligned writes are read-modify-write on the aligned span,
// serialised against every other write touching the same aligned blocks.
import * as fs from 'node:fs';
import { config } from '../config';
import type { Device } from '../device/device';
import { giveAligned, takeAligned } from '../device/memory';
import { ioRing, type IoRing } from '../device/io-ring';
import type { AllocationExtent } from './allocation';
import type { NbdBackend, NbdBuffer } from './backend';
import { NbdError } from './backend';
import { NBD_EIO } from './protocol';

const PAGE = 4096;
/** Data ranges looked up per BLOCK_STATUS request (the client asks again from where an answer ends). */
const MAX_EXTENT_RANGES = 4096;
/**
 * With cache=writeback a small write is a copy into the page cache: done in place it costs a few
 * microseconds, while io_uring hands it to a kernel worker thread (ext4 and xfs cannot do buffered
 * writes without blocking), a wake-up each way: 4 KiB writes at QD16 ran ~45K/s that way and
 * ~65-75K/s in place (measured by hand with bench/nbd-serve.js and fio's nbd engine, the jobs of
 * bench/nbd-datapath). The price: while the kernel throttles a writer for too
 * many dirty pages, the whole event loop waits (as every writer of that device would anyway).
 */
const PAGE_CACHE_SYNC_WRITE = 64 * 1024;
/**
 * LIVESNAP_CLIENT_IO_PRIORITY=realtime issues clients' reads and writes in the real-time I/O class
 * (like copy-before-write reads always are). Writers keep more of their rate during a backup, but
 * mq-deadline dispatches no best-effort request while a real-time one is in flight, so the backup
 * itself may barely move under steady writes (README, "Online backups"). Off by default: a backup must finish.
 */
const URGENT_CLIENT_IO = config().clientIoPriority === 'realtime';

/** One aligned ArrayBuffer carved into page-aligned extents (first fit, coalescing free list). */
class Arena {
  readonly buf: Buffer;
  /** Free extents [start, length], sorted by start. */
  private free: Array<[number, number]>;
  used = 0;
  /** Index of this memory in the I/O ring, or -1 (no ring: the batch API is used). */
  ringIndex = -1;
  constructor(readonly ab: ArrayBuffer) {
    this.buf = Buffer.from(ab);
    this.free = [[0, ab.byteLength]];
  }
  alloc(len: number): number {
    for (let i = 0; i < this.free.length; i++) {
      const f = this.free[i]!;
      if (f[1] >= len) {
        const at = f[0];
        if (f[1] === len) this.free.splice(i, 1);
        else { f[0] += len; f[1] -= len; }
        this.used += len;
        return at;
      }
    }
    return -1;
  }
  release(at: number, len: number): void {
    this.used -= len;
    const fl = this.free;
    let i = 0;
    while (i < fl.length && fl[i]![0] < at) i++;
    const prev = i > 0 ? fl[i - 1]! : undefined;
    const next = i < fl.length ? fl[i]! : undefined;
    if (prev && prev[0] + prev[1] === at) {
      prev[1] += len;
      if (next && at + len === next[0]) { prev[1] += next[1]; fl.splice(i, 1); }
    } else if (next && at + len === next[0]) {
      next[0] = at; next[1] += len;
    } else {
      fl.splice(i, 0, [at, len]);
    }
  }
}

class Slot implements NbdBuffer {
  data: Buffer;
  private live = true;
  constructor(readonly mem: SlabMemory, readonly arena: Arena, readonly at: number, readonly len: number, rel: number, length: number) {
    this.data = arena.buf.subarray(at + rel, at + rel + length);
  }
  release(): void {
    if (!this.live) return;
    this.live = false;
    this.mem.free(this);
  }
}

/** Aligned memory for the data path: arenas of `arenaBytes`, added on demand up to `maxBytes`. */
class SlabMemory {
  readonly arenas: Arena[] = [];
  readonly byBuffer = new WeakMap<ArrayBuffer, Arena>();
  private total = 0;
  private readonly waiters: Array<{ len: number; resolve: (s: Slot) => void }> = [];
  constructor(private readonly arenaBytes: number, private readonly maxBytes: number, private readonly ring: IoRing | undefined) {}

  tryAlloc(length: number, rel = 0, dataLen = length): Slot | undefined {
    const len = Math.ceil(length / PAGE) * PAGE;
    if (this.waiters.length === 0) {
      for (const a of this.arenas) {
        const at = a.alloc(len);
        if (at >= 0) return new Slot(this, a, at, len, rel, dataLen);
      }
    }
    if (this.total + Math.max(len, this.arenaBytes) <= this.maxBytes || this.arenas.length === 0) {
      const size = Math.max(len, this.arenaBytes);
      const a = new Arena(takeAligned(size));
      if (this.ring) a.ringIndex = this.ring.register(a.ab);
      this.arenas.push(a);
      this.byBuffer.set(a.ab, a);
      this.total += size;
      const at = a.alloc(len);
      return new Slot(this, a, at, len, rel, dataLen);
    }
    return undefined;
  }

  alloc(length: number, rel = 0, dataLen = length): Promise<Slot> | Slot {
    const s = this.tryAlloc(length, rel, dataLen);
    if (s) return s;
    const len = Math.ceil(length / PAGE) * PAGE;
    return new Promise<Slot>((resolve) => this.waiters.push({ len, resolve: (x) => { x.data = x.arena.buf.subarray(x.at + rel, x.at + rel + dataLen); resolve(x); } }));
  }

  free(s: Slot): void {
    s.arena.release(s.at, s.len);
    while (this.waiters.length) {
      const w = this.waiters[0]!;
      let got: Slot | undefined;
      for (const a of this.arenas) {
        const at = a.alloc(w.len);
        if (at >= 0) { got = new Slot(this, a, at, w.len, 0, w.len); break; }
      }
      if (!got) break;
      this.waiters.shift();
      w.resolve(got);
    }
  }

  get bytes(): number { return this.total; }

  /** Gives the arenas back to the ring (the backend is done; nothing may be in flight). */
  dispose(): void {
    for (const a of this.arenas) {
      if (this.ring && a.ringIndex >= 0) { this.ring.unregister(a.ringIndex); a.ringIndex = -1; }
      giveAligned(a.ab);
    }
    this.arenas.length = 0;
  }
}

interface IoOp {
  write: boolean;
  arena: Arena;
  /** Device offset / length (aligned) and position in the arena. */
  devOff: number;
  len: number;
  bufOff: number;
  resolve: (n: number) => void;
  reject: (e: unknown) => void;
}

interface LockEntry { start: number; end: number; waiters?: Array<() => void> }

export interface DeviceBackendOptions {
  readOnly?: boolean;
  description?: string;
  /** Largest read/write accepted (default 32 MiB). */
  maxBlockSize?: number;
  /** Aligned memory per arena (default 32 MiB) and in all (default 256 MiB). */
  arenaBytes?: number;
  maxMemoryBytes?: number;
}

export class DeviceBackend implements NbdBackend {
  readonly size: number;
  readonly minBlockSize: number;
  readonly preferredBlockSize = PAGE;
  readonly maxBlockSize: number;
  readonly readOnly: boolean;
  readonly multiConn = true;
  readonly description?: string;
  private readonly align: number;
  private readonly mem: SlabMemory;
  private queue: IoOp[] = [];
  private scheduled = false;
  private readonly flushQueue = () => this.submit();
  private readonly alignedWrites = new Set<LockEntry>();
  private readonly rmwLocks: LockEntry[] = [];
  private syncing: Promise<void> | undefined;
  private syncNext: Promise<void> | undefined;
  private readonly counters = { batches: 0, batchedOps: 0, rmw: 0, syncs: 0 };
  /** The shared I/O ring when there is one: each request completes on its own (no batch wait). */
  private readonly ring: IoRing | undefined;

  constructor(readonly device: Device, opts: DeviceBackendOptions = {}) {
    this.align = device.direct ? device.alignment : 512;
    this.minBlockSize = this.align;
    // An O_DIRECT block past the end of a file whose size is not a multiple of the sector size
    // cannot be rewritten without growing the file: the export stops at the last whole sector.
    this.size = Math.floor(device.size / this.align) * this.align;
    this.readOnly = !!opts.readOnly || !device.writable;
    this.description = opts.description;
    this.maxBlockSize = opts.maxBlockSize ?? 32 * 1024 * 1024;
    const arena = opts.arenaBytes ?? 32 * 1024 * 1024;
    this.ring = ioRing();
    this.mem = new SlabMemory(Math.max(arena, this.maxBlockSize + PAGE), Math.max(opts.maxMemoryBytes ?? 256 * 1024 * 1024, arena), this.ring);
  }

  stats(): Record<string, number> {
    return { ...this.counters, memoryBytes: this.mem.bytes };
  }

  /** Releases the memory registered with the I/O ring; call once nothing is in flight. */
  dispose(): void {
    this.mem.dispose();
  }

  // ---- batching -------------------------------------------------------------------------------

  private enqueue(op: IoOp): void {
    this.queue.push(op);
    if (!this.scheduled) { this.scheduled = true; process.nextTick(this.flushQueue); }
  }

  private submit(): void {
    this.scheduled = false;
    const q = this.queue;
    this.queue = [];
    // Group by (arena, direction): one native call each.
    while (q.length) {
      const first = q[0]!;
      const group: IoOp[] = [];
      const rest: IoOp[] = [];
      for (const op of q) (op.arena === first.arena && op.write === first.write ? group : rest).push(op);
      q.length = 0; q.push(...rest);
      const segs = new Float64Array(group.length * 3);
      for (let i = 0; i < group.length; i++) {
        const op = group[i]!;
        segs[i * 3] = op.devOff; segs[i * 3 + 1] = op.len; segs[i * 3 + 2] = op.bufOff;
      }
      this.counters.batches++;
      this.counters.batchedOps += group.length;
      const p = first.write ? this.device.writeBatch(first.arena.ab, segs) : this.device.readBatch(first.arena.ab, segs);
      p.then((res) => {
        for (let i = 0; i < group.length; i++) group[i]!.resolve(res[i]!);
      }, (e) => { for (const op of group) op.reject(e); });
    }
  }

  private io(write: boolean, arena: Arena, devOff: number, len: number, bufOff: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const done = (n: number) => {
        if (n === len) return resolve();
        if (n >= 0 && !write) {
          // Short read at the end of a file: the rest reads as zeroes.
          arena.buf.fill(0, bufOff + n, bufOff + len);
          return resolve();
        }
        reject(ioError(write, devOff, len, n));
      };
      if (write && !this.device.direct && len <= PAGE_CACHE_SYNC_WRITE) {
        done(pwriteAll(this.device.fd, arena.buf, bufOff, len, devOff));
        return;
      }
      if (this.ring && arena.ringIndex >= 0) {
        if (write) this.ring.write(this.device.fd, arena.ringIndex, devOff, len, bufOff, done, URGENT_CLIENT_IO);
        else this.ring.read(this.device.fd, arena.ringIndex, devOff, len, bufOff, done, URGENT_CLIENT_IO);
        return;
      }
      this.enqueue({ write, arena, devOff, len, bufOff, reject, resolve: done });
    });
  }

  // ---- reads ------------------------------------------------------------------------------------

  async read(offset: number, length: number): Promise<NbdBuffer> {
    const a = this.align;
    const s = offset - (offset % a);
    const e = Math.ceil((offset + length) / a) * a;
    let slot = this.mem.alloc(e - s, offset - s, length);
    if (slot instanceof Promise) slot = await slot;
    try {
      await this.io(false, slot.arena, s, e - s, slot.at);
    } catch (err) {
      slot.release();
      throw err;
    }
    return slot;
  }

  // ---- writes -----------------------------------------------------------------------------------

  allocPayload(length: number): NbdBuffer | undefined {
    return this.mem.tryAlloc(length);
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    const a = this.align;
    const length = data.length;
    if (offset % a === 0 && length % a === 0) {
      const arena = this.mem.byBuffer.get(data.buffer as ArrayBuffer);
      const pending = this.lockAligned(offset, offset + length);
      const lock = pending instanceof Promise ? await pending : pending;
      try {
        if (arena && data.byteOffset % PAGE === 0) {
          await this.io(true, arena, offset, length, data.byteOffset);
        } else {
          let slot = this.mem.alloc(length);
          if (slot instanceof Promise) slot = await slot;
          try {
            data.copy(slot.data, 0);
            await this.io(true, slot.arena, offset, length, slot.at);
          } finally {
            slot.release();
          }
        }
      } finally {
        this.unlock(this.alignedWrites, lock);
      }
    } else {
      await this.readModifyWrite(offset, data);
    }
    if (fua) await this.flush();
  }

  /** Registers an aligned change; waits first for overlapping read-modify-writes. */
  private lockAligned(start: number, end: number): LockEntry | Promise<LockEntry> {
    const blocking = this.rmwLocks.length ? overlapping(this.rmwLocks, start, end) : undefined;
    if (!blocking) {
      const entry: LockEntry = { start, end };
      this.alignedWrites.add(entry);
      return entry;
    }
    return waitFor(blocking).then(() => this.lockAligned(start, end));
  }

  private unlock(set: Set<LockEntry> | LockEntry[], entry: LockEntry): void {
    if (set instanceof Set) set.delete(entry);
    else { const i = set.indexOf(entry); if (i >= 0) set.splice(i, 1); }
    if (entry.waiters) for (const w of entry.waiters) w();
  }

  /** Unaligned write: read the edge blocks of the aligned span, patch, write the span. */
  private async readModifyWrite(offset: number, data: Buffer): Promise<void> {
    this.counters.rmw++;
    const a = this.align;
    const s = offset - (offset % a);
    const e = Math.ceil((offset + data.length) / a) * a;
    const entry: LockEntry = { start: s, end: e };
    const earlier = this.rmwLocks.filter((l) => l.start < e && s < l.end);
    this.rmwLocks.push(entry);
    try {
      for (const l of earlier) await waitFor(l);
      for (;;) {
        const busy = overlapping(this.alignedWrites, s, e);
        if (!busy) break;
        await waitFor(busy);
      }
      let slot = this.mem.alloc(e - s);
      if (slot instanceof Promise) slot = await slot;
      try {
        const reads: Promise<void>[] = [];
        if (offset !== s) reads.push(this.io(false, slot.arena, s, a, slot.at));
        const lastBlock = e - a;
        if (offset + data.length !== e && (lastBlock !== s || offset === s)) reads.push(this.io(false, slot.arena, lastBlock, a, slot.at + (lastBlock - s)));
        await Promise.all(reads);
        data.copy(slot.arena.buf, slot.at + (offset - s));
        await this.io(true, slot.arena, s, e - s, slot.at);
      } finally {
        slot.release();
      }
    } finally {
      this.unlock(this.rmwLocks, entry);
    }
  }

  // ---- allocation ------------------------------------------------------------------------------

  /**
   * base:allocation from the backing file: its holes are holes that read as zeroes, the rest data.
   * A block device reports all data (discarded blocks need not read back as zeroes).
   */
  async extents(offset: number, length: number): Promise<AllocationExtent[]> {
    const found = await this.device.dataRanges(offset, length, MAX_EXTENT_RANGES);
    if (!found) return [{ length, hole: false, zero: false }];
    const out: AllocationExtent[] = [];
    let pos = offset;
    for (const [s, e] of found.ranges) {
      if (s > pos) out.push({ length: s - pos, hole: true, zero: true });
      if (e > s) out.push({ length: e - s, hole: false, zero: false });
      pos = e;
    }
    // A full answer accounts for the whole range: what follows the last data range is a hole.
    if (found.complete && pos < offset + length) out.push({ length: offset + length - pos, hole: true, zero: true });
    if (out.length === 0) out.push({ length, hole: false, zero: false });
    return out;
  }

  // ---- flush, trim, zero ------------------------------------------------------------------------

  /** fdatasync, coalesced: callers arriving while one runs share the next one. */
  flush(): Promise<void> {
    if (!this.syncing) {
      this.counters.syncs++;
      const p = this.device.sync().finally(() => { if (this.syncing === p) this.syncing = undefined; });
      this.syncing = p;
      return p;
    }
    if (!this.syncNext) {
      const cur = this.syncing;
      this.syncNext = cur.catch(() => {}).then(() => {
        this.syncNext = undefined;
        return this.flush();
      });
    }
    return this.syncNext;
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    // Advisory: only whole aligned blocks are discarded.
    const a = this.align;
    const s = Math.ceil(offset / a) * a;
    const e = Math.floor((offset + length) / a) * a;
    if (e > s) await this.rangeOp(s, e, false);
    if (fua) await this.flush();
  }

  async writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    const a = this.align;
    const s = Math.ceil(offset / a) * a;
    const e = Math.floor((offset + length) / a) * a;
    const parts: Promise<void>[] = [];
    if (e > s) {
      // A hole reads back as zeroes in a file; on a block device discard does not promise that.
      parts.push(this.rangeOp(s, e, !(this.device.isBlockDevice === false && !noHole)));
      if (offset < s) parts.push(this.readModifyWrite(offset, Buffer.alloc(s - offset)));
      if (offset + length > e) parts.push(this.readModifyWrite(e, Buffer.alloc(offset + length - e)));
    } else {
      parts.push(this.readModifyWrite(offset, Buffer.alloc(length)));
    }
    await Promise.all(parts);
    if (fua) await this.flush();
  }

  private async rangeOp(s: number, e: number, zero: boolean): Promise<void> {
    const pending = this.lockAligned(s, e);
    const lock = pending instanceof Promise ? await pending : pending;
    try {
      await (zero ? this.device.zeroRange(s, e - s) : this.device.discard(s, e - s));
    } finally {
      this.unlock(this.alignedWrites, lock);
    }
  }
}

/** pwrite until done: bytes written, or -errno. */
function pwriteAll(fd: number, buf: Buffer, at: number, len: number, pos: number): number {
  let done = 0;
  try {
    while (done < len) {
      const n = fs.writeSync(fd, buf, at + done, len - done, pos + done);
      if (n <= 0) break;
      done += n;
    }
  } catch (e) {
    if (done > 0) return done;
    const errno = (e as NodeJS.ErrnoException).errno;
    return typeof errno === 'number' ? -Math.abs(errno) : -5;
  }
  return done;
}

function overlapping(set: Iterable<LockEntry>, start: number, end: number): LockEntry | undefined {
  for (const l of set) if (l.start < end && start < l.end) return l;
  return undefined;
}

function waitFor(l: LockEntry): Promise<void> {
  return new Promise((r) => (l.waiters ??= []).push(r));
}

function ioError(write: boolean, off: number, len: number, n: number): Error {
  if (n < 0) {
    const code = errnoName(-n);
    const e = new Error(`${write ? 'write' : 'read'} of ${len} bytes at ${off} failed: ${code}`) as NodeJS.ErrnoException;
    e.code = code;
    e.errno = n;
    return e;
  }
  return new NbdError(`short ${write ? 'write' : 'read'} of ${n}/${len} bytes at ${off}`, NBD_EIO);
}

function errnoName(n: number): string {
  const names: Record<number, string> = { 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 13: 'EACCES', 22: 'EINVAL', 27: 'EFBIG', 28: 'ENOSPC', 30: 'EROFS', 95: 'EOPNOTSUPP', 122: 'EDQUOT' };
  return names[n] ?? `errno ${n}`;
}
