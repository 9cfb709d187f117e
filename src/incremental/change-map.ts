// The export's change map (seed 003): which 64 KiB regions were written since the last backup, kept
// crash-proof like md's write-intent bitmap, in two levels. A write is acknowledged only once the
// 4 MiB intent region it falls in is marked on disk (pwrite of its page + fdatasync, batched: every
// write that arrives while a flush runs joins the next one); its 64 KiB regions are marked in
// memory and written out lazily, every second. An intent bit is cleared once the fine map written
// out covers every write to its region. After kill -9 or power loss the map is the fine map on disk
// plus every region of every intent still set: a superset of the changes, never less. Steady state
// costs no flush at all; a first write costs one per 4 MiB (64x fewer than one per region). Each
// epoch this daemon saw whole is also kept at 4 KiB in memory: a backup then sends only those blocks.
//
// File "changes.map" in the export's state directory:
//   [0, 4K) and [4K, 8K)   two header copies, written alternately (sealed JSON, highest valid
//                          generation wins, so a torn header write leaves the other one)
//   [8K, 8K+I)             the intent bitmap, one bit per 4 MiB
//   then slot 0 and slot 1 (S bytes each): fine bitmaps, one bit per 64 KiB region, LSB first
// The header names the active slot (changes since `base`, the last backup that completed) and,
// while a backup runs, the next slot (changes since that backup's instant). Epochs (see epochs in
// change-filter.ts): writes mark `marking`; arming marks both, then only the next one.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { sealed, unsealed } from '../device/sealed-json';
import { Bitset } from '../util/bitset';

export const CHANGE_MAP_FILE = 'changes.map';
/** QEMU's default dirty-bitmap granularity: 2 MiB of map per TiB, a 4K random write costs 64 KiB of delta. */
export const GRANULARITY = 64 << 10;
const FORMAT = 'livesnap-changes';
const VERSION = 2;
/** Fine regions per intent region (4 MiB). */
const INTENT_SPAN = 64;
/** How often the fine map is written out (and intents cleared). */
export const PERSIST_INTERVAL_MS = 1000;
/** ChangeMap.open's default intent lifetime after its region's last write (the daemon passes config's). */
const DEFAULT_INTENT_IDLE_MS = 30_000;
const INTENT = 2;
/** The in-memory map's block (the snapshot's block size), and the most memory it may take per epoch. */
const SUB_BLOCK = 4096;
const SUB_MEMORY = 64 << 20;
const HEADER = 4096;
const PAGE = 4096;
const PAGE_BITS = PAGE * 8;
/** A backing file modified later than this after the daemon's last sign of life: written while unserved. */
export const ALIVE_INTERVAL_MS = 2000;
const ALIVE_SLACK_MS = 3000;

/** What the map's header says (sealed JSON). */
export interface ChangeHeader {
  format: typeof FORMAT;
  version: number;
  generation: number;
  /** The device's identity (dev:ino or major:minor) and size: another device's map is not used. */
  device: string;
  volumeSize: number;
  granularity: number;
  /** The last backup that completed: the active slot holds the changes since its instant. */
  base: string | null;
  active: 0 | 1;
  /** A backup is running: its id, and the slot that holds the changes since its instant. */
  pending: { id: string; slot: 0 | 1 } | null;
  /** 'serving' while a daemon has it open; 'clean' after a clean stop, with the device's stamp then. */
  state: 'serving' | 'clean';
  stamp: DeviceStamp | null;
  /** performance-free wall clock (ms) of the daemon's last heartbeat while serving. */
  aliveAt: number;
  /** Why the next backup must be full (the map was reset because it could not be trusted). */
  fullBecause: string | null;
}

/** What a device looked like when its daemon stopped: any difference means someone else wrote it. */
export interface DeviceStamp {
  /** "mtimeNs:size" of the file behind the volume (the file, or a loop device's backing file). */
  fileMtimeNs: string | null;
  /** XXH3-128 of the first and last MiB of the volume (superblocks and their backups live there). */
  sample: string;
}

export interface MapProblem { why: string }

function sealHeader(h: ChangeHeader): Buffer {
  const body = JSON.stringify(sealed(h));
  if (body.length + 1 > HEADER) throw new Error('change map header too large');
  const b = Buffer.alloc(HEADER);
  b.write(body + '\n');
  return b;
}

function unsealHeader(b: Buffer): ChangeHeader | undefined {
  const end = b.indexOf(0x0a);
  if (end < 0) return undefined;
  let j: Record<string, unknown>;
  try { j = JSON.parse(b.subarray(0, end).toString('utf8')) as Record<string, unknown>; } catch { return undefined; }
  const rest = unsealed(j);
  if (!rest || rest.format !== FORMAT || rest.version !== VERSION) return undefined;
  const h = rest as unknown as ChangeHeader;
  const slot = (v: unknown) => v === 0 || v === 1;
  const count = (v: unknown) => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
  if (!count(h.generation) || !count(h.volumeSize) || h.granularity !== GRANULARITY || !slot(h.active) || typeof h.device !== 'string') return undefined;
  if (h.pending !== null && (typeof h.pending !== 'object' || !slot(h.pending.slot) || h.pending.slot === h.active || typeof h.pending.id !== 'string')) return undefined;
  if (h.state !== 'serving' && h.state !== 'clean') return undefined;
  return h;
}

/** One slot's bitmap in memory: only pages with a bit set are held. */
/** One bitmap in memory: only pages with a bit set are held. */
class SlotBits {
  readonly pages = new Map<number, Uint8Array>();
  get(r: number): boolean {
    const p = this.pages.get(Math.floor(r / PAGE_BITS));
    if (!p) return false;
    const o = r % PAGE_BITS;
    return (p[Math.floor(o / 8)]! & (1 << (o % 8))) !== 0; // 32-bit-ok: bit and byte offsets inside one 4 KiB page
  }
  /** Sets bit r; returns its page number if the bit was clear. */
  set(r: number): number | undefined {
    const k = Math.floor(r / PAGE_BITS);
    let p = this.pages.get(k);
    if (!p) { p = new Uint8Array(PAGE); this.pages.set(k, p); }
    const o = r % PAGE_BITS;
    const byte = Math.floor(o / 8), bit = 1 << (o % 8); // 32-bit-ok: bit and byte offsets inside one 4 KiB page
    if (p[byte]! & bit) return undefined; // 32-bit-ok: bit and byte offsets inside one 4 KiB page
    p[byte]! |= bit; // 32-bit-ok: bit and byte offsets inside one 4 KiB page
    return k;
  }
  /** Sets bits [first, end); returns the pages where a bit was clear. Whole bytes at a time (a trim of TiB). */
  setRange(first: number, end: number): number[] {
    const touched: number[] = [];
    for (let k = Math.floor(first / PAGE_BITS); k * PAGE_BITS < end; k++) {
      const a = Math.max(first, k * PAGE_BITS) - k * PAGE_BITS, b = Math.min(end, (k + 1) * PAGE_BITS) - k * PAGE_BITS;
      let p = this.pages.get(k);
      if (!p) { p = new Uint8Array(PAGE); this.pages.set(k, p); }
      let changed = false;
      let i = a;
      for (; i < b && i % 8 !== 0; i++) { const m = 1 << (i % 8); if (!(p[Math.floor(i / 8)]! & m)) { p[Math.floor(i / 8)]! |= m; changed = true; } } // 32-bit-ok: bit and byte offsets inside one 4 KiB page
      for (; i + 8 <= b; i += 8) { if (p[i / 8] !== 0xff) { p[i / 8] = 0xff; changed = true; } }
      for (; i < b; i++) { const m = 1 << (i % 8); if (!(p[Math.floor(i / 8)]! & m)) { p[Math.floor(i / 8)]! |= m; changed = true; } } // 32-bit-ok: bit and byte offsets inside one 4 KiB page
      if (changed) touched.push(k);
    }
    return touched;
  }
  /** Clears bit r (the page stays, zeroed or not, so that it is written out). */
  clear(r: number): number {
    const k = Math.floor(r / PAGE_BITS);
    const p = this.pages.get(k);
    const o = r % PAGE_BITS;
    if (p) p[Math.floor(o / 8)]! &= ~(1 << (o % 8)); // 32-bit-ok: bit offset inside a page
    return k;
  }
  orWith(other: SlotBits): number[] {
    const changed: number[] = [];
    for (const [k, src] of other.pages) {
      let p = this.pages.get(k);
      if (!p) { p = new Uint8Array(PAGE); this.pages.set(k, p); }
      let diff = false;
      for (let i = 0; i < PAGE; i++) { const v = p[i]! | src[i]!; if (v !== p[i]) { p[i] = v; diff = true; } } // 32-bit-ok: bit and byte offsets inside one 4 KiB page
      if (diff) changed.push(k);
    }
    return changed;
  }
  /** Every bit i of this set as bits [i*span, (i+1)*span) of `into` (an intent as its fine regions). */
  expandInto(into: SlotBits, span: number, limit: number): number[] {
    const touched = new Set<number>();
    for (const r of this.bits()) for (let f = r * span; f < Math.min(limit, (r + 1) * span); f++) { into.set(f); touched.add(Math.floor(f / PAGE_BITS)); }
    return [...touched];
  }
  *bits(): Generator<number> {
    for (const [k, page] of this.pages) {
      for (let i = 0; i < PAGE; i++) {
        const v = page[i]!;
        if (v === 0) continue;
        for (let b = 0; b < 8; b++) if (v & (1 << b)) yield k * PAGE_BITS + i * 8 + b; // 32-bit-ok: bit and byte offsets inside one 4 KiB page
      }
    }
  }
  count(): number {
    let n = 0;
    for (const _ of this.bits()) n++;
    return n;
  }
}

/** A durable flush of dirty pages: what it covers, and when it is on disk. */
interface Flush { pages: Set<number>; done: Promise<void>; resolve: () => void; reject: (e: Error) => void; copies?: Map<number, Buffer> }

/** Page keys: area (slot 0, slot 1, intent) x 1e12 + page number. */
const key = (area: number, page: number) => area * 1e12 + page;

export class ChangeMap {
  private readonly slots: [SlotBits, SlotBits] = [new SlotBits(), new SlotBits()];
  /**
   * The same epochs at 4 KiB, in memory only (never on disk: the 64 KiB map is what survives a
   * crash): what a backup sends when the daemon saw the whole epoch. Undefined = not known (the
   * epoch began before this daemon, or it grew past SUB_MEMORY): the 64 KiB regions are sent.
   */
  private readonly sub: [Bitset | undefined, Bitset | undefined] = [undefined, undefined];
  private readonly intent = new SlotBits();
  /** The last write (sequence number) to enter each intent region that is set. */
  private readonly lastWrite = new Map<number, number>();
  private writeSeq = 0;
  /** The intent pages as last made durable: a write under a set intent that is on disk waits for nothing. */
  private readonly intentOnDisk = new SlotBits();
  /**
   * writeSeq when each recent write-out began: an intent is cleared only once no write entered its
   * region for `intentIdleMs`. Clearing sooner made writers on a busy disk wait for the map: a
   * region idle for one second (a 4K random writer slowed by a backup) was cleared and its next
   * write waited for an fdatasync behind the copier's I/O, which slowed the writer further.
   */
  private readonly persistStarts: Array<{ at: number; seq: number }> = [];
  /** Fine pages changed in memory and not yet written out. */
  private lazy = new Set<number>();
  /** Slots every write marks now (normally the active one; both while a backup arms). */
  private marking: Array<0 | 1>;
  private queued: Flush | undefined;
  private flushing: Flush | undefined;
  private failed: Error | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private persister: NodeJS.Timeout | undefined;
  private persisting: Promise<void> | undefined;
  /** closeNow() was called: nothing more is written (the fd is closed once writes in flight end). */
  private closed = false;
  /** Flushes done, intent regions marked, fine regions marked (for status and the benchmark). */
  flushes = 0;
  intentsMarked = 0;
  regionsMarked = 0;

  private constructor(
    readonly file: string,
    private readonly fd: number,
    private header: ChangeHeader,
    readonly regions: number,
    private readonly slotBytes: number,
    private readonly intentBytes: number,
    /** Why the map was reset when opened (it could not be trusted), if it was. */
    readonly resetBecause: string | undefined,
    private readonly intentIdleMs: number,
  ) {
    this.marking = [header.active];
  }

  get base(): string | null { return this.header.base; }
  get fullBecause(): string | null { return this.header.fullBecause; }
  get pending(): ChangeHeader['pending'] { return this.header.pending; }

  /**
   * Opens (or creates) the map of the volume `device` (its identity key) of `volumeSize` bytes, and
   * decides whether it can be trusted; an untrusted map is reset, every region counted as changed,
   * and the reason kept for the next backup to report. `stampNow` gives the device's stamp now.
   */
  static async open(stateDir: string, device: string, volumeSize: number, stampNow: () => Promise<DeviceStamp>, stateIsNew: boolean, intentIdleMs = DEFAULT_INTENT_IDLE_MS): Promise<ChangeMap> {
    const file = path.join(stateDir, CHANGE_MAP_FILE);
    const regions = Math.ceil(volumeSize / GRANULARITY);
    const slotBytes = Math.max(PAGE, Math.ceil(regions / PAGE_BITS) * PAGE);
    const intentBytes = Math.max(PAGE, Math.ceil(Math.ceil(regions / INTENT_SPAN) / PAGE_BITS) * PAGE);
    const expectLen = 2 * HEADER + intentBytes + 2 * slotBytes;
    const existed = fs.existsSync(file);
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    try {
      let why: string | undefined;
      let header: ChangeHeader | undefined;
      if (!existed) {
        why = stateIsNew ? 'this is the first backup of the export (no change map yet)' : `the change map ${file} was missing`;
      } else {
        const st = fs.fstatSync(fd);
        const hb = Buffer.alloc(2 * HEADER);
        fs.readSync(fd, hb, 0, 2 * HEADER, 0);
        const a = unsealHeader(hb.subarray(0, HEADER)), b = unsealHeader(hb.subarray(HEADER));
        header = a && b ? (a.generation > b.generation ? a : b) : a ?? b;
        if (!header) why = 'the change map is torn or overwritten (no valid header)';
        else if (header.device !== device) why = `the change map belongs to another device (${header.device}, this one is ${device})`;
        else if (header.volumeSize !== volumeSize) why = `the volume changed size (${header.volumeSize} bytes when the map was written, ${volumeSize} now)`;
        else if (st.size < expectLen) why = `the change map is truncated (${st.size} of ${expectLen} bytes)`;
        else if (header.state === 'clean') {
          const now = await stampNow();
          if (!header.stamp || now.sample !== header.stamp.sample || now.fileMtimeNs !== header.stamp.fileMtimeNs) why = 'the device was written while no livesnap daemon served it (its stamp changed since the last clean stop)';
        } else {
          // The daemon died while serving: the map holds every write it acknowledged. Its backing
          // file being modified well after its last heartbeat means someone wrote it since.
          const now = await stampNow();
          if (now.fileMtimeNs !== null && Number(BigInt(now.fileMtimeNs.split(':')[0]!) / 1_000_000n) > header.aliveAt + ALIVE_INTERVAL_MS + ALIVE_SLACK_MS) {
            why = 'the device was written after its daemon died, while no livesnap daemon served it (its file was modified after the daemon\'s last heartbeat)';
          }
        }
      }
      const fresh: ChangeHeader = {
        format: FORMAT, version: VERSION, generation: (header?.generation ?? 0) + 1, device, volumeSize, granularity: GRANULARITY,
        base: null, active: 0, pending: null, state: 'serving', stamp: null, aliveAt: Date.now(), fullBecause: why ?? null,
      };
      const map = new ChangeMap(file, fd, why ? fresh : { ...header!, state: 'serving', stamp: null, aliveAt: Date.now() }, regions, slotBytes, intentBytes, why, intentIdleMs);
      if (why) {
        fs.ftruncateSync(fd, 0);
        fs.ftruncateSync(fd, expectLen);
      } else {
        map.load();
        const active = map.header.active;
        const touched = new Set<number>();
        if (map.header.pending) {
          // A backup was running when the daemon died: it never completed, so its epoch merges back.
          for (const k of map.slots[active].orWith(map.slots[map.header.pending.slot])) touched.add(k);
        }
        // Intents still set: every region under them may have changed (their fine bits may not have been written out).
        for (const k of map.intent.expandInto(map.slots[active], INTENT_SPAN, regions)) touched.add(k);
        map.writePagesSync(active, [...touched]);
        fs.fdatasyncSync(fd);
        if (map.header.pending || map.intent.pages.size) {
          const ip = [...map.intent.pages.keys()];
          map.intent.pages.clear();
          map.writeIntentSync(ip);
        }
        map.header.pending = null;
      }
      fs.fdatasyncSync(fd);
      map.writeHeaderSync();
      map.heartbeat = setInterval(() => { map.header.aliveAt = Date.now(); void map.writeHeader().catch(() => {}); }, ALIVE_INTERVAL_MS);
      map.heartbeat.unref();
      map.persister = setInterval(() => { if (!map.persisting) void map.settle('idle').catch(() => {}); }, PERSIST_INTERVAL_MS);
      map.persister.unref();
      return map;
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  private load(): void {
    const buf = Buffer.alloc(1 << 20);
    const area = (into: SlotBits, base: number, bytes: number) => {
      for (let off = 0; off < bytes; off += buf.length) {
        const n = fs.readSync(this.fd, buf, 0, Math.min(buf.length, bytes - off), base + off);
        for (let p = 0; p + PAGE <= n; p += PAGE) {
          const page = buf.subarray(p, p + PAGE);
          if (page.some((v) => v !== 0)) into.pages.set((off + p) / PAGE, Uint8Array.from(page));
        }
      }
    };
    area(this.intent, 2 * HEADER, this.intentBytes);
    for (const s of [0, 1] as const) area(this.slots[s], this.pageOffset(s, 0), this.slotBytes);
  }

  private pageOffset(area: number, page: number): number {
    if (area === INTENT) return 2 * HEADER + page * PAGE;
    return 2 * HEADER + this.intentBytes + area * this.slotBytes + page * PAGE;
  }

  private bitsOf(area: number): SlotBits {
    return area === INTENT ? this.intent : this.slots[area as 0 | 1];
  }

  private writePagesSync(slot: 0 | 1, pages: number[]): void {
    if (this.closed) throw new Error(`the change map ${this.file} is closed`);
    for (const k of pages) fs.writeSync(this.fd, this.slots[slot].pages.get(k) ?? new Uint8Array(PAGE), 0, PAGE, this.pageOffset(slot, k));
  }

  private writeIntentSync(pages: number[]): void {
    if (this.closed) throw new Error(`the change map ${this.file} is closed`);
    for (const k of pages) fs.writeSync(this.fd, this.intent.pages.get(k) ?? new Uint8Array(PAGE), 0, PAGE, this.pageOffset(INTENT, k));
    fs.fdatasyncSync(this.fd);
  }

  private writeHeaderSync(): void {
    if (this.closed) throw new Error(`the change map ${this.file} is closed`);
    this.header.generation++;
    fs.writeSync(this.fd, sealHeader(this.header), 0, HEADER, (this.header.generation % 2) * HEADER);
    fs.fdatasyncSync(this.fd);
  }

  private headerChain: Promise<void> = Promise.resolve();
  /** Header writes go one at a time, each durable before the next. */
  private writeHeader(): Promise<void> {
    const run = async () => {
      if (this.closed) return;
      this.header.generation++;
      const b = sealHeader(this.header);
      const gen = this.header.generation;
      await new Promise<void>((res, rej) => fs.write(this.fd, b, 0, HEADER, (gen % 2) * HEADER, (e) => (e ? rej(e) : res())));
      await new Promise<void>((res, rej) => fs.fdatasync(this.fd, (e) => (e ? rej(e) : res())));
    };
    this.headerChain = this.headerChain.then(run, run);
    return this.headerChain;
  }

  /**
   * Marks [offset, offset+length): undefined when its intent regions are already on disk (the write
   * goes on at once), else the promise of the flush that puts them there.
   */
  mark(offset: number, length: number): Promise<void> | undefined {
    if (this.failed) return Promise.reject(this.failed);
    const first = Math.floor(offset / GRANULARITY);
    const end = Math.ceil((offset + Math.max(length, 1)) / GRANULARITY);
    const seq = ++this.writeSeq;
    for (const s of this.marking) {
      const bits = this.slots[s];
      if (end - first > 64) {
        for (const page of bits.setRange(first, end)) this.lazy.add(key(s, page));
        this.regionsMarked += end - first;
      } else {
        for (let r = first; r < end; r++) {
          const page = bits.set(r);
          if (page !== undefined) { this.regionsMarked++; this.lazy.add(key(s, page)); }
        }
      }
      const sub = this.sub[s];
      if (sub) {
        sub.setRange(Math.floor(offset / SUB_BLOCK), Math.min(sub.size, Math.ceil((offset + Math.max(length, 1)) / SUB_BLOCK)));
        if (sub.leafMemory > SUB_MEMORY) this.sub[s] = undefined;
      }
    }
    let wait: Flush | undefined;
    for (let c = Math.floor(first / INTENT_SPAN); c <= Math.floor((end - 1) / INTENT_SPAN); c++) {
      this.lastWrite.set(c, seq);
      const page = this.intent.set(c);
      const k = key(INTENT, page ?? Math.floor(c / PAGE_BITS));
      if (page !== undefined) { this.intentsMarked++; wait = this.queue(k); }
      else if (this.intentDurable(c, k)) continue;
      else if (this.queued?.pages.has(k)) wait = this.queued;
      else if (this.flushing?.pages.has(k) && !wait) wait = this.flushing;
    }
    return wait?.done;
  }

  /**
   * Intent c (set in memory) is on disk and stays there: set in the last durable copy of its page,
   * and set in the copy a write-out in flight is putting over it, if any.
   */
  private intentDurable(c: number, k: number): boolean {
    if (!this.intentOnDisk.get(c)) return false;
    const copy = this.flushing?.copies?.get(k);
    if (!copy) return true;
    const o = c % PAGE_BITS;
    return (copy[Math.floor(o / 8)]! & (1 << (o % 8))) !== 0; // 32-bit-ok: bit and byte offsets inside one 4 KiB page
  }

  private queue(k: number): Flush {
    if (!this.queued) {
      let resolve!: () => void, reject!: (e: Error) => void;
      const done = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
      done.catch(() => {});
      this.queued = { pages: new Set(), done, resolve, reject };
      if (!this.flushing) queueMicrotask(() => this.startFlush());
    }
    this.queued.pages.add(k);
    return this.queued;
  }

  private startFlush(): void {
    if (this.flushing || !this.queued) return;
    const f = this.queued;
    this.queued = undefined;
    this.flushing = f;
    // Copies, all taken now: the pages may change while the writes are in flight (such changes wait
    // for the next flush), and intentDurable() must know what this one puts on disk.
    f.copies = new Map();
    for (const k of f.pages) {
      const area = Math.floor(k / 1e12), page = k - area * 1e12;
      f.copies.set(k, Buffer.from(this.bitsOf(area).pages.get(page) ?? new Uint8Array(PAGE)));
    }
    void (async () => {
      try {
        for (const [k, data] of f.copies!) {
          if (this.closed) throw new Error('closed');
          const area = Math.floor(k / 1e12), page = k - area * 1e12;
          await new Promise<void>((res, rej) => fs.write(this.fd, data, 0, PAGE, this.pageOffset(area, page), (e) => (e ? rej(e) : res())));
        }
        if (this.closed) throw new Error('closed');
        await new Promise<void>((res, rej) => fs.fdatasync(this.fd, (e) => (e ? rej(e) : res())));
        for (const [k, data] of f.copies!) if (Math.floor(k / 1e12) === INTENT) this.intentOnDisk.pages.set(k - INTENT * 1e12, data);
        this.flushes++;
        f.resolve();
      } catch (e) {
        this.failed = new Error(`cannot write the change map ${this.file}: ${(e as Error).message}`);
        f.reject(this.failed);
        this.queued?.reject(this.failed);
      } finally {
        this.flushing = undefined;
        if (this.queued) this.startFlush();
      }
    })();
  }

  /** Every flush queued so far is on disk. */
  private async drainFlushes(): Promise<void> {
    while (this.flushing || this.queued) await (this.queued ?? this.flushing)!.done;
  }

  /**
   * Writes the fine map out, then clears intents: their regions' bits are on disk now. `idle` (the
   * timer, the epoch switches) clears only those no write entered for the intent lifetime, so a
   * region still being written keeps its intent and its writers do not wait for an intent's
   * write-out again and again (on a disk a backup keeps busy, each one is milliseconds);
   * `settled` (a stop, an explicit settle) clears every one no write entered since this one began.
   */
  private async persist(clear: 'idle' | 'settled'): Promise<void> {
    const since = this.writeSeq;
    const idleSince = clear === 'idle' ? this.idleSince(since) : since;
    if (this.lazy.size) {
      const pages = this.lazy;
      this.lazy = new Set();
      for (const k of pages) this.queue(k);
    }
    // Every fine page queued so far (by this write-out or one running beside it) is on disk before
    // any intent is cleared, and the clears go in a flush of their own.
    await this.drainFlushes();
    let cleared = false;
    for (const [c, last] of this.lastWrite) {
      if (last > idleSince) continue;
      this.lastWrite.delete(c);
      this.queue(key(INTENT, this.intent.clear(c)));
      cleared = true;
    }
    if (cleared) await this.drainFlushes();
  }

  /**
   * The writeSeq of the newest write-out that began at least intentIdleMs ago (-1: none, so nothing
   * is idle long enough); this one's start is noted for the ones to come.
   */
  private idleSince(seq: number): number {
    const now = performance.now();
    const s = this.persistStarts;
    s.push({ at: now, seq });
    let i = -1;
    while (i + 1 < s.length && s[i + 1]!.at <= now - this.intentIdleMs) i++;
    if (i < 0) return -1;
    const found = s[i]!.seq;
    s.splice(0, i); // older starts are never needed again
    return found;
  }

  /** Every mark made so far is on disk (fine bits included); `idle`: intents of regions written lately stay. */
  async settle(clear: 'idle' | 'settled' = 'settled'): Promise<void> {
    // One write-out at a time: the timer's and this one are chained, never side by side.
    while (this.persisting) await this.persisting;
    const p = this.persist(clear);
    this.persisting = p.catch(() => {}).finally(() => { if (this.persisting === mine) this.persisting = undefined; });
    const mine = this.persisting;
    await p;
  }

  /**
   * Marks whole blocks (at `blockSize`) as changed in the epoch writes mark now, without a write:
   * blocks a backup left out (excluded, unreadable) so the next one looks at them again.
   */
  markBlocks(blocks: Bitset, blockSize: number): void {
    for (const [s, e] of blocks.runs()) {
      const off = s * blockSize;
      const len = Math.min(this.header.volumeSize, e * blockSize) - off;
      if (len > 0) void this.mark(off, len)?.catch(() => {});
    }
  }

  // Epochs. A backup's instant falls between beginEpoch() and freezeEpoch(): writes meanwhile are
  // marked in both slots, so each lands in the epoch of whichever side of the instant it was on.

  /** Before arming: a new epoch for backup `id`; from now writes mark the old and the new slot. */
  async beginEpoch(id: string): Promise<void> {
    if (this.header.pending) throw new Error(`the change map already has a backup running (${this.header.pending.id})`);
    const next = (1 - this.header.active) as 0 | 1;
    // The next slot starts empty, on disk first, then the header names it.
    await this.settle('idle');
    const old = [...this.slots[next].pages.keys()];
    this.slots[next].pages.clear();
    this.sub[next] = new Bitset(Math.ceil(this.header.volumeSize / SUB_BLOCK));
    for (const k of old) this.lazy.delete(key(next, k));
    this.writePagesSync(next, old);
    fs.fdatasyncSync(this.fd);
    this.header.pending = { id, slot: next };
    await this.writeHeader();
    this.marking = [this.header.active, next];
  }

  /**
   * After arming (the instant fixed, in-flight writes landed): writes mark only the new epoch. Returns
   * the changed regions of the closing epoch, as blocks of `blockSize`.
   */
  async freezeEpoch(blockSize: number, totalBlocks: number): Promise<Bitset> {
    const p = this.header.pending;
    if (!p) throw new Error('the change map has no backup arming');
    this.marking = [p.slot];
    return this.blocksOf(this.header.active, blockSize, totalBlocks);
  }

  /** Regions changed in the active epoch so far (for status). */
  changedRegions(): number { return this.slots[this.header.active].count(); }

  private blocksOf(slot: 0 | 1, blockSize: number, totalBlocks: number): Bitset {
    const out = new Bitset(totalBlocks);
    const per = GRANULARITY / blockSize;
    if (this.header.fullBecause) { out.setRange(0, totalBlocks); return out; }
    const sub = this.sub[slot];
    if (sub && blockSize === SUB_BLOCK && sub.size === totalBlocks) { out.orWith(sub); return out; }
    for (const r of this.slots[slot].bits()) {
      if (r >= this.regions) continue;
      out.setRange(Math.min(totalBlocks, r * per), Math.min(totalBlocks, (r + 1) * per));
    }
    return out;
  }

  /** The backup completed: its instant is the new base, the new epoch the active one. */
  async commitEpoch(): Promise<void> {
    const p = this.header.pending;
    if (!p) return;
    // The new epoch's fine bits so far go to disk first: the header then names that slot.
    await this.settle('idle');
    this.header.base = p.id;
    this.header.active = p.slot;
    this.header.pending = null;
    this.header.fullBecause = null;
    this.marking = [p.slot];
    await this.writeHeader();
    // The old slot is garbage now: beginEpoch clears it (memory and disk) before it is reused.
  }

  /** The backup failed or was cancelled: its epoch merges back, nothing is lost. */
  async abandonEpoch(): Promise<void> {
    const p = this.header.pending;
    if (!p) return;
    this.marking = [this.header.active];
    await this.settle('idle');
    const changed = this.slots[this.header.active].orWith(this.slots[p.slot]);
    const a = this.sub[this.header.active], n = this.sub[p.slot];
    if (a && n) a.orWith(n); else this.sub[this.header.active] = undefined;
    this.writePagesSync(this.header.active, changed);
    fs.fdatasyncSync(this.fd);
    this.header.pending = null;
    await this.writeHeader();
  }

  /** A clean stop: every mark on disk, the device's stamp recorded. */
  async close(stampNow?: () => Promise<DeviceStamp>): Promise<void> {
    if (this.closed) return;
    clearInterval(this.heartbeat);
    clearInterval(this.persister);
    try {
      await this.settle();
      if (this.header.pending) await this.abandonEpoch();
      if (stampNow) {
        this.header.stamp = await stampNow();
        this.header.state = 'clean';
      }
      await this.writeHeader();
    } finally {
      await this.headerChain.catch(() => {});
      this.closed = true;
      fs.closeSync(this.fd);
    }
  }

  /** Stops without a clean stamp (as a crash leaves it: the next open trusts it as after kill -9). */
  closeNow(): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.heartbeat);
    clearInterval(this.persister);
    // Writes already handed to the kernel finish on this fd; none starts after this (checked above).
    const inFlight = [this.headerChain, this.flushing?.done, this.persisting].map((p) => p?.catch(() => {}));
    void Promise.all(inFlight).then(() => { try { fs.closeSync(this.fd); } catch { /* closed */ } });
  }

  /** Bytes of map per TiB of volume at this granularity (two fine slots and the intent bitmap). */
  static bytesPerTiB(): number {
    const fine = 2 ** 40 / GRANULARITY / 8;
    return 2 * fine + fine / INTENT_SPAN;
  }
}
