// THE copy engine (seed 001 FIG. 15, claims 44 and 62; QEMU's block-copy.c): every backup, restore
// and verify moves blocks with it. Its inputs: a point in time (the device, the lockable map of what
// is left to copy, and for copy-before-write the container of saved originals), the set of blocks the
// backup holds, a sink, an error policy and a pace. Several large batches are in flight, one native
// call per batch, no per-block promises.
// Order of work, per batch:
//   random-access sink (image file, device): 1. blocks a writer waits on (they jump the queue: read
//     from the device now, the write then goes on without using container space); 2. saved originals
//     (eagerly: every slot drained is a writer that will not wait); 3. the walk, ascending.
//   sequential sink (tar, stream): the walk only, strictly ascending; a saved block is emitted from the
//     container when the walk reaches it, and a block being saved is waited for.
// A block claimed for reading is locked until its read lands, so a write never overtakes it; a block
// is read only when pending and not locked, so the copier never reads a block a writer is saving.
// Short free gaps between runs are read through (one 256 KiB read beats two 4 KiB ones); their bytes
// are never handed to the sink.
import { BufferPool } from '../device/memory';
import type { BatchReader } from '../device/device';
import type { BackupSink } from '../sink/sink';
import type { CopyMap, Task } from './copy-map';
import type { Bitset } from '../util/bitset';
import { type ErrorPolicy, UnreadableBlockError } from './errors';
import { RateLimit } from './rate-limit';

/** Batches while clients write: bytes per device read batch, and batches in flight (at least 1). */
export interface BusyPace { batchBytes: number; depth: number }

/** Where the blocks of one point in time are. */
export interface PointInTimeSource {
  /** Originals not saved elsewhere are read from here (a device, or the appliance's reconciled view). */
  readonly device: BatchReader;
  /** What is left to copy, lockable (copy-before-write writers claim from it too). */
  readonly map: CopyMap;
  /** Saved originals (copy-before-write); absent when nothing else changes the device meanwhile. */
  readonly container?: SavedOriginals;
}

/** What the engine needs of a container of saved originals (copy-before-write's, by block). */
export interface SavedOriginals {
  readonly used: number;
  readonly capacity: number;
  get(blocks: ArrayLike<number>, buffer: ArrayBuffer, offsets: ArrayLike<number>, n: number): Promise<void>;
  drop(block: number): void;
}

export interface CopyPace {
  /** Bytes per second at most (--max-rate). */
  maxRate?: number;
  /** True while clients write: device reads then use `busy` batches. */
  writersActive?: () => boolean;
  /** True while a writer waits for container space: full speed, whatever the pace. */
  writersStarved?: () => boolean;
  /** Batches while writers write (a function is asked before every batch). */
  busy?: BusyPace | (() => BusyPace);
}

export interface CopyProgress {
  bytesDone: number;
  bytesTotal: number;
  blocksDone: number;
  badBlocks: number;
}

export interface CopyOptions {
  source: PointInTimeSource;
  blockSize: number;
  volumeSize: number;
  /** The blocks the backup holds (at blockSize). */
  used: Bitset;
  sink: BackupSink;
  /** The sink accepts batches at any offset (image, device); false: strictly ascending. */
  randomAccess: boolean;
  onError: ErrorPolicy;
  pace?: CopyPace;
  /** Bytes per batch buffer (default 4 MiB). */
  batchBytes?: number;
  /** Batches in flight (default 4). */
  depth?: number;
  /** Free gaps up to this many bytes between runs are read through (default 128 KiB). */
  maxGapBytes?: number;
  /** A fatal error from elsewhere (container failure, bad original under "abort", cancel). */
  failed?(): Error | undefined;
  signal?: AbortSignal;
  onProgress?(p: CopyProgress): void;
}

export interface CopyResult {
  bytes: number;
  blocks: number;
  badBlocks: number[];
  durationMs: number;
}

interface Batch {
  buffer: ArrayBuffer;
  /** Sink triplets [volumeOffset, length, bufferOffset]. */
  sink: Float64Array;
  nSink: number;
  dev: Float64Array;
  nDev: number;
  /** Device reads of the walk that a later run may extend through a short gap: the last one's index. */
  walkDev: number;
  walkEnd: number;
  contBlocks: Float64Array;
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
 * a client's write may queue behind, yet the container must drain as fast as writers fill it.
 */
const BUSY_DRAIN_BLOCKS = 64;
const DEFAULT_BUSY: BusyPace = { batchBytes: 256 << 10, depth: 2 };

export class CopyEngine {
  private readonly bs: number;
  private readonly total: number;
  private readonly maxGapBlocks: number;
  private cursor = 0;
  private readonly urgent: Array<[number, number]> = [];
  private readonly badBlocks: number[] = [];
  private bytesDone = 0;
  private blocksDone = 0;
  readonly bytesTotal: number;
  /** Blocks read because a writer waited on them. */
  urgentBlocks = 0;

  constructor(private readonly o: CopyOptions) {
    this.bs = o.blockSize;
    this.total = o.source.map.totalBlocks;
    this.bytesTotal = Math.min(o.used.setCount * this.bs, o.volumeSize);
    this.maxGapBlocks = Math.floor((o.maxGapBytes ?? 128 << 10) / this.bs);
  }

  get progress(): CopyProgress {
    return { bytesDone: this.bytesDone, bytesTotal: this.bytesTotal, blocksDone: this.blocksDone, badBlocks: this.badBlocks.length };
  }

  /** A writer waits on [first, end): read those blocks next (random-access sinks only). */
  urge(first: number, end: number): void {
    if (!this.o.randomAccess || this.urgent.length >= MAX_URGENT) return;
    this.urgent.push([first, end]);
    this.o.source.map.changed.notify();
  }

  async run(): Promise<CopyResult> {
    const started = performance.now();
    const pace = this.o.pace ?? {};
    const busy = pace.busy ?? DEFAULT_BUSY;
    const busyNow = typeof busy === 'function' ? busy : () => busy;
    const { map } = this.o.source;
    const batchBytes = Math.max(this.bs, Math.floor((this.o.batchBytes ?? 4 << 20) / this.bs) * this.bs);
    const depth = this.o.depth ?? 4;
    const pool = new BufferPool(batchBytes, depth + 1);
    const capBlocks = batchBytes / this.bs;
    const inflight: Array<Promise<Batch>> = [];
    const track = (p: Promise<Batch>) => { p.catch(() => {}); inflight.push(p); };
    const rate = new RateLimit(pace.maxRate);
    const tables = new Map<ArrayBuffer, Batch>();
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
      await rate.pace(this.bytesDone, pace.writersStarved);
    };
    try {
      for (;;) {
        this.check();
        // While writers write: the busy pace; otherwise, or when a writer waits for container space,
        // full speed.
        const starved = pace.writersStarved?.() ?? false;
        const p = !starved && pace.writersActive?.() ? busyNow() : undefined;
        if (p && inflight.length >= Math.max(1, p.depth)) { await deliver(await inflight.shift()!); continue; }
        const buffer = await pool.acquire();
        let b = tables.get(buffer);
        if (!b) tables.set(buffer, (b = newBatch(buffer, capBlocks)));
        // While writers write only the device reads shrink: draining the container costs the disk
        // small writes only, and a container drained slowly fills and makes writers wait.
        resetBatch(b, capBlocks, p ? Math.min(capBlocks, Math.max(1, Math.floor(p.batchBytes / this.bs))) : capBlocks, p ? Math.min(capBlocks, BUSY_DRAIN_BLOCKS) : capBlocks);
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
      pool.dispose();
      throw e;
    }
    pool.dispose();
    return { bytes: this.bytesDone, blocks: this.blocksDone, badBlocks: this.badBlocks.slice().sort((a, b) => a - b), durationMs: performance.now() - started };
  }

  private check(): void {
    const f = this.o.failed?.();
    if (f) throw f;
    const s = this.o.signal;
    if (s?.aborted) throw s.reason instanceof Error ? s.reason : new Error('cancelled');
  }

  private finished(): boolean {
    const { map } = this.o.source;
    return this.cursor >= this.total && map.savedCount === 0 && map.countTasks('save') === 0 && map.pending.setCount === 0;
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
    const { map } = this.o.source;
    while (b.room > 0 && this.urgent.length > 0) {
      const r = this.urgent[0]!;
      let s = r[0];
      while (s < r[1] && b.room > 0) {
        if (map.pending.get(s) && !map.busy.get(s) && this.o.used.get(s)) {
          const t = map.claimRun(s, Math.min(r[1], s + b.room), 'copy')!;
          this.addDeviceRun(b, t, false);
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
    const { map } = this.o.source;
    if (map.savedCount === 0 || b.room === 0) return;
    const take: number[] = [];
    const limit = Math.min(b.room, b.contRoom);
    for (let blk = map.saved.next(0, true); blk < this.total && take.length < limit; blk = map.saved.next(blk + 1, true)) take.push(blk);
    for (const blk of take) this.addSaved(b, blk);
  }

  private fillWalk(b: Batch): number | undefined {
    const { map } = this.o.source;
    const { used } = this.o;
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
      if (!used.get(blk)) {
        const e = Math.min(used.next(blk, true, this.total), map.pending.next(blk, false, this.total));
        map.pending.clearRange(blk, Math.max(e, blk + 1));
        this.cursor = Math.max(e, blk + 1);
        continue;
      }
      // The run stops at the first block the backup does not hold.
      const limit = used.next(blk, false, Math.min(this.total, blk + Math.min(b.room, b.devRoom)));
      const t = map.claimRun(blk, limit, 'copy')!;
      this.addDeviceRun(b, t, true);
      this.cursor = t.end;
    }
    return undefined;
  }

  private blockLength(blk: number): number {
    return Math.min(this.bs, this.o.volumeSize - blk * this.bs);
  }

  private addDeviceRun(b: Batch, t: Task, walk: boolean): void {
    const off = t.start * this.bs;
    const len = Math.min(t.end * this.bs, this.o.volumeSize) - off;
    const n = t.end - t.start;
    const gap = walk && b.walkDev >= 0 ? t.start - b.walkEnd : -1;
    if (gap >= 0 && gap <= this.maxGapBlocks && gap <= b.room - n) {
      // Read through the free gap: one longer read; the gap's bytes never reach the sink.
      const at = b.used + gap * this.bs;
      b.dev[b.walkDev * 3 + 1] = Math.ceil((off + len - b.dev[b.walkDev * 3]!) / 512) * 512;
      this.addSink(b, off, len, at);
      b.used = at + n * this.bs;
      b.room -= gap + n;
    } else {
      b.dev[b.nDev * 3] = off;
      b.dev[b.nDev * 3 + 1] = Math.ceil(len / 512) * 512;
      b.dev[b.nDev * 3 + 2] = b.used;
      if (walk) b.walkDev = b.nDev;
      b.nDev++;
      this.addSink(b, off, len, b.used);
      b.used += n * this.bs;
      b.room -= n;
    }
    if (walk) b.walkEnd = t.end;
    b.tasks.push(t);
    b.devRoom -= n;
  }

  /** Takes a saved block out of the map now; its room in the container is given back once the data is in the batch. */
  private addSaved(b: Batch, blk: number): void {
    const { map, container } = this.o.source;
    const kind = map.unsave(blk)!;
    if (!this.o.used.get(blk)) {
      // Saved before the used map was known, and free at the instant: not part of the backup.
      // A writer may be waiting for room: wake it (the batch may end up empty, and then no
      // delivery would ever notify).
      container?.drop(blk);
      map.changed.notify();
      return;
    }
    const len = this.blockLength(blk);
    if (kind === 'bad') {
      this.badBlocks.push(blk);
      b.zeros.push(b.used, this.bs);
    } else {
      b.contBlocks[b.nCont] = blk;
      b.contOffs[b.nCont] = b.used;
      b.nCont++;
    }
    this.addSink(b, blk * this.bs, len, b.used);
    b.used += this.bs;
    b.room--;
    b.walkDev = -1; // the buffer moved on: the next walk run starts a read of its own
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
    const { map, device, container } = this.o.source;
    try {
      const [res] = await Promise.all([
        b.nDev > 0 ? device.readBatch(b.buffer, b.dev.subarray(0, b.nDev * 3)) : Promise.resolve(new Int32Array(0)),
        b.nCont > 0 ? container!.get(b.contBlocks, b.buffer, b.contOffs, b.nCont) : Promise.resolve(),
      ]);
      for (let i = 0; i < b.zeros.length; i += 2) new Uint8Array(b.buffer, b.zeros[i]!, b.zeros[i + 1]!).fill(0);
      for (let i = 0; i < b.nDev; i++) {
        const off = b.dev[i * 3]!, len = b.dev[i * 3 + 1]!, at = b.dev[i * 3 + 2]!;
        const got = res[i]!;
        if (got === len) continue;
        if (got >= 0 && off + got >= this.o.volumeSize) {
          new Uint8Array(b.buffer, at + got, len - got).fill(0); // past the end of an odd-sized source
          continue;
        }
        // Only the sink's blocks inside the failed read matter: an unreadable free block is no loss.
        for (let j = 0; j < b.nSink; j++) {
          const so = b.sink[j * 3]!, sl = b.sink[j * 3 + 1]!, sa = b.sink[j * 3 + 2]!;
          if (sa >= at && sa < at + len) await this.rereadByBlock(b.buffer, so, sl, sa);
        }
      }
    } finally {
      for (const t of b.tasks) map.unlock(t);
      for (let i = 0; i < b.nCont; i++) container!.drop(b.contBlocks[i]!);
      if (b.nCont > 0 || b.tasks.length > 0) map.changed.notify();
    }
    return b;
  }

  /**
   * A read failed: find which blocks are unreadable and apply the error policy to each. Adjacent
   * reads submitted together get merged by the block layer into one request that fails as a whole,
   * so even and odd blocks go in two separate batches: no two reads in flight touch.
   */
  private async rereadByBlock(buffer: ArrayBuffer, off: number, len: number, at: number): Promise<void> {
    const bs = this.bs;
    const n = Math.ceil(len / bs);
    for (let parity = 0; parity < 2; parity++) {
      const count = Math.floor((n - parity + 1) / 2);
      if (count <= 0) continue;
      const segs = new Float64Array(count * 3);
      for (let k = 0; k < count; k++) {
        const j = parity + 2 * k;
        const o = off + j * bs;
        segs[k * 3] = o;
        segs[k * 3 + 1] = Math.ceil(Math.min(bs, off + len - o) / 512) * 512;
        segs[k * 3 + 2] = at + j * bs;
      }
      const res = await this.o.source.device.readBatch(buffer, segs);
      for (let k = 0; k < count; k++) {
        const want = segs[k * 3 + 1]!;
        const got = res[k]!;
        if (got === want || (got >= 0 && segs[k * 3]! + got >= this.o.volumeSize)) continue;
        const block = Math.floor(segs[k * 3]! / bs);
        const errno = got < 0 ? -got : 5;
        if (this.o.onError === 'abort') throw new UnreadableBlockError(block, segs[k * 3]!, this.o.source.device.path, errno);
        this.badBlocks.push(block);
        new Uint8Array(buffer, segs[k * 3 + 2]!, want).fill(0);
      }
    }
  }
}

function newBatch(buffer: ArrayBuffer, capBlocks: number): Batch {
  return {
    buffer,
    sink: new Float64Array(capBlocks * 3),
    nSink: 0,
    dev: new Float64Array(capBlocks * 3),
    nDev: 0,
    walkDev: -1,
    walkEnd: 0,
    contBlocks: new Float64Array(capBlocks),
    contOffs: new Float64Array(capBlocks),
    nCont: 0,
    zeros: [],
    tasks: [],
    used: 0,
    room: capBlocks,
    devRoom: capBlocks,
    contRoom: capBlocks,
  };
}

/** A batch's tables are reused with its buffer: no allocation per batch. */
function resetBatch(b: Batch, capBlocks: number, devBlocks: number, contBlocks: number): void {
  b.nSink = 0; b.nDev = 0; b.walkDev = -1; b.walkEnd = 0; b.nCont = 0;
  b.zeros.length = 0; b.tasks.length = 0;
  b.used = 0; b.room = capBlocks; b.devRoom = devBlocks; b.contRoom = contBlocks;
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
