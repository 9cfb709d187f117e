// The backup thread (seed 001 FIG. 15, claims 44 and 62): walks the copy map, reads pending blocks
// from the device, takes saved originals out of the container, and hands batches to the sink — with
// several large batches in flight, one native call per batch, no per-block promises.
// Order of work, per batch:
//   random-access sink (image file, device): 1. blocks a writer waits on (they jump the queue: the
//     copier reads them from the device, the write goes on without using container space);
//     2. container contents (eagerly: every slot drained is a writer that will not wait);
//     3. the walk, ascending.
//   sequential sink (tar, stream): the walk only, strictly ascending; a saved block is emitted from the
//     container when the walk reaches it, and a block being saved is waited for.
// A block claimed for reading is locked until its read lands, so a write never overtakes it; a block
// is read only when pending and not locked, so the copier never reads a block a writer is saving.
import { RateLimit } from '../copy/rate-limit';
import { BufferPool } from '../device/buffer-pool';
import type { Device } from '../device/device';
import { type ErrorPolicy, UnreadableBlockError } from '../copy/block-copier';
import type { BackupSink } from '../sink/sink';
import type { Bitset } from '../util/bitset';
import type { Container, SlotAllocator } from './container';
import type { CopyMap, Task } from './copy-map';
import { type BusyPace, WRITER_PACES } from './writer-priority';

export interface CopierProgress {
  bytesDone: number;
  bytesTotal: number;
  blocksDone: number;
  badBlocks: number;
}

export interface CopierOptions {
  /** Bytes per second at most (--max-rate); unlimited when absent. */
  maxRate?: number;
  map: CopyMap;
  device: Device;
  container: Container;
  slots: SlotAllocator;
  blockSize: number;
  volumeSize: number;
  /** The blocks the backup holds (refined used map, container blocks excluded). */
  used: Bitset;
  sink: BackupSink;
  /** The sink accepts batches at any offset (image, device); false: strictly ascending (tar). */
  randomAccess: boolean;
  onError: ErrorPolicy;
  /** Bytes per batch buffer (default 4 MiB). */
  batchBytes?: number;
  /** Batches in flight (default 4). */
  depth?: number;
  /**
   * True while writers are active: the copier then uses `busy` batches, so a client's 4K write (and
   * its copy-before-write read) does not queue behind megabytes of backup I/O.
   */
  writersActive?: () => boolean;
  /**
   * Batch bytes and batches in flight while writers are active (writer-priority.ts); depth 0: no
   * reads. A function is asked before every batch (the automatic priority, auto-pace.ts).
   */
  busy?: BusyPace | (() => BusyPace);
  /** A fatal error from elsewhere (container failure, bad original with policy abort, cancel). */
  failed(): Error | undefined;
  onProgress?(p: CopierProgress): void;
}

export interface CopierResult {
  bytes: number;
  blocks: number;
  badBlocks: number[];
}

interface Batch {
  buffer: ArrayBuffer;
  /** Sink triplets [volumeOffset, length, bufferOffset]. */
  sink: Float64Array;
  nSink: number;
  dev: Float64Array;
  nDev: number;
  contSlots: Int32Array;
  contOffs: Float64Array;
  nCont: number;
  zeros: number[];
  tasks: Task[];
  /** Buffer bytes used. */
  used: number;
  room: number;
  /** Blocks the walk may still read from the device (fewer than `room` while writers write). */
  devRoom: number;
  /** Blocks that may still come out of the container. */
  contRoom: number;
}

const MAX_URGENT = 4096;
/**
 * Saved originals per batch while writers write: their image writes are scattered small writes that
 * a client's write may queue behind, yet the container must drain as fast as writers fill it (at
 * QD16 writers make ~13K writes/s during a backup here, bench/online-writers, about half of them
 * saving an original).
 */
const BUSY_DRAIN_BLOCKS = 64;

export class Copier {
  private readonly bs: number;
  private readonly total: number;
  private cursor = 0;
  private readonly urgent: Array<[number, number]> = [];
  private readonly badBlocks: number[] = [];
  private bytesDone = 0;
  private blocksDone = 0;
  readonly bytesTotal: number;
  /** Blocks read because a writer waited on them. */
  urgentBlocks = 0;

  constructor(private readonly o: CopierOptions) {
    this.bs = o.blockSize;
    this.total = o.map.totalBlocks;
    const n = o.used.count();
    this.bytesTotal = Math.min(n * this.bs, o.volumeSize);
  }

  get progress(): CopierProgress {
    return { bytesDone: this.bytesDone, bytesTotal: this.bytesTotal, blocksDone: this.blocksDone, badBlocks: this.badBlocks.length };
  }

  /** A writer waits on [first, end): read those blocks next (random-access sinks only). */
  urge(first: number, end: number): void {
    if (!this.o.randomAccess) return;
    if (this.urgent.length >= MAX_URGENT) return;
    this.urgent.push([first, end]);
    this.o.map.changed.notify();
  }

  async run(): Promise<CopierResult> {
    const busyPace = this.o.busy ?? WRITER_PACES.normal;
    const paceNow = typeof busyPace === 'function' ? busyPace : () => busyPace;
    const { map } = this.o;
    const batchBytes = Math.max(this.bs, Math.floor((this.o.batchBytes ?? 4 << 20) / this.bs) * this.bs);
    const depth = this.o.depth ?? 4;
    const pool = new BufferPool(batchBytes, depth + 1);
    const capBlocks = batchBytes / this.bs;
    const inflight: Array<Promise<Batch>> = [];
    const track = (p: Promise<Batch>) => { p.catch(() => {}); inflight.push(p); };
    const rate = new RateLimit(this.o.maxRate);
    const deliver = async (b: Batch) => {
      try {
        if (b.nSink > 0) {
          sortTriplets(b.sink, b.nSink);
          await this.o.sink.write({ buffer: b.buffer, segments: b.sink.subarray(0, b.nSink * 3) });
          for (let i = 0; i < b.nSink; i++) {
            this.bytesDone += b.sink[i * 3 + 1]!;
            this.blocksDone += Math.ceil(b.sink[i * 3 + 1]! / this.bs);
          }
          this.o.onProgress?.(this.progress);
        }
      } finally {
        pool.release(b.buffer);
      }
      await rate.pace(this.bytesDone);
    };
    try {
      for (;;) {
        this.check();
        // While writers write: the pace of --writer-priority; otherwise full speed.
        const pace = this.o.writersActive?.() ? paceNow() : undefined;
        // Busy depth 0 (LIVESNAP_BUSY_DEPTH=0, a measuring aid for bench/online-frontier): no new reads
        // while writers write, so what remains is copy-before-write's own cost. A writer that waits
        // on the copier (urged blocks, a container half full) is still served.
        if (pace && pace.depth <= 0 && this.urgent.length === 0 && this.o.slots.fill < 0.5) {
          if (inflight.length) { await deliver(await inflight.shift()!); continue; }
          await new Promise((r) => setTimeout(r, 2));
          continue;
        }
        if (pace && inflight.length >= Math.max(1, pace.depth)) { await deliver(await inflight.shift()!); continue; }
        const buffer = await pool.acquire();
        // While writers write only the device reads shrink: draining the container costs the disk
        // small writes only, and a container drained slowly fills and makes writers wait.
        const b = pace
          ? newBatch(buffer, capBlocks, Math.min(capBlocks, Math.max(1, Math.floor(pace.batchBytes / this.bs))), Math.min(capBlocks, BUSY_DRAIN_BLOCKS))
          : newBatch(buffer, capBlocks, capBlocks, capBlocks);
        const blockedOn = this.fill(b);
        if (b.nSink === 0) {
          pool.release(buffer);
          if (inflight.length) { await deliver(await inflight.shift()!); continue; }
          if (this.finished()) break;
          if (blockedOn !== undefined) await map.waitFor(blockedOn, blockedOn + 1);
          else await map.changed.wait();
          continue;
        }
        track(this.read(b));
        if (inflight.length >= depth) await deliver(await inflight.shift()!);
      }
      while (inflight.length) await deliver(await inflight.shift()!);
    } catch (e) {
      // Reads still in flight must land (and unlock their blocks) before their buffers go.
      await Promise.allSettled(inflight);
      throw e;
    }
    return { bytes: this.bytesDone, blocks: this.blocksDone, badBlocks: this.badBlocks.slice().sort((a, b) => a - b) };
  }

  private check(): void {
    const f = this.o.failed();
    if (f) throw f;
  }

  private finished(): boolean {
    const { map } = this.o;
    return this.cursor >= this.total && map.savedCount === 0 && map.countTasks('save') === 0 && nextPendingFrom(map, 0) >= this.total;
  }

  /** Fills a batch; returns a block the walk must wait for when nothing could be added. */
  private fill(b: Batch): number | undefined {
    if (this.o.randomAccess) {
      this.fillUrgent(b);
      this.fillFromContainer(b);
    }
    return this.fillWalk(b);
  }

  private fillUrgent(b: Batch): void {
    const { map } = this.o;
    while (b.room > 0 && this.urgent.length > 0) {
      const r = this.urgent[0]!;
      let s = r[0];
      while (s < r[1] && b.room > 0) {
        if (map.pending.get(s) && !map.busy.get(s) && this.o.used.get(s)) {
          const t = map.claimRun(s, Math.min(r[1], s + b.room), 'copy')!;
          this.addDeviceRun(b, t);
          this.urgentBlocks += t.end - t.start;
          s = t.end;
        } else {
          s++;
        }
      }
      if (s >= r[1]) this.urgent.shift();
      else r[0] = s;
    }
  }

  private fillFromContainer(b: Batch): void {
    const { map } = this.o;
    if (map.savedCount === 0 || b.room === 0) return;
    const take: number[] = [];
    for (const blk of map.slots.keys()) {
      if (take.length >= Math.min(b.room, b.contRoom)) break;
      take.push(blk);
    }
    take.sort((x, y) => x - y);
    for (const blk of take) this.addSaved(b, blk);
  }

  private fillWalk(b: Batch): number | undefined {
    const { map, used } = this.o;
    const random = this.o.randomAccess;
    while (b.room > 0 && b.devRoom > 0 && this.cursor < this.total) {
      const blk = map.nextWork(this.cursor, this.total);
      if (blk >= this.total) { this.cursor = this.total; break; }
      this.cursor = blk;
      const pending = map.pending.get(blk);
      if (map.busy.get(blk)) {
        // A save in flight lands in the container and is drained from there (random access);
        // an ordered walk must wait for it, as for a view read of a pending block.
        if (random && !pending) { this.cursor = blk + 1; continue; }
        return b.nSink === 0 ? blk : undefined;
      }
      if (map.saved.get(blk)) { this.addSaved(b, blk); this.cursor = blk + 1; continue; }
      if (!used.get(blk)) { map.pending.clear(blk); this.cursor = blk + 1; continue; }
      let limit = Math.min(this.total, blk + Math.min(b.room, b.devRoom));
      // Stop the run at the first block the backup does not hold (used is a subset check per run).
      let e = blk + 1;
      while (e < limit && used.get(e)) e++;
      limit = e;
      const t = map.claimRun(blk, limit, 'copy')!;
      this.addDeviceRun(b, t);
      this.cursor = t.end;
    }
    return undefined;
  }

  private blockLength(blk: number): number {
    return Math.min(this.bs, this.o.volumeSize - blk * this.bs);
  }

  private addDeviceRun(b: Batch, t: Task): void {
    const off = t.start * this.bs;
    const len = Math.min(t.end * this.bs, this.o.volumeSize) - off;
    b.dev[b.nDev * 3] = off;
    b.dev[b.nDev * 3 + 1] = Math.ceil(len / 512) * 512;
    b.dev[b.nDev * 3 + 2] = b.used;
    b.nDev++;
    this.addSink(b, off, len, b.used);
    b.tasks.push(t);
    b.used += (t.end - t.start) * this.bs;
    b.room -= t.end - t.start;
    b.devRoom -= t.end - t.start;
  }

  /** Takes a saved block out of the map now; its slot is given back once the data is in the batch. */
  private addSaved(b: Batch, blk: number): void {
    const slot = this.o.map.unsave(blk)!;
    if (!this.o.used.get(blk)) {
      // Saved before the used map was known, and free at the instant: not part of the backup.
      // A writer may be waiting for a free slot: wake it (the batch may end up empty, and then no
      // delivery would ever notify).
      this.o.slots.give(slot);
      this.o.map.changed.notify();
      return;
    }
    const len = this.blockLength(blk);
    if (slot < 0) {
      this.badBlocks.push(blk);
      b.zeros.push(b.used, this.bs);
    } else {
      b.contSlots[b.nCont] = slot;
      b.contOffs[b.nCont] = b.used;
      b.nCont++;
    }
    this.addSink(b, blk * this.bs, len, b.used);
    b.used += this.bs;
    b.room--;
  }

  private addSink(b: Batch, off: number, len: number, at: number): void {
    // Coalesce with the previous segment when contiguous on both sides.
    if (b.nSink > 0) {
      const j = (b.nSink - 1) * 3;
      if (b.sink[j]! + b.sink[j + 1]! === off && b.sink[j + 2]! + b.sink[j + 1]! === at && b.sink[j + 1]! % this.bs === 0) {
        b.sink[j + 1]! += len;
        return;
      }
    }
    b.sink[b.nSink * 3] = off;
    b.sink[b.nSink * 3 + 1] = len;
    b.sink[b.nSink * 3 + 2] = at;
    b.nSink++;
  }

  private async read(b: Batch): Promise<Batch> {
    const { map, device } = this.o;
    try {
      const [res] = await Promise.all([
        b.nDev > 0 ? device.readBatch(b.buffer, b.dev.subarray(0, b.nDev * 3)) : Promise.resolve(new Int32Array(0)),
        b.nCont > 0 ? this.o.container.load(b.contSlots, b.buffer, b.contOffs, b.nCont) : Promise.resolve(),
      ]);
      for (let i = 0; i < b.zeros.length; i += 2) new Uint8Array(b.buffer, b.zeros[i]!, b.zeros[i + 1]!).fill(0);
      for (let i = 0; i < b.nDev; i++) {
        const off = b.dev[i * 3]!, len = b.dev[i * 3 + 1]!, at = b.dev[i * 3 + 2]!;
        const got = res[i]!;
        if (got === len) continue;
        if (got >= 0 && off + got >= this.o.volumeSize) continue;
        await this.rereadByBlock(b.buffer, off, len, at);
      }
    } finally {
      for (const t of b.tasks) map.unlock(t);
      for (let i = 0; i < b.nCont; i++) this.o.slots.give(b.contSlots[i]!);
      if (b.nCont > 0 || b.tasks.length > 0) map.changed.notify();
    }
    return b;
  }

  private async rereadByBlock(buffer: ArrayBuffer, off: number, len: number, at: number): Promise<void> {
    const bs = this.bs;
    const n = Math.ceil(len / bs);
    const segs = new Float64Array(n * 3);
    for (let j = 0; j < n; j++) {
      const o = off + j * bs;
      segs[j * 3] = o;
      segs[j * 3 + 1] = Math.min(bs, off + len - o);
      segs[j * 3 + 2] = at + j * bs;
    }
    const res = await this.o.device.readBatch(buffer, segs);
    for (let j = 0; j < n; j++) {
      const want = segs[j * 3 + 1]!;
      const got = res[j]!;
      if (got === want || (got >= 0 && segs[j * 3]! + got >= this.o.volumeSize)) continue;
      const block = Math.floor(segs[j * 3]! / bs);
      const errno = got < 0 ? -got : 5;
      if (this.o.onError === 'abort') throw new UnreadableBlockError(block, segs[j * 3]!, this.o.device.path, errno);
      this.badBlocks.push(block);
      new Uint8Array(buffer, segs[j * 3 + 2]!, want).fill(0);
    }
  }
}

function newBatch(buffer: ArrayBuffer, capBlocks: number, devBlocks: number, contBlocks: number): Batch {
  return {
    buffer,
    sink: new Float64Array(capBlocks * 3),
    nSink: 0,
    dev: new Float64Array(capBlocks * 3),
    nDev: 0,
    contSlots: new Int32Array(capBlocks),
    contOffs: new Float64Array(capBlocks),
    nCont: 0,
    zeros: [],
    tasks: [],
    used: 0,
    room: capBlocks,
    devRoom: devBlocks,
    contRoom: contBlocks,
  };
}

function nextPendingFrom(map: CopyMap, from: number): number {
  const p = map.pending.bytes;
  for (let k = from >>> 3; k < p.length; k++) {
    if (p[k] !== 0) return Math.max(from, k * 8);
  }
  return map.totalBlocks;
}

/** Sorts [offset, length, bufOffset] triplets by offset (batches from several sources). */
function sortTriplets(s: Float64Array, n: number): void {
  let sorted = true;
  for (let i = 1; i < n; i++) if (s[i * 3]! < s[(i - 1) * 3]!) { sorted = false; break; }
  if (sorted) return;
  const idx = Array.from({ length: n }, (_, i) => i).sort((a, b) => s[a * 3]! - s[b * 3]!);
  const copy = s.slice(0, n * 3);
  idx.forEach((from, to) => {
    s[to * 3] = copy[from * 3]!;
    s[to * 3 + 1] = copy[from * 3 + 1]!;
    s[to * 3 + 2] = copy[from * 3 + 2]!;
  });
}
