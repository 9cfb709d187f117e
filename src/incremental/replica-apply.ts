// Rolling a committed journal forward (the normal end of a backup and the recovery after a crash
// are the same code), and what recovery, status and the backup's choice of full/incremental read.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../device/device';
import { giveAligned, takeAligned } from '../device/memory';
import { syncDir } from '../util/durable-file';
import { errorText, UserError } from '../util/errors';
import { type CommittedJournal, JournalDamagedError, type JournalEntry, type JournalSource, openJournal, readJournal } from './replica-journal';
import { faultStep, fileStamp, lockReplica, readMeta, replicaBusy, type ReplicaFiles, replicaFiles, type ReplicaMeta, storageId, untrusted, writeMeta } from './replica-state';

export const DEFAULT_APPLY_BATCH = 8 << 20;
/** Zero ranges issued at once (BLKZEROOUT / hole punches: one call each, so a group per step). */
const ZERO_GROUP = 64;

export interface ApplyOptions {
  /** Bytes of journal data per write batch (tests make it small to have many crash points). */
  batchBytes?: number;
}

const exists = (p: string) => fs.promises.access(p).then(() => true, () => false);

/**
 * Applies a checked, committed journal: every range in journal order (idempotent: absolute data and
 * zeros), fdatasync, then the new metadata, then the journal goes. Returns the new metadata.
 */
export async function applyJournal(files: ReplicaFiles, j: CommittedJournal, src: JournalSource, opts: ApplyOptions = {}): Promise<ReplicaMeta> {
  const h = j.header;
  if (h.kind === 'replace') {
    // The staged file is renamed over the target, unless that already happened (same inode).
    if ((await storageId(files.partial)) === h.partial) {
      faultStep('rename');
      await fs.promises.rename(files.partial, files.target);
      await syncDir(path.dirname(files.target));
    } else if ((await storageId(files.target)) !== h.partial) {
      throw new UserError(`the replica journal ${files.journal} commits the full backup staged in ${files.partial}, and that file is gone`, `run a full backup to the replica; remove ${files.journal} first`);
    }
  } else {
    const now = await storageId(files.target);
    if (now !== h.target.storage) {
      throw new UserError(`the replica journal ${files.journal} was made for ${h.target.storage}, and ${files.target} is ${now ?? 'missing'}`, `put the replica back where it was, or remove ${files.journal} and run a full backup to it`);
    }
    const dev = Device.open(files.target, { write: true, exclusive: files.isDevice, allowBuffered: true });
    try {
      if (dev.size < h.target.volumeSize) throw new UserError(`the replica ${files.target} is ${dev.size} bytes, the journal writes up to ${h.target.volumeSize}`);
      await applyRanges(dev, files, j.entries, src, opts.batchBytes ?? DEFAULT_APPLY_BATCH);
      faultStep('sync-replica');
      await dev.sync();
    } finally {
      dev.close();
    }
  }
  const meta: ReplicaMeta = { ...h.target, badBlocks: j.commit.badBlocks };
  if (!files.isDevice) meta.fileStamp = await fileStamp(files.target);
  faultStep('metadata');
  await writeMeta(files, meta);
  await dropJournal(files);
  return meta;
}

async function applyRanges(dev: Device, files: ReplicaFiles, entries: readonly JournalEntry[], src: JournalSource, batchBytes: number): Promise<void> {
  const align = Math.max(4096, dev.alignment);
  const cap = Math.max(align, Math.floor(batchBytes / align) * align);
  const buf = takeAligned(cap);
  const segs: number[] = [];
  const zeros: JournalEntry[] = [];
  let fill = 0;
  const flushData = async () => {
    if (segs.length === 0) return;
    faultStep('apply');
    const s = Float64Array.from(segs);
    const res = await dev.writeBatch(buf, s);
    for (let i = 0; i < res.length; i++) {
      if (res[i] === s[i * 3 + 1]) continue;
      const errno = res[i]! < 0 ? -res[i]! : 28;
      throw new UserError(`writing the replica ${files.target} failed at byte ${s[i * 3]} (${errno === 28 ? 'no space left' : `errno ${errno}`})`, `the journal ${files.journal} is kept: mend the target, then "livesnap replica recover ${files.target}"`);
    }
    segs.length = 0;
    fill = 0;
  };
  const flushZeros = async () => {
    if (zeros.length === 0) return;
    faultStep('zero');
    // A file gets holes back (free blocks cost no space); a device BLKZEROOUT (reads as zeros, unlike a discard).
    await Promise.all(zeros.map((z) => (files.isDevice ? dev.zeroRange(z.offset, z.length) : dev.discard(z.offset, z.length))));
    zeros.length = 0;
  };
  try {
    for (const e of entries) {
      if (e.offset % dev.alignment !== 0 || e.length % dev.alignment !== 0) {
        throw new UserError(`the replica ${files.target} needs ${dev.alignment}-byte aligned writes, and the journal has the range ${e.offset}+${e.length}`, 'keep the replica on a device or file system with 512-byte sectors');
      }
      if (e.type === 'zero') {
        await flushData();
        zeros.push(e);
        if (zeros.length >= ZERO_GROUP) await flushZeros();
        continue;
      }
      await flushZeros();
      for (let done = 0; done < e.length;) {
        if (fill === cap) await flushData();
        const n = Math.min(e.length - done, cap - fill);
        await src.readInto(new Uint8Array(buf, fill, n), e.at + done);
        segs.push(e.offset + done, n, fill);
        fill = Math.ceil((fill + n) / align) * align;
        done += n;
      }
    }
    await flushData();
    await flushZeros();
  } finally {
    giveAligned(buf);
  }
}

async function dropJournal(files: ReplicaFiles): Promise<void> {
  faultStep('drop-journal');
  await fs.promises.rm(files.journal, { force: true });
  await syncDir(path.dirname(files.journal));
}

export type Settled = { action: 'none' | 'rolled-forward' | 'dropped-uncommitted' };

/**
 * Brings the replica to a consistent state (caller holds the lock): a committed journal is rolled
 * forward, an uncommitted one (and a staged full that was never committed) dropped.
 */
export async function settle(files: ReplicaFiles, opts: ApplyOptions = {}): Promise<Settled> {
  if (!(await exists(files.journal))) {
    if (!(await exists(files.partial))) return { action: 'none' };
    faultStep('drop-partial');
    await fs.promises.rm(files.partial, { force: true });
    await syncDir(path.dirname(files.partial));
    return { action: 'dropped-uncommitted' };
  }
  const src = await openJournal(files.journal);
  try {
    const j = await readJournal(src, files.journal);
    if (j.state === 'uncommitted') {
      await fs.promises.rm(files.partial, { force: true });
      await dropJournal(files);
      return { action: 'dropped-uncommitted' };
    }
    const m = await readMeta(files, { midApply: true });
    const h = j.header;
    // Killed after the new metadata was written, before the journal went: the apply is complete.
    if ('meta' in m && m.meta.snapshotId === h.target.snapshotId) {
      await dropJournal(files);
      return { action: 'rolled-forward' };
    }
    if (h.kind === 'delta') {
      if ('bad' in m) throw untrusted(files, `${m.bad}; the committed journal ${files.journal} applies over snapshot ${h.base} and cannot be rolled forward`);
      if ('none' in m) throw new UserError(`the replica journal ${files.journal} applies over snapshot ${h.base}, and the replica's metadata ${files.meta} is gone`, `run a full backup to the replica; remove ${files.journal} first`);
      if (m.meta.snapshotId !== h.base) throw new UserError(`the replica journal ${files.journal} applies over snapshot ${h.base}, and the replica holds ${m.meta.snapshotId}`, `run a full backup to the replica; remove ${files.journal} first`);
    }
    await applyJournal(files, j, src, opts);
    return { action: 'rolled-forward' };
  } finally {
    await src.close();
  }
}

const nothingThere = async (files: ReplicaFiles) =>
  !(await exists(files.target)) && !(await exists(files.meta)) && !(await exists(files.journal)) && !(await exists(files.partial));

export interface RecoverResult {
  action: 'none' | 'rolled-forward' | 'dropped-uncommitted';
  snapshotId: string | null;
}

/** `livesnap replica recover`: roll forward or drop what an interrupted apply left; then what the replica holds. */
export async function recoverReplica(target: string, opts: ApplyOptions = {}): Promise<RecoverResult> {
  const files = replicaFiles(target);
  if (await nothingThere(files)) return { action: 'none', snapshotId: null };
  const lock = await lockReplica(files);
  try {
    const { action } = await settle(files, opts);
    const m = await readMeta(files);
    if ('bad' in m) throw untrusted(files, m.bad);
    return { action, snapshotId: 'meta' in m ? m.meta.snapshotId : null };
  } finally {
    lock.release();
  }
}

export interface ReplicaStatus {
  snapshotId: string | null;
  instant: string | null;
  state: 'consistent' | 'needs-recovery' | 'empty';
  volumeSize?: number;
  blockSize?: number;
  /** Size of the journal an interrupted (or running) apply left. */
  journalBytes?: number;
  /** A backup or recovery holds the replica's lock right now. */
  busy: boolean;
  /** Where the state files are. */
  metadata: string;
  journal: string;
}

/** What the replica holds, read only (nothing is recovered or changed). */
export async function replicaStatus(target: string): Promise<ReplicaStatus> {
  const files = replicaFiles(target);
  const busy = await replicaBusy(files);
  const journal = await fs.promises.stat(files.journal).catch(() => undefined);
  const pending = journal !== undefined || (await exists(files.partial));
  const m = await readMeta(files, { midApply: pending });
  if ('bad' in m && !pending) throw untrusted(files, m.bad);
  const meta = 'meta' in m ? m.meta : undefined;
  return {
    snapshotId: meta?.snapshotId ?? null,
    instant: meta?.instant ?? null,
    state: pending ? 'needs-recovery' : meta ? 'consistent' : 'empty',
    ...(meta ? { volumeSize: meta.volumeSize, blockSize: meta.blockSize } : {}),
    ...(journal ? { journalBytes: journal.size } : {}),
    busy,
    metadata: files.meta,
    journal: files.journal,
  };
}

/**
 * What the replica holds, for the choice of full or incremental: recovered first if an apply was
 * interrupted. `untrusted` says why it holds nothing usable (a full backup then rewrites it).
 */
export async function replicaHolding(target: string): Promise<{ snapshotId: string | null; untrusted?: string }> {
  const files = replicaFiles(target);
  if (await nothingThere(files)) return { snapshotId: null };
  const lock = await lockReplica(files);
  try {
    try {
      await settle(files);
    } catch (e) {
      if (e instanceof JournalDamagedError || e instanceof UserError) return { snapshotId: null, untrusted: errorText(e) };
      throw e;
    }
    const m = await readMeta(files);
    if ('bad' in m) return { snapshotId: null, untrusted: `its metadata ${files.meta} cannot be trusted: ${m.bad}` };
    return { snapshotId: 'meta' in m ? m.meta.snapshotId : null };
  } finally {
    lock.release();
  }
}

/** The snapshot id a consistent replica holds (recovered first if needed); null if none, new, or not trusted. */
export async function replicaHolds(target: string): Promise<string | null> {
  return (await replicaHolding(target)).snapshotId;
}
