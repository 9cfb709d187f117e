// What an online backup of a served export holds, decided once: every backup starts a new change
// epoch at its instant (export/change-filter.ts); an incremental one holds the blocks changed since
// the parent AND used AND wanted (the protection map), a full one every used and wanted block. The
// snapshot method is wrapped: arming is bracketed by the epoch switch, restrict() narrows the block
// set, and release() commits the epoch (the backup completed) or merges it back (failed, cancelled).
import { randomBytes } from 'node:crypto';
import type { ChangeFilter } from '../export/change-filter';
import { usedAtBlockSize } from '../fs/used-map';
import { GRANULARITY } from '../incremental/change-map';
import { excludedBlockSet, type ProtectionSpec, resolveExcluded } from '../incremental/protection';
import type { BackupIdentity } from '../sink/sink';
import type { PointInTime, SnapshotMethod } from '../snapshot/method';
import { Bitset } from '../util/bitset';

export interface SelectionOptions {
  changes: ChangeFilter;
  /** The export's name (part of the backup id). */
  name: string;
  /** --incremental: only what changed since the parent (a first backup is full anyway, and says so). */
  incremental: boolean;
  protection: ProtectionSpec;
  /** A replica target: the snapshot it holds now (null: none); an incremental needs it to be the parent. */
  held?: string | null;
  /**
   * The target keeps the backup's id in a chain (an archive, a replica): it becomes the parent of
   * the next. Otherwise (a raw image, /dev/null) its epoch merges back, as if it had not run.
   */
  chained: boolean;
  /** Why the replica holds nothing usable (its metadata or journal could not be trusted). */
  heldUntrusted?: string;
  log?: (line: string) => void;
}

/** A backup id: the export, the time, and randomness (ids of two daemons never collide). */
export function newBackupId(name: string): string {
  return `${name}.${new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}.${randomBytes(4).toString('hex')}`;
}

export class SelectingMethod implements SnapshotMethod {
  readonly name: SnapshotMethod['name'];
  identity: BackupIdentity | undefined;
  /** Blocks changed in the closing epoch (at the snapshot block size), for the summary. */
  changedBlocks = 0;
  /** 64 KiB regions of the change map in the closing epoch. */
  changedRegions = 0;
  excludedFiles: string[] = [];
  readonly id: string;

  constructor(private readonly inner: SnapshotMethod, private readonly o: SelectionOptions, private readonly blockSize: number, private readonly totalBlocks: number) {
    this.name = inner.name;
    this.id = newBackupId(o.name);
  }

  async arm(): Promise<PointInTime> {
    const { changes, protection } = this.o;
    const bs = this.blockSize, total = this.totalBlocks;
    const wantsExclusion = !!protection.mount && (protection.patterns.length > 0 || protection.excludeSwap);
    const before = wantsExclusion ? await resolveExcluded(protection, true) : undefined;
    const parent = changes.map.base;
    const mapDistrust = changes.map.fullBecause;
    let pit: PointInTime;
    try {
      await changes.beginEpoch(this.id);
      pit = await this.inner.arm();
    } catch (e) {
      await changes.map.abandonEpoch().catch(() => {});
      throw e;
    }
    let failed = false;
    let settled = false;
    const settle = async (ok: boolean) => {
      if (settled) return;
      try {
        if (ok && this.o.chained) await changes.map.commitEpoch();
        else await changes.map.abandonEpoch();
      } catch (e) {
        // The epoch must not stay pending: merge it back (nothing lost), then report.
        await changes.map.abandonEpoch().catch(() => {});
        throw e;
      } finally {
        settled = true;
      }
    };
    try {
      const changed = await changes.freezeEpoch(bs, total);
      this.changedBlocks = changed.setCount;
      this.changedRegions = changes.map.changedRegions();
      let excluded = new Bitset(total);
      if (before) {
        const after = await resolveExcluded(protection, false);
        excluded = excludedBlockSet(before, bs, total);
        excluded.andWith(excludedBlockSet(after, bs, total));
        const names = new Set(after.files);
        this.excludedFiles = before.files.filter((f) => names.has(f));
      }
      let fullBecause: string | undefined;
      if (this.o.incremental) {
        if (mapDistrust) fullBecause = mapDistrust;
        else if (parent === null) fullBecause = 'this is the first backup of the export';
        else if (this.o.held !== undefined && this.o.held !== parent) fullBecause = this.o.held === null ? (this.o.heldUntrusted ? `the replica cannot be trusted: ${this.o.heldUntrusted}` : 'the replica holds no snapshot yet') : `the replica holds snapshot ${this.o.held}, not the last backup ${parent}`;
      }
      const kind: BackupIdentity['kind'] = this.o.incremental && !fullBecause ? 'incremental' : 'full';
      if (fullBecause) this.o.log?.(`full backup: ${fullBecause}`);
      return {
        ...pit,
        instant: pit.instant,
        reader: pit.reader,
        restrict: (map) => {
          const used = usedAtBlockSize(map, bs, total);
          const usedExcluded = used.clone();
          usedExcluded.andWith(excluded);
          // Left out now, maybe wanted later (an excluded file renamed to a wanted name writes no
          // data): they count as changed for the next backup, which looks at them again.
          changes.map.markBlocks(usedExcluded, bs);
          const wanted = used;
          wanted.andNot(excluded);
          let zeroed: Bitset | undefined;
          if (kind === 'incremental') {
            zeroed = changed.clone();
            wanted.andWith(changed);
            zeroed.andNot(wanted);
          }
          this.identity = {
            id: this.id, parent: kind === 'incremental' ? parent : null, kind, granularity: GRANULARITY,
            ...(fullBecause ? { fullBecause } : {}), ...(zeroed ? { zeroed } : {}), excludedBytes: usedExcluded.setCount * bs,
          };
          return pit.restrict({ ...map, blockSize: bs, totalBlocks: total, bitmap: wanted, usedBlocks: wanted.setCount, allBlocks: false });
        },
        fail: (e) => { failed = true; pit.fail(e); },
        release: async () => {
          await pit.release();
          await settle(!failed && !pit.failure());
        },
      };
    } catch (e) {
      pit.fail(e as Error);
      await pit.release().catch(() => {});
      await settle(false).catch(() => {});
      throw e;
    }
  }
}
