// Where a replica's state lives and what it says: its files (beside an image file; for a block
// device under the state root, since /dev is a tmpfs that forgets), the sealed metadata naming the
// snapshot it holds and the storage it belongs to, the lock against two writers, and the steps the
// test fault injection counts.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { config } from '../config';
import { Device } from '../device/device';
import { sealed, unsealed } from '../device/sealed-json';
import { syncDir, writeFileDurably } from '../util/durable-file';
import { UserError } from '../util/errors';

const FORMAT = 'livesnap-replica';
const VERSION = 1;
/** Longest snapshot id accepted from a file (ids are short; a huge one is damage). */
const MAX_ID = 256;

export interface ReplicaFiles {
  /** The replica itself: an image file or a block device (symlinks resolved). */
  readonly target: string;
  readonly isDevice: boolean;
  /** Sealed JSON: the snapshot the replica holds (see ReplicaMeta). */
  readonly meta: string;
  /** The staged delta and its commit record, while an apply is under way. */
  readonly journal: string;
  /** A full backup to an image file is written here, then renamed over the target. */
  readonly partial: string;
  /** flock'ed by whoever writes or recovers the replica. */
  readonly lock: string;
}

export function replicaFiles(target: string): ReplicaFiles {
  let t = path.resolve(target);
  let isDevice = false;
  try {
    t = fs.realpathSync(t);
    isDevice = fs.statSync(t).isBlockDevice();
  } catch { /* not there yet: an image file to create */ }
  const base = isDevice ? path.join(config().stateRoot, 'replicas', encodeURIComponent(t)) : t;
  return { target: t, isDevice, meta: `${base}.livesnap-replica.json`, journal: `${base}.livesnap-journal`, partial: `${t}.livesnap-partial`, lock: `${base}.livesnap-lock` };
}

/** What a consistent replica holds. */
export interface ReplicaMeta {
  snapshotId: string;
  /** The snapshot instant, ISO 8601. */
  instant: string;
  volumeSize: number;
  blockSize: number;
  /** The storage the replica is: "file:DEV:INO" or "block:RDEV" (see storageId). */
  storage: string;
  /** An image file's mtime and size after livesnap last wrote it: anything else wrote it since. */
  fileStamp?: string;
  /** Blocks that could not be read and hold zeros. */
  badBlocks: number;
}

/** The identity of the file or device at `p` (exact: bigint stat), or undefined if there is none. */
export async function storageId(p: string): Promise<string | undefined> {
  const st = await fs.promises.stat(p, { bigint: true }).catch(() => undefined);
  if (!st) return undefined;
  if (st.isBlockDevice()) return `block:${st.rdev}`;
  return st.isFile() ? `file:${st.dev}:${st.ino}` : `other:${st.dev}:${st.ino}`;
}

export async function fileStamp(p: string): Promise<string | undefined> {
  const st = await fs.promises.stat(p, { bigint: true }).catch(() => undefined);
  return st?.isFile() ? `${st.mtimeNs}:${st.size}` : undefined;
}

function seal(body: ReplicaMeta): string {
  return JSON.stringify(sealed({ format: FORMAT, version: VERSION, ...body }), null, 1) + '\n';
}

const isId = (v: unknown): v is string => typeof v === 'string' && v.length > 0 && v.length <= MAX_ID;
const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

/** Field checks shared with the journal's header: a ReplicaMeta, or what is wrong with it. */
export function checkMetaFields(j: Record<string, unknown>): ReplicaMeta | string {
  if (!isId(j.snapshotId)) return 'no valid snapshotId';
  if (typeof j.instant !== 'string' || Number.isNaN(Date.parse(j.instant))) return 'no valid instant';
  if (!isCount(j.volumeSize) || j.volumeSize === 0 || j.volumeSize % 512 !== 0) return `volumeSize ${String(j.volumeSize)} is not a positive multiple of 512`;
  if (!isCount(j.blockSize) || j.blockSize === 0 || j.blockSize % 512 !== 0) return `blockSize ${String(j.blockSize)} is not a positive multiple of 512`;
  if (typeof j.storage !== 'string' || !/^(file:\d+:\d+|block:\d+)$/.test(j.storage)) return 'no valid storage identity';
  if (j.fileStamp !== undefined && (typeof j.fileStamp !== 'string' || !/^\d+:\d+$/.test(j.fileStamp))) return 'no valid fileStamp';
  if (!isCount(j.badBlocks)) return 'no valid badBlocks';
  return {
    snapshotId: j.snapshotId, instant: j.instant, volumeSize: j.volumeSize, blockSize: j.blockSize, storage: j.storage,
    ...(j.fileStamp !== undefined ? { fileStamp: j.fileStamp as string } : {}), badBlocks: j.badBlocks,
  };
}

export type MetaRead = { meta: ReplicaMeta } | { none: true } | { bad: string };

/**
 * The metadata as read and checked against the replica as it is now: sealed (format, version,
 * checksum), every field sane, and naming this very file or device at the recorded size.
 * `midApply`: a committed journal is being rolled forward, whose own writes changed the file's stamp.
 */
export async function readMeta(files: ReplicaFiles, opts: { midApply?: boolean } = {}): Promise<MetaRead> {
  let text: string;
  try { text = await fs.promises.readFile(files.meta, 'utf8'); } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { none: true };
    return { bad: `cannot be read (${(e as Error).message})` };
  }
  let j: Record<string, unknown>;
  try { j = JSON.parse(text) as Record<string, unknown>; } catch { return { bad: 'not JSON (torn or overwritten)' }; }
  if (typeof j !== 'object' || j === null || Array.isArray(j)) return { bad: 'not a JSON object' };
  if (j.format !== FORMAT) return { bad: `not a livesnap replica file (format ${String(j.format)})` };
  if (j.version !== VERSION) return { bad: `version ${String(j.version)}, this livesnap reads ${VERSION}` };
  const rest = unsealed(j);
  if (!rest) return { bad: 'checksum mismatch (damaged or edited)' };
  const meta = checkMetaFields(rest);
  if (typeof meta === 'string') return { bad: meta };
  const now = await storageId(files.target);
  if (now === undefined) return { bad: `the replica ${files.target} is gone` };
  if (now !== meta.storage) return { bad: `it names another ${meta.storage.startsWith('block:') ? 'device' : 'file'} (${meta.storage}) than ${files.target} (${now})` };
  if (files.isDevice) {
    const size = await blockDeviceSize(files.target);
    if (size !== undefined && size < meta.volumeSize) return { bad: `the device is ${size} bytes now, smaller than the volume (${meta.volumeSize})` };
  } else if (!opts.midApply && meta.fileStamp !== undefined && (await fileStamp(files.target)) !== meta.fileStamp) {
    return { bad: `${files.target} was modified (or resized) since livesnap last wrote it` };
  }
  return { meta };
}

async function blockDeviceSize(p: string): Promise<number | undefined> {
  try {
    const d = await Device.openAsync(p, { direct: false });
    try { return d.size; } finally { d.close(); }
  } catch { return undefined; }
}

export async function writeMeta(files: ReplicaFiles, meta: ReplicaMeta): Promise<void> {
  await ensureStateDir(files);
  await writeFileDurably(files.meta, seal(meta));
}

/** Removes the metadata durably (the replica then holds no snapshot). */
export async function dropMeta(files: ReplicaFiles): Promise<void> {
  await fs.promises.rm(files.meta, { force: true });
  await syncDir(path.dirname(files.meta));
}

async function ensureStateDir(files: ReplicaFiles): Promise<void> {
  if (!files.isDevice) return;
  try {
    await fs.promises.mkdir(path.dirname(files.meta), { recursive: true, mode: 0o700 });
  } catch (e) {
    throw new UserError(`cannot create ${path.dirname(files.meta)} for the replica's state: ${(e as Error).message}`, 'set LIVESNAP_STATE_DIR to a writable directory');
  }
}

export function untrusted(files: ReplicaFiles, why: string): UserError {
  return new UserError(
    `the replica's metadata ${files.meta} cannot be trusted: ${why}`,
    `run a full backup to it ("livesnap backup <export> --to replica:${files.target}" after which it holds that snapshot); nothing was changed`,
  );
}

/** The exclusive lock of a writer or a recovery; refused at once (never waits) when held. */
export async function lockReplica(files: ReplicaFiles): Promise<{ release(): void }> {
  await ensureStateDir(files);
  let d: Device;
  try { d = Device.open(files.lock, { write: true, create: true, direct: false }); } catch (e) {
    throw new UserError(`cannot create the replica's lock file ${files.lock}: ${(e as Error).message}`, 'the directory holding the replica must be writable');
  }
  if (!d.tryLock('exclusive')) {
    d.close();
    throw new UserError(`the replica ${files.target} is in use by another livesnap (a backup or recovery is writing it)`, 'wait for it to end, see "livesnap status"');
  }
  return { release: () => d.close() };
}

/** True when a writer holds the replica's lock now (a status reader takes nothing). */
export async function replicaBusy(files: ReplicaFiles): Promise<boolean> {
  if (!fs.existsSync(files.lock)) return false;
  let d: Device;
  try { d = await Device.openAsync(files.lock, { direct: false }); } catch { return false; }
  try { return !d.tryLock('shared'); } finally { d.close(); }
}

// ---- test fault injection (LIVESNAP_TEST_KILL_AT=replica:N, see config.ts) ----

let steps = 0;
const labels: string[] = [];

/** Called before each I/O step of staging, commit, apply, metadata and cleanup: the N-th one kills the process. */
export function faultStep(label: string): void {
  const k = config().testKillAt;
  if (!k) return;
  steps++;
  labels.push(label);
  if (steps === k.step) process.kill(process.pid, 'SIGKILL');
}

/** The steps taken so far in this process, in order (recorded only while the knob is set). */
export function faultStepsTaken(): readonly string[] {
  return labels;
}
