// THE copy-before-write decision (seed 001 FIG. 9-12 and 14; QEMU's block/copy-before-write.c).
// Every path that changes bytes of a served volume — NBD WRITE, TRIM, WRITE_ZEROES — calls
// SnapshotGate.beforeChange, which calls CopyBeforeWrite.beforeWrite while a snapshot is armed.
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
import type { ChangeKind, WriteInterceptor } from '../nbd/backend';
import type { Container, SlotAllocator } from './container';
import { type CopyMap, nextSet } from './copy-map';
import { type Sleepers, type ThrottlePolicy, throttleDelay } from './throttle';
import { WriteActivity } from './write-activity';

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

export class CopyBeforeWrite {
  armed = false;
  /** Set while writes that entered before arming are still landing: CBW reads wait for them. */
  ready: Promise<void> | undefined;
  readonly stats: CbwStats = { writesWaiting: 0, writesDelayed: 0, worstWriteDelayMs: 0, blocksSaved: 0, writesThrottled: 0 };
  /** Saves in flight (their blocks will be in the container when they end). */
  activeSaves = 0;
  private readonly slotBuf = new Int32Array(MAX_SAVE_BLOCKS);

  constructor(
    readonly map: CopyMap,
    readonly device: Device,
    readonly container: Container,
    readonly slots: SlotAllocator,
    readonly blockSize: number,
    readonly volumeSize: number,
    readonly throttle: ThrottlePolicy,
    readonly sleepers: Sleepers,
    private readonly hooks: CbwHooks,
  ) {}

  /** undefined: the write may go now. A promise: the write goes when it resolves (it never rejects). */
  beforeWrite(offset: number, length: number): Promise<void> | undefined {
    if (!this.armed || length <= 0) return undefined;
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const end = Math.min(Math.floor((offset + length - 1) / bs) + 1, this.map.totalBlocks);
    if (this.ready === undefined && !this.map.needsWork(first, end)) return undefined;
    return this.slow(first, end);
  }

  private async slow(first: number, end: number): Promise<void> {
    const t0 = performance.now();
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
          const ms = throttleDelay(this.throttle, this.slots.fill);
          if (ms > 0) {
            throttled = true;
            st.writesThrottled++;
            this.hooks.urge(first, end);
            await this.sleepers.sleep(ms);
            continue;
          }
        }
        const want = Math.min(end - start, MAX_SAVE_BLOCKS);
        const got = this.slots.take(want, this.slotBuf);
        if (got === 0) {
          // Container full (FIG. 12): the copier copies these blocks or frees space; then look again.
          this.hooks.urge(first, end);
          await map.changed.wait();
          continue;
        }
        const task = map.claimRun(start, Math.min(end, start + got), 'save');
        if (!task) {
          for (let i = 0; i < got; i++) this.slots.give(this.slotBuf[i]!);
          continue;
        }
        const n = task.end - task.start;
        const mySlots = this.slotBuf.slice(0, n);
        for (let i = n; i < got; i++) this.slots.give(this.slotBuf[i]!);
        await this.save(task.start, n, mySlots);
        map.unlock(task);
      }
    } finally {
      st.writesWaiting--;
      const d = performance.now() - t0;
      if (d > st.worstWriteDelayMs) st.worstWriteDelayMs = d;
    }
  }

  /** Copies the originals of blocks [start, start+n) into `slots`; records them in the map. */
  private async save(start: number, n: number, slots: Int32Array): Promise<void> {
    const blocks = new Float64Array(n);
    const lengths = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      blocks[i] = start + i;
      lengths[i] = Math.min(this.blockSize, this.volumeSize - (start + i) * this.blockSize);
    }
    this.activeSaves++;
    try {
      const res = await this.container.save(this.device, blocks, lengths, slots, n);
      for (let i = 0; i < n; i++) {
        if (res[i] === 0) {
          this.map.markSaved(start + i, slots[i]!);
          this.stats.blocksSaved++;
        } else {
          this.slots.give(slots[i]!);
          this.map.markSaved(start + i, -1);
          this.hooks.badBlock(start + i, res[i]!);
        }
      }
    } catch (e) {
      // The container failed: the backup is lost, the write is not. Slots are not reused.
      for (let i = 0; i < n; i++) this.map.markSaved(start + i, -1);
      this.hooks.fail(e instanceof Error ? e : new Error(String(e)));
    } finally {
      this.activeSaves--;
    }
  }
}

function anyBusy(map: CopyMap, first: number, end: number): boolean {
  const b = map.busy.bytes;
  for (let i = first; i < end; i++) if ((b[i >>> 3]! & (1 << (i & 7))) !== 0) return true;
  return false;
}

/**
 * The permanent write hook of one export: the NBD backend is wrapped with it once (see
 * intercepting-backend.ts) and a backup attaches / detaches its CopyBeforeWrite. It also counts
 * writes in flight, so arming can wait for the writes that passed before the instant to land before
 * any original is read (no torn block).
 */
export class SnapshotGate implements WriteInterceptor {
  private cbw: CopyBeforeWrite | undefined;
  private entered = 0;
  private completed = 0;
  private drainTarget = 0;
  private drainResolve: (() => void) | undefined;

  /** When clients last wrote, their write rate and think time: the copier yields the device to them. */
  readonly activity = new WriteActivity();

  beforeChange(offset: number, length: number, _kind: ChangeKind): void | Promise<void> {
    this.entered++;
    this.activity.enter(performance.now());
    const c = this.cbw;
    if (c === undefined) return undefined;
    return c.beforeWrite(offset, length);
  }

  afterChange(_offset: number, _length: number, _kind: ChangeKind, _error: unknown): void {
    this.completed++;
    this.activity.exit(performance.now());
    if (this.drainResolve !== undefined && this.completed >= this.drainTarget) {
      const r = this.drainResolve;
      this.drainResolve = undefined;
      r();
    }
  }

  get active(): CopyBeforeWrite | undefined {
    return this.cbw;
  }

  /**
   * Arms: from now on every change goes through `cbw`. Returns a promise that resolves once every
   * write that entered before this call has completed (CBW reads wait for it too). Synchronous part
   * is O(1): it is what runs inside the freeze window.
   */
  attach(cbw: CopyBeforeWrite): Promise<void> {
    if (this.cbw) throw new Error('a snapshot is already armed on this export');
    this.cbw = cbw;
    cbw.armed = true;
    this.activity.setArmed(true, performance.now());
    if (this.completed >= this.entered) return Promise.resolve();
    this.drainTarget = this.entered;
    // Every later write waits in cbw.slow for `ready`, so none completes before the older ones.
    const drained = new Promise<void>((resolve) => { this.drainResolve = resolve; });
    cbw.ready = drained.then(() => { cbw.ready = undefined; });
    return cbw.ready;
  }

  /** Disarms: the hook becomes a no-op at once and every held write is released. */
  detach(cbw: CopyBeforeWrite): void {
    if (this.cbw !== cbw) return;
    this.cbw = undefined;
    cbw.armed = false;
    this.activity.setArmed(false, performance.now());
    if (this.drainResolve) { const r = this.drainResolve; this.drainResolve = undefined; r(); }
    cbw.sleepers.wakeAll();
    cbw.map.releaseAllWaiters();
  }
}
