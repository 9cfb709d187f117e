// The process's one I/O ring (native/io_ring.cc): positioned reads, writes and fdatasyncs that
// complete one by one on the JavaScript thread, with no trip through libuv's thread pool. Ops issued
// in the same turn of the event loop go to the kernel in one io_uring_submit; ops beyond the ring's
// depth wait here, in order, for a free slot. Used where latency per request matters (the NBD data
// path, copy-before-write); bulk copies keep the batch API.
import { config } from '../config';
import { native, type NativeIoRing, type NativeIoRingClass } from './native';

/**
 * Called once with bytes transferred (short only at end of file) or -errno, and the op's index
 * within its batch (0 for a single op): one callback serves a whole batch.
 */
export type IoDone = (result: number, index: number) => void;

const REC = 7;
const KIND_READ = 0;
const KIND_WRITE = 1;
const KIND_SYNC = 2;
const URGENT = 4;

export class IoRing {
  private readonly ring: NativeIoRing;
  /** Callback by tag; tags are recycled through `freeTags`. */
  private readonly done: Array<IoDone | undefined> = [];
  /** The index within its batch of the op holding a tag. */
  private readonly opIndex: number[] = [];
  /** The registered buffer of the op holding a tag (-1: none, an fdatasync). */
  private readonly opBuffer: number[] = [];
  /** Ops staged or in the kernel, by registered buffer index (so memory in use is never let go). */
  private readonly bufferOps: number[] = [];
  private readonly freeTags: number[] = [];
  /** Ops not yet accepted by the ring, as 7-number records, from `stagedFirst`. */
  private staged = new Float64Array(REC * 256);
  private stagedFirst = 0;
  private stagedEnd = 0;
  private scheduled = false;
  private readonly flushStaged = () => { this.scheduled = false; this.pump(); };
  readonly counters = { submitted: 0, completed: 0, waitedForSlot: 0 };
  /** Registered memory by buffer and by index (so Device.readBatch can find it). */
  private readonly indexes = new WeakMap<ArrayBuffer, number>();
  private readonly buffers = new Map<number, ArrayBuffer>();

  constructor(Ring: NativeIoRingClass, depth: number) {
    this.ring = new Ring(depth, (n) => this.complete(n));
  }

  /** Lets the ring use `buffer`; returns the index ops name it by. The ring keeps it alive. */
  register(buffer: ArrayBuffer): number {
    const known = this.indexes.get(buffer);
    if (known !== undefined) return known;
    const i = this.ring.register(buffer);
    this.indexes.set(buffer, i);
    this.buffers.set(i, buffer);
    return i;
  }

  /** Releases a registered buffer; throws while an op still uses it. */
  unregister(index: number): void {
    this.ring.unregister(index);
    const b = this.buffers.get(index);
    if (b) this.indexes.delete(b);
    this.buffers.delete(index);
  }

  /** Unregisters once no op uses the buffer any more, staged or in the kernel (ops finish in bounded time). */
  async unregisterWhenIdle(index: number): Promise<void> {
    while ((this.bufferOps[index] ?? 0) > 0) await new Promise((r) => setTimeout(r, 1));
    this.unregister(index);
  }

  /** The index of a registered buffer, or undefined. */
  indexOf(buffer: ArrayBuffer): number | undefined { return this.indexes.get(buffer); }

  /**
   * A whole batch of [offset, length, bufOffset] triplets on registered memory, one promise for all:
   * the same contract as the addon's readBatch/writeBatch, without the thread-pool hop.
   */
  batch(fd: number, write: boolean, buf: number, segments: Float64Array, urgent = false): Promise<Int32Array> {
    const n = segments.length / 3;
    const out = new Int32Array(n);
    if (n === 0) return Promise.resolve(out);
    return new Promise((resolve) => {
      let left = n;
      const cb: IoDone = (r, i) => { out[i] = r; if (--left === 0) resolve(out); };
      const kind = (write ? KIND_WRITE : KIND_READ) + (urgent ? URGENT : 0);
      for (let i = 0; i < n; i++) this.stage(fd, kind, buf, segments[i * 3]!, segments[i * 3 + 1]!, segments[i * 3 + 2]!, cb, i);
    });
  }

  /**
   * urgent: a client (or a writer waiting on copy-before-write) waits for this op: issued in the
   * real-time I/O class, served before the backup's bulk reads (best effort) by the block layer.
   * Copy-before-write reads are urgent; clients' own I/O only with LIVESNAP_CLIENT_IO_PRIORITY=
   * realtime (see device-backend.ts: it can starve the backup).
   */
  read(fd: number, buf: number, offset: number, length: number, bufOffset: number, cb: IoDone, urgent = false): void {
    this.stage(fd, KIND_READ + (urgent ? URGENT : 0), buf, offset, length, bufOffset, cb);
  }

  write(fd: number, buf: number, offset: number, length: number, bufOffset: number, cb: IoDone, urgent = false): void {
    this.stage(fd, KIND_WRITE + (urgent ? URGENT : 0), buf, offset, length, bufOffset, cb);
  }

  /** fdatasync(fd) in the ring: 0 or -errno. */
  datasync(fd: number, cb: IoDone): void {
    this.stage(fd, KIND_SYNC, 0, 0, 0, 0, cb);
  }

  get inflight(): number { return this.ring.inflight; }

  private stage(fd: number, kind: number, buf: number, offset: number, length: number, bufOffset: number, cb: IoDone, index = 0): void {
    const tag = this.freeTags.length ? this.freeTags.pop()! : this.done.length;
    this.done[tag] = cb;
    this.opIndex[tag] = index;
    const b = (kind & 3) === KIND_SYNC ? -1 : buf;
    this.opBuffer[tag] = b;
    if (b >= 0) this.bufferOps[b] = (this.bufferOps[b] ?? 0) + 1;
    if (this.stagedEnd + REC > this.staged.length) this.compact();
    const s = this.staged;
    const i = this.stagedEnd;
    s[i] = fd; s[i + 1] = kind; s[i + 2] = buf; s[i + 3] = offset; s[i + 4] = length; s[i + 5] = bufOffset; s[i + 6] = tag;
    this.stagedEnd = i + REC;
    if (!this.scheduled) { this.scheduled = true; process.nextTick(this.flushStaged); }
  }

  private compact(): void {
    const live = this.stagedEnd - this.stagedFirst;
    const need = live + REC;
    const next = need > this.staged.length / 2 ? new Float64Array(Math.max(this.staged.length * 2, need)) : this.staged;
    if (next === this.staged) this.staged.copyWithin(0, this.stagedFirst, this.stagedEnd);
    else next.set(this.staged.subarray(this.stagedFirst, this.stagedEnd));
    this.staged = next;
    this.stagedFirst = 0;
    this.stagedEnd = live;
  }

  private pump(): void {
    for (;;) {
      const waiting = (this.stagedEnd - this.stagedFirst) / REC;
      if (!waiting) break;
      const room = this.ring.capacity - this.ring.inflight;
      if (room <= 0) { this.counters.waitedForSlot++; break; }
      const before = this.stagedEnd;
      const n = this.submitStaged(Math.min(room, waiting));
      this.stagedFirst += n * REC;
      this.counters.submitted += n;
      if (n === 0 && this.stagedEnd === before) break; // no progress: the ring refused (full)
    }
    if (this.stagedFirst === this.stagedEnd) this.stagedFirst = this.stagedEnd = 0;
  }

  private submitStaged(count: number): number {
    const r = this.ring.submit(this.staged, this.stagedFirst / REC, count);
    if (r >= 0) return r;
    // A malformed record is a caller's bug: fail that op alone (EINVAL), keep the queue going.
    const accepted = -r - 1;
    const bad = this.stagedFirst + accepted * REC;
    const tag = this.staged[bad + 6]!;
    this.staged.copyWithin(bad, bad + REC, this.stagedEnd);
    this.stagedEnd -= REC;
    // Later: the callback may stage more ops, which must not move the queue under pump().
    queueMicrotask(() => this.finish(tag, -22));
    return accepted;
  }

  private complete(n: number): void {
    const tags = this.ring.tags;
    const results = this.ring.results;
    this.counters.completed += n;
    for (let i = 0; i < n; i++) this.finish(tags[i]!, results[i]!);
    this.pump();
  }

  private finish(tag: number, result: number): void {
    const cb = this.done[tag]!;
    this.done[tag] = undefined;
    this.freeTags.push(tag);
    const b = this.opBuffer[tag]!;
    if (b >= 0) this.bufferOps[b]!--;
    cb(result, this.opIndex[tag]!);
  }
}

let shared: IoRing | null | undefined;

/**
 * The shared ring, or undefined where there is none (addon without liburing, io_uring refused by
 * the kernel or a sandbox, or LIVESNAP_IO_ENGINE=threadpool): callers then use the batch API.
 */
export function ioRing(): IoRing | undefined {
  if (shared !== undefined) return shared ?? undefined;
  shared = null;
  const Ring = native().IoRing;
  if (!Ring || config().ioEngine === 'threadpool') return undefined;
  try {
    shared = new IoRing(Ring, 256);
  } catch {
    shared = null;
  }
  return shared ?? undefined;
}

/** How batches of positioned I/O run here: "io_uring" (every segment in flight at once) or "threadpool". */
export function ioEngineName(): 'io_uring' | 'threadpool' {
  return native().ioEngine();
}
