// THE copy-before-write decision (seed 001 FIG. 9-12 and 14; QEMU's block/copy-before-write.c).
// Every path that changes bytes of a served volume — NBD WRITE, TRIM, WRITE_ZEROES — passes the
// export's snapshot filter (export/snapshot-filter.ts), which asks this guard while it is attached.
// The rule, for the blocks the change touches (whole blocks, even for a partial-block write):
//   - no snapshot armed ........................................ go now (one property check)
//   - every block done, free or excluded (not pending, not busy)  go now (a bit test per block)
//   - a block is busy (the copier is reading it, another writer is saving it, a view reads it)
//                                                                wait for that task, then look again
//   - a block is pending (used, original not copied anywhere)  save the ORIGINAL into the container,
//     then go; above the high-water mark sleep a little first; with the container full, ask the
//     copier for these blocks and wait until it has copied them or freed space.
// Nothing here ever fails the client's write: a failed read of an original marks the block bad for
// the backup (or aborts the backup, per policy); a failed container or a disarm lets writes go.
import type { Device } from '../device/device';
import type { ChangeGuard } from '../export/snapshot-filter';
import { type Container, roundUp512 } from './container';
import { type CopyMap, nextSet } from '../copy/copy-map';
import { type Sleepers, type ThrottlePolicy, throttleDelay } from './throttle';

export interface CbwStats {
  /** Writes held by the snapshot right now. */
  writesWaiting: number;
  /** Writes that took the slow path (saved an original, or waited) since arming. */
  writesDelayed: number;
  worstWriteDelayMs: number;
  /** Blocks whose original a writer saved into the container. */
  blocksSaved: number;
  /** Writes slowed by the high-water-mark throttle. */
  writesThrottled: number;
}

export interface CbwHooks {
  /** The copier should read these blocks next (a writer waits on them). */
  urge(first: number, end: number): void;
  /** The original of `block` could not be read (errno): decide per the error policy. */
  badBlock(block: number, errno: number): void;
  /** The container itself failed: the backup cannot go on. */
  fail(error: Error): void;
}

const MAX_SAVE_BLOCKS = 64;

export class CopyBeforeWrite implements ChangeGuard {
  armed = false;
  /** Set while writes that entered before arming are still landing: CBW reads wait for them. */
  ready: Promise<void> | undefined;
  readonly stats: CbwStats = { writesWaiting: 0, writesDelayed: 0, worstWriteDelayMs: 0, blocksSaved: 0, writesThrottled: 0 };
  /** Saves in flight (their blocks will be in the container when they end). */
  activeSaves = 0;
  /** Writers waiting for container space right now: the copier then runs at full speed. */
  waitingForSpace = 0;
  /** When each write now held by the snapshot started waiting (performance.now()). */
  private readonly heldSince = new Set<number>();

  constructor(
    readonly map: CopyMap,
    readonly device: Device,
    readonly container: Container,
    readonly blockSize: number,
    readonly volumeSize: number,
    readonly throttle: ThrottlePolicy,
    readonly sleepers: Sleepers,
    private readonly hooks: CbwHooks,
  ) {}

  attached(drained: Promise<void> | undefined): void {
    this.armed = true;
    // Changes that entered before the instant must land before any original is read.
    if (drained) this.ready = drained.then(() => { this.ready = undefined; });
  }

  detached(): void {
    this.armed = false;
    this.ready = undefined;
    this.sleepers.wakeAll();
    this.map.releaseAllWaiters();
  }

  /** undefined: the write may go now. A promise: the write goes when it resolves (it never rejects). */
  beforeChange(offset: number, length: number): Promise<void> | undefined {
    if (!this.armed || length <= 0) return undefined;
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const end = Math.min(Math.floor((offset + length - 1) / bs) + 1, this.map.totalBlocks);
    if (this.ready === undefined && !this.map.needsWork(first, end)) return undefined;
    return this.slow(first, end);
  }

  /** How long the longest-held write has waited so far, in ms (0 when none is held). */
  longestWaitMs(now = performance.now()): number {
    let oldest = now;
    for (const t of this.heldSince) if (t < oldest) oldest = t;
    return now - oldest;
  }

  private async slow(first: number, end: number): Promise<void> {
    let t0 = performance.now();
    while (this.heldSince.has(t0)) t0 += 1e-6; // one entry per held write
    this.heldSince.add(t0);
    const st = this.stats;
    st.writesWaiting++;
    st.writesDelayed++;
    let throttled = false;
    try {
      if (this.ready) await this.ready;
      const map = this.map;
      while (this.armed) {
        if (anyBusy(map, first, end)) {
          await map.waitFor(first, end);
          continue;
        }
        const start = nextSet(map.pending, first, end);
        if (start >= end) return; // every block copied, saved, free or excluded
        if (!throttled) {
          const ms = throttleDelay(this.throttle, this.fill);
          if (ms > 0) {
            throttled = true;
            st.writesThrottled++;
            this.hooks.urge(first, end);
            await this.sleepers.sleep(ms);
            continue;
          }
        }
        const want = Math.min(end - start, this.maxSave);
        const got = this.container.reserve(want);
        if (got === 0) {
          // Container full (FIG. 12): the copier copies these blocks or frees space; then look again.
          this.hooks.urge(first, end);
          this.waitingForSpace++;
          try { await map.changed.wait(); } finally { this.waitingForSpace--; }
          continue;
        }
        const task = map.claimRun(start, Math.min(end, start + got), 'save');
        if (!task) {
          this.container.unreserve(got);
          continue;
        }
        const n = task.end - task.start;
        if (n < got) this.container.unreserve(got - n);
        await this.save(task.start, n);
        map.unlock(task);
      }
    } finally {
      this.heldSince.delete(t0);
      st.writesWaiting--;
      const d = performance.now() - t0;
      if (d > st.worstWriteDelayMs) st.worstWriteDelayMs = d;
    }
  }

  /** Fraction of the container in use (held or reserved), 0..1. */
  get fill(): number {
    return this.container.capacity === 0 ? 1 : this.container.used / this.container.capacity;
  }

  /** Most blocks one save reads at once (a storage container stages them in one buffer). */
  private get maxSave(): number {
    const staged = (this.container as { maxStagedBlocks?: number }).maxStagedBlocks;
    return Math.min(MAX_SAVE_BLOCKS, staged ?? MAX_SAVE_BLOCKS);
  }

  /** Reads the originals of blocks [start, start+n) (room reserved) into the container; records them in the map. */
  private async save(start: number, n: number): Promise<void> {
    const bs = this.blockSize;
    this.activeSaves++;
    try {
      const staging = await this.container.staging(n);
      const blocks = new Float64Array(n);
      const segs = new Float64Array(n * 3);
      for (let i = 0; i < n; i++) {
        blocks[i] = start + i;
        segs[i * 3] = (start + i) * bs;
        segs[i * 3 + 1] = roundUp512(Math.min(bs, this.volumeSize - (start + i) * bs));
        segs[i * 3 + 2] = staging.offsets[i]!;
      }
      // A writer is held until this read lands: urgent (the real-time I/O class on the ring).
      const res = await this.device.readBatch(staging.buffer, segs, { urgent: true });
      const ok = new Array<boolean>(n);
      for (let i = 0; i < n; i++) {
        const want = Math.min(bs, this.volumeSize - (start + i) * bs);
        ok[i] = res[i]! >= want;
      }
      await this.container.put(staging, blocks, ok, n);
      for (let i = 0; i < n; i++) {
        if (ok[i]) {
          this.map.markSaved(start + i);
          this.stats.blocksSaved++;
        } else {
          this.map.markSaved(start + i, true);
          this.hooks.badBlock(start + i, res[i]! < 0 ? -res[i]! : 5);
        }
      }
    } catch (e) {
      // The container failed: the backup is lost, the write is not.
      for (let i = 0; i < n; i++) this.map.markSaved(start + i, true);
      this.hooks.fail(e instanceof Error ? e : new Error(String(e)));
    } finally {
      this.activeSaves--;
    }
  }
}

function anyBusy(map: CopyMap, first: number, end: number): boolean {
  return map.busy.any(first, end);
}
