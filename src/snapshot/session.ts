// One snapshot of one served volume, from arming to release (seed 001 FIG. 13): prepare the map
// (every block pending: allocated and filled BEFORE any freeze), arm (O(1): attach the write hook),
// refine the pending set with the used-block map read through the snapshot view, copy, disarm.
import { type ErrorPolicy, UnreadableBlockError } from '../copy/errors';
import type { Device } from '../device/device';
import { type UsedBlockMap, usedAtBlockSize } from '../fs/used-map';
import { Bitset } from '../util/bitset';
import type { SnapshotFilter } from '../export/snapshot-filter';
import { type CbwStats, CopyBeforeWrite } from './cbw';
import type { Container } from './container';
import { CopyMap } from '../copy/copy-map';
import { SnapshotView } from './snapshot-view';
import { DEFAULT_THROTTLE, Sleepers, type ThrottlePolicy } from './throttle';

export interface SessionOptions {
  device: Device;
  gate: SnapshotFilter;
  container: Container;
  onError?: ErrorPolicy;
  throttle?: Partial<ThrottlePolicy>;
}

export interface SnapshotStats extends CbwStats {
  state: 'prepared' | 'armed' | 'copying' | 'disarmed';
  armedAt?: string;
  blockSize: number;
  totalBlocks: number;
  /** Blocks still to copy (not yet read from the device nor saved). */
  pendingBlocks: number;
  containerKind: string;
  containerCapacityBytes: number;
  containerUsedBytes: number;
  containerPeakBytes: number;
  /** Blocks the copier read because a writer was waiting on them. */
  urgentBlocks: number;
  prepareMs: number;
  freezeMs?: number;
}

export class SnapshotSession {
  readonly blockSize: number;
  readonly totalBlocks: number;
  readonly volumeSize: number;
  readonly map: CopyMap;
  readonly cbw: CopyBeforeWrite;
  readonly view: SnapshotView;
  readonly sleepers = new Sleepers();
  readonly prepareMs: number;
  /** Blocks of the device the container occupies (inside container): never copied, never CoW. */
  readonly excluded: Bitset;
  /** The copy engine once it runs: blocks writers wait on are urged to it. */
  private copier: { urge(first: number, end: number): void; readonly urgentBlocks: number } | undefined;
  private stateNow: SnapshotStats['state'] = 'prepared';
  private armedAtNow: Date | undefined;
  private freezeMsNow: number | undefined;
  private error: Error | undefined;
  private readonly onError: ErrorPolicy;
  private released = false;

  constructor(readonly opts: SessionOptions) {
    const { device, container } = opts;
    this.onError = opts.onError ?? 'abort';
    this.blockSize = container.blockSize;
    this.volumeSize = device.size;
    this.totalBlocks = Math.ceil(this.volumeSize / this.blockSize);
    const t0 = performance.now();
    this.map = new CopyMap(this.totalBlocks, true);
    this.prepareMs = performance.now() - t0;
    this.excluded = new Bitset(this.totalBlocks);
    for (const r of container.excludedRanges()) {
      this.excluded.setRange(Math.floor(r.offset / this.blockSize), Math.floor((r.offset + r.length) / this.blockSize));
    }
    this.map.pending.andNot(this.excluded);
    const throttle = { ...DEFAULT_THROTTLE, ...opts.throttle };
    this.cbw = new CopyBeforeWrite(this.map, device, container, this.blockSize, this.volumeSize, throttle, this.sleepers, {
      urge: (f, e) => this.copier?.urge(f, e),
      badBlock: (block, errno) => {
        if (this.onError === 'abort') this.fail(new UnreadableBlockError(block, block * this.blockSize, device.path, errno));
      },
      fail: (e) => this.fail(e),
    });
    this.view = new SnapshotView(this.map, device, container, this.blockSize);
  }

  /**
   * Fixes the instant: from the return of this call every change to the volume goes through
   * copy-before-write. Synchronous and O(1) (this is what runs inside a freeze window). The promise
   * resolves when the writes that were already in flight have landed.
   */
  arm(): Promise<void> {
    if (this.stateNow !== 'prepared') throw new Error(`cannot arm a snapshot that is ${this.stateNow}`);
    const drained = this.opts.gate.attach(this.cbw);
    this.armedAtNow = new Date();
    this.stateNow = 'armed';
    return drained;
  }

  get state(): SnapshotStats['state'] { return this.stateNow; }
  get armedAt(): Date | undefined { return this.armedAtNow; }

  /** How long the freeze window around arm() lasted (set by whoever froze). */
  recordFreeze(ms: number): void { this.freezeMsNow = ms; }

  /** The copy engine starts: from now on it copies the blocks writers wait on first. */
  copying(engine: { urge(first: number, end: number): void; readonly urgentBlocks: number }): void {
    this.copier = engine;
    if (this.stateNow === 'armed') this.stateNow = 'copying';
  }

  /**
   * Narrows the pending set to the blocks the backup holds: the used map (any block size) minus
   * the container's own blocks. Returns that set at the snapshot's block size (the sink's map).
   */
  refine(usedMap: UsedBlockMap): Bitset {
    const used = usedAtBlockSize(usedMap, this.blockSize, this.totalBlocks);
    used.andNot(this.excluded);
    this.map.pending.andWith(used);
    // Originals saved before the map was known that the backup does not hold: give the space back.
    const c = this.opts.container;
    for (const blk of [...c.blocks()]) {
      if (!used.get(blk)) { this.map.unsave(blk); c.drop(blk); }
    }
    for (let blk = this.map.bad.next(0, true); blk < this.totalBlocks; blk = this.map.bad.next(blk + 1, true)) {
      if (!used.get(blk)) this.map.unsave(blk);
    }
    this.map.changed.notify();
    return used;
  }

  /** Ends the snapshot because of `e` (cancel, target failure, bad block under "abort"). Idempotent. */
  fail(e: Error): void {
    this.error ??= e;
    this.disarm();
  }

  get failure(): Error | undefined {
    return this.error;
  }

  /** Writes stop being intercepted at once; every held write is released. */
  disarm(): void {
    if (this.stateNow === 'disarmed') return;
    this.stateNow = 'disarmed';
    this.opts.gate.detach(this.cbw);
  }

  /** After disarm: waits for saves still in flight, then frees the container. Idempotent. */
  async release(): Promise<void> {
    this.disarm();
    if (this.released) return;
    this.released = true;
    while (this.cbw.activeSaves > 0) await this.map.changed.wait();
    await this.opts.container.close();
  }

  stats(): SnapshotStats {
    const c = this.opts.container;
    return {
      ...this.cbw.stats,
      state: this.stateNow,
      armedAt: this.armedAtNow?.toISOString(),
      blockSize: this.blockSize,
      totalBlocks: this.totalBlocks,
      pendingBlocks: this.stateNow === 'disarmed' ? 0 : this.map.pending.setCount,
      containerKind: c.kind,
      containerCapacityBytes: c.capacity * this.blockSize,
      containerUsedBytes: c.used * this.blockSize,
      containerPeakBytes: c.peak * this.blockSize,
      urgentBlocks: this.copier?.urgentBlocks ?? 0,
      prepareMs: this.prepareMs,
      freezeMs: this.freezeMsNow,
    };
  }
}

