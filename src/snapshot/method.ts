// A snapshot method fixes one instant of a volume and lends it out until released: arm() gives a
// point-in-time reader, release() ends it. Offline, freeze and copy-before-write are three methods
// hold (hold-method.ts) the fourth; every backup job runs the same way whichever it is (jobs/backup-job.ts).
import type { CopyPace, PointInTimeSource } from '../copy/engine';
import { CopyMap } from '../copy/copy-map';
import type { BlockReader, Device } from '../device/device';
import type { UsedBlockMap } from '../fs/used-map';
import type { Bitset } from '../util/bitset';
import { checkFreezeMount, freezeFs, type Frozen } from './freeze';

/** What a backup holds of the instant, at the snapshot's block size, and where the engine reads it. */
export interface Restricted {
  readonly blockSize: number;
  readonly used: Bitset;
  readonly source: PointInTimeSource;
}

/** Facts about the instant for the job's events and summary. */
export interface InstantFacts {
  /** The window writers were stopped for (FIFREEZE..FITHAW, or arming alone), in ms. */
  freezeMs?: number;
  /** The write-back before a freeze (writers still running), in ms. */
  presyncMs?: number;
  [k: string]: unknown;
}

export interface PointInTime {
  readonly instant: Date;
  /** Metadata reads as of the instant: the used-block map is read through it. */
  readonly reader: BlockReader;
  /** The blocks of `used` this backup holds, and the engine's source for them. */
  restrict(used: UsedBlockMap): Restricted;
  /** A fatal error of the snapshot itself (broken, cancelled, a bad original under "abort"). */
  failure(): Error | undefined;
  /** How the copy must pace itself for the sake of clients (copy-before-write), if at all. */
  readonly pace?: Omit<CopyPace, 'maxRate'>;
  /** The copy engine starts reading: the snapshot may urge it (blocks writers wait on). */
  copying?(engine: { urge(first: number, end: number): void; readonly urgentBlocks: number }): void;
  facts(): InstantFacts;
  /** Ends the instant (thaw, disarm) and frees what it holds. Idempotent; never throws on a failed path. */
  release(): Promise<void>;
  /** Ends the instant because of `e` (the job failed or was cancelled). */
  fail(e: Error): void;
}

export interface SnapshotMethod {
  readonly name: 'offline' | 'freeze' | 'online' | 'hold' | 'appliance';
  arm(): Promise<PointInTime>;
}

/** The whole map at its own block size, with a plain work map nobody else claims from. */
function deviceRestricted(device: Device, used: UsedBlockMap): Restricted {
  const map = new CopyMap(used.totalBlocks, false);
  map.pending.orWith(used.bitmap);
  return { blockSize: used.blockSize, used: used.bitmap, source: { device, map } };
}

/** Nothing writes the volume (unmounted, or mounted read-only): the device is the instant. */
export class OfflineMethod implements SnapshotMethod {
  readonly name = 'offline' as const;
  constructor(private readonly device: Device) {}

  async arm(): Promise<PointInTime> {
    const device = this.device;
    let err: Error | undefined;
    return {
      instant: new Date(),
      reader: device,
      restrict: (used) => deviceRestricted(device, used),
      failure: () => err,
      facts: () => ({}),
      release: async () => {},
      fail: (e) => { err ??= e; },
    };
  }
}

/** The file system on the volume is frozen (FIFREEZE) for the whole copy, thawed at release. */
export class FreezeMethod implements SnapshotMethod {
  readonly name = 'freeze' as const;
  constructor(private readonly device: Device, private readonly mountPoint: string) {}

  async arm(): Promise<PointInTime> {
    await checkFreezeMount(this.mountPoint, this.device);
    const frozen: Frozen = await freezeFs(this.mountPoint);
    const device = this.device;
    let err: Error | undefined;
    let frozenMs: number | undefined;
    return {
      instant: new Date(),
      reader: device,
      restrict: (used) => deviceRestricted(device, used),
      failure: () => err,
      facts: () => ({ freezeMs: frozenMs, presyncMs: frozen.presyncMs }),
      release: async () => { frozenMs = await frozen.thaw(); },
      fail: (e) => { err ??= e; },
    };
  }
}
