// The backup sink of `--to replica:PATH` (protocol: replica.ts and README.md here). A delta, and a
// full onto a device that holds a snapshot, are staged in the journal and applied once committed; a
// full to an image file is staged as PATH.livesnap-partial and renamed over it once committed; a
// full onto a device that holds nothing is written in place (there is no old state to keep).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../device/device';
import { withoutZeroRuns } from '../sink/image-sink';
import type { BackupIdentity, BackupSink, DataBatch, FinishInfo, VolumeInfo } from '../sink/sink';
import type { Bitset } from '../util/bitset';
import { syncDir } from '../util/durable-file';
import { UserError } from '../util/errors';
import { type ApplyOptions, applyJournal, settle } from './replica-apply';
import { type JournalHeader, type JournalPiece, JournalWriter, openJournal, readJournal } from './replica-journal';
import { dropMeta, faultStep, lockReplica, readMeta, replicaFiles, type ReplicaFiles, type ReplicaMeta, storageId, untrusted, writeMeta } from './replica-state';

type Mode = 'journal' | 'replace' | 'direct';
/** ZERO records per journal write (a fragmented free map can have millions of runs). */
const ZERO_RECORDS_PER_WRITE = 4096;
const ZERO_GROUP = 64;

/** [start, end) byte ranges of the set (or, with `invert`, clear) blocks, clamped to the volume. */
function* byteRuns(set: Bitset, blockSize: number, volumeSize: number, invert = false): Generator<[number, number]> {
  const total = set.size;
  let i = set.next(0, !invert);
  while (i < total) {
    const e = set.next(i, invert);
    const start = i * blockSize, end = Math.min(e * blockSize, volumeSize);
    if (end > start) yield [start, end];
    i = set.next(e, !invert);
  }
}

export class ReplicaSink implements BackupSink {
  readonly randomAccess = false;
  private files?: ReplicaFiles;
  private lock?: { release(): void };
  private mode?: Mode;
  private journal?: JournalWriter;
  private header?: JournalHeader;
  /** replace: the staged file; direct: the device. */
  private dev?: Device;
  private volume?: VolumeInfo;
  private used?: Bitset;
  private expected = 0;
  private received = 0;
  private lastEnd = 0;
  private committed = false;

  constructor(readonly target: string, private readonly opts: ApplyOptions = {}) {}

  get description(): string {
    return `replica ${this.target}`;
  }

  async begin(volume: VolumeInfo, used: Bitset): Promise<void> {
    if (volume.size % 512 !== 0 || volume.blockSize % 512 !== 0) {
      throw new UserError(`a replica keeps whole 512-byte sectors, and the volume is ${volume.size} bytes in ${volume.blockSize}-byte blocks`, 'back it up to an image or archive instead');
    }
    if (used.size !== volume.totalBlocks) throw new Error(`replica: the used map has ${used.size} blocks, the volume ${volume.totalBlocks}`);
    const b: Pick<BackupIdentity, 'id' | 'parent' | 'kind' | 'zeroed'> = volume.backup ?? { id: `full-${volume.snapshotTime.toISOString()}`, parent: null, kind: 'full' };
    if (b.id.length === 0 || b.id.length > 256) throw new UserError(`snapshot id "${b.id.slice(0, 40)}..." cannot name a replica's state (1 to 256 characters)`);
    const st = await fs.promises.stat(this.target).catch(() => undefined);
    if (st && !st.isFile() && !st.isBlockDevice()) throw new UserError(`replica ${this.target} is ${st.isDirectory() ? 'a directory' : 'neither a regular file nor a block device'}`, 'name an image file (made if missing) or a block device, e.g. replica:/backup/data.replica');
    const files = (this.files = replicaFiles(this.target));
    this.volume = volume;
    this.used = used;
    for (const [s, e] of byteRuns(used, volume.blockSize, volume.size)) this.expected += e - s;
    this.lock = await lockReplica(files);
    try {
      if (b.kind === 'incremental') await this.beginDelta(files, volume, b);
      else await this.beginFull(files, volume, b.id);
    } catch (e) {
      await this.abort(e as Error);
      throw e;
    }
  }

  private targetMeta(volume: VolumeInfo, id: string, storage: string): JournalHeader['target'] {
    return { snapshotId: id, instant: volume.snapshotTime.toISOString(), volumeSize: volume.size, blockSize: volume.blockSize, storage };
  }

  private async beginDelta(files: ReplicaFiles, volume: VolumeInfo, b: Pick<BackupIdentity, 'id' | 'parent' | 'zeroed'>): Promise<void> {
    const t = files.target;
    const full = `run a full backup to it ("livesnap backup <export> --to replica:${t}" is full when the replica does not hold the export's last backup)`;
    await settle(files, this.opts);
    const m = await readMeta(files);
    if ('bad' in m) throw untrusted(files, m.bad);
    if ('none' in m) throw new UserError(`the replica ${t} holds no snapshot, and this incremental backup (${b.id}) applies over snapshot ${b.parent}`, full);
    if (m.meta.snapshotId !== b.parent) throw new UserError(`the replica ${t} holds snapshot ${m.meta.snapshotId}, and this incremental backup (${b.id}) applies over snapshot ${b.parent}`, full);
    if (m.meta.volumeSize !== volume.size) throw new UserError(`the replica ${t} holds a volume of ${m.meta.volumeSize} bytes, and the volume is ${volume.size} bytes now`, full);
    if (b.zeroed && b.zeroed.size !== volume.totalBlocks) throw new Error(`replica: the zeroed map has ${b.zeroed.size} blocks, the volume ${volume.totalBlocks}`);
    this.mode = 'journal';
    this.header = { kind: 'delta', base: m.meta.snapshotId, target: this.targetMeta(volume, b.id, m.meta.storage) };
    await this.startJournal(files, this.header, b.zeroed ? byteRuns(b.zeroed, volume.blockSize, volume.size) : undefined);
  }

  private async beginFull(files: ReplicaFiles, volume: VolumeInfo, id: string): Promise<void> {
    let damaged = false;
    try {
      await settle(files, this.opts);
    } catch (e) {
      if (!(e instanceof UserError)) throw e;
      // A journal that cannot be rolled forward: the full rewrites every block, so it goes.
      await fs.promises.rm(files.journal, { force: true });
      await fs.promises.rm(files.partial, { force: true });
      await syncDir(path.dirname(files.journal));
      damaged = true;
    }
    const m = await readMeta(files);
    if (!files.isDevice) {
      if ((await storageId(files.target)) !== undefined && 'none' in m) {
        throw new UserError(`${files.target} exists and is not a livesnap replica (there is no ${files.meta})`, 'choose another path, or remove the file first');
      }
      this.mode = 'replace';
      faultStep('stage');
      await fs.promises.rm(files.partial, { force: true });
      this.dev = Device.open(files.partial, { write: true, create: true, allowBuffered: true });
      try {
        fs.ftruncateSync(this.dev.fd, volume.size);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EFBIG') throw e;
        throw new UserError(`the file system holding ${files.target} cannot hold a file of ${volume.size} bytes (ext4 stops at 16 TiB)`, 'keep the replica on XFS or btrfs, or on a device');
      }
      const sid = (await storageId(files.partial))!;
      this.header = { kind: 'replace', base: 'meta' in m ? m.meta.snapshotId : null, target: this.targetMeta(volume, id, sid), partial: sid };
      return;
    }
    const dev = Device.open(files.target, { write: true, exclusive: true });
    if (dev.size < volume.size) {
      const have = dev.size;
      dev.close();
      throw new UserError(`the replica device ${files.target} is too small: ${have} bytes, the volume needs ${volume.size}`, 'choose a device at least as large as the volume');
    }
    const sid = (await storageId(files.target))!;
    if ('meta' in m && !damaged) {
      // It holds a snapshot: that stays until the new full is committed, so the full is journaled too.
      dev.close();
      this.mode = 'journal';
      this.header = { kind: 'full', base: m.meta.snapshotId, target: this.targetMeta(volume, id, sid) };
      await this.startJournal(files, this.header, byteRuns(this.used!, volume.blockSize, volume.size, true));
      return;
    }
    // It holds nothing we vouch for: written in place, its metadata gone first (a crash leaves "empty").
    this.mode = 'direct';
    this.dev = dev;
    await dropMeta(files);
    this.header = { kind: 'full', base: null, target: this.targetMeta(volume, id, sid) };
  }

  private async startJournal(files: ReplicaFiles, header: JournalHeader, zeros?: Iterable<[number, number]>): Promise<void> {
    this.journal = await JournalWriter.create(files.journal, header);
    let chunk: JournalPiece[] = [];
    for (const [s, e] of zeros ?? []) {
      chunk.push({ type: 'zero', offset: s, length: e - s });
      if (chunk.length === ZERO_RECORDS_PER_WRITE) { await this.journal.append(chunk); chunk = []; }
    }
    await this.journal.append(chunk);
  }

  async write(batch: DataBatch): Promise<void> {
    const segs = batch.segments;
    const size = this.volume!.size;
    let bytes = 0;
    for (let i = 0; i < segs.length; i += 3) {
      const off = segs[i]!, len = segs[i + 1]!, at = segs[i + 2]!;
      if (!(off >= this.lastEnd) || off % 512 !== 0 || !(len > 0) || len % 512 !== 0 || off + len > size || !(at >= 0) || at + len > batch.buffer.byteLength) {
        throw new Error(`replica ${this.target}: segment ${off}+${len} (buffer ${at}) is out of order, not whole sectors, or outside the volume`);
      }
      this.lastEnd = off + len;
      bytes += len;
    }
    if (this.mode === 'journal') {
      const pieces: JournalPiece[] = [];
      for (let i = 0; i < segs.length; i += 3) pieces.push({ type: 'data', offset: segs[i]!, length: segs[i + 1]!, data: new Uint8Array(batch.buffer, segs[i + 2]!, segs[i + 1]!) });
      try {
        await this.journal!.append(pieces);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'ENOSPC' || code === 'EDQUOT') throw new UserError(`no space left for the replica's journal ${this.files!.journal} (it stages the ${this.expected} bytes of this backup)`, 'free space there; the replica still holds its snapshot');
        throw e;
      }
    } else {
      // A new staged file keeps all-zero pieces as holes; a device gets every byte.
      const s = this.mode === 'replace' ? withoutZeroRuns(batch.buffer, segs) : segs;
      faultStep(this.mode === 'replace' ? 'stage' : 'apply');
      if (s.length > 0) {
        const res = await this.dev!.writeBatch(batch.buffer, s);
        for (let i = 0; i < res.length; i++) {
          if (res[i] === s[i * 3 + 1]) continue;
          const errno = res[i]! < 0 ? -res[i]! : 28;
          throw new UserError(`writing ${this.mode === 'replace' ? this.files!.partial : this.target} failed at byte ${s[i * 3]} (${errno === 28 ? 'no space left' : `errno ${errno}`})`, 'the replica still holds its snapshot');
        }
      }
    }
    this.received += bytes;
  }

  async finish(info: FinishInfo): Promise<void> {
    const files = this.files!;
    if (this.received !== this.expected) throw new Error(`replica ${this.target}: ${this.received} bytes arrived, ${this.expected} were announced`);
    const bad = info.badBlocks.length;
    if (this.mode === 'direct') {
      await this.zeroFree();
      faultStep('sync-replica');
      await this.dev!.sync();
      this.dev!.close();
      this.dev = undefined;
      faultStep('metadata');
      const meta: ReplicaMeta = { ...this.header!.target, badBlocks: bad };
      await writeMeta(files, meta);
    } else {
      if (this.mode === 'replace') {
        faultStep('sync-partial');
        await this.dev!.sync();
        this.dev!.close();
        this.dev = undefined;
        await syncDir(path.dirname(files.partial));
        this.journal = await JournalWriter.create(files.journal, this.header!);
      }
      await this.journal!.commit(bad);
      this.committed = true;
      await this.journal!.close();
      this.journal = undefined;
      // Read back and checked like a recovery would, then applied by the same code.
      const src = await openJournal(files.journal);
      try {
        const j = await readJournal(src, files.journal);
        if (j.state !== 'committed') throw new Error(`replica journal ${files.journal} reads back uncommitted: ${j.why}`);
        await applyJournal(files, j, src, this.opts);
      } finally {
        await src.close();
      }
    }
    this.lock?.release();
    this.lock = undefined;
  }

  /** direct: the blocks not sent read as zeros (BLKZEROOUT), a group of ranges per step. */
  private async zeroFree(): Promise<void> {
    const v = this.volume!;
    let group: Array<[number, number]> = [];
    const flush = async () => {
      if (group.length === 0) return;
      faultStep('zero');
      await Promise.all(group.map(([s, e]) => this.dev!.zeroRange(s, e - s)));
      group = [];
    };
    for (const r of byteRuns(this.used!, v.blockSize, v.size, true)) {
      group.push(r);
      if (group.length === ZERO_GROUP) await flush();
    }
    await flush();
  }

  async abort(_reason: Error): Promise<void> {
    try {
      await this.journal?.close();
      this.journal = undefined;
      try { this.dev?.close(); } catch { /* closed */ }
      this.dev = undefined;
      // Not committed: the replica never changed (direct: it holds nothing). Committed: the journal
      // stays, and the next use of the replica rolls it forward.
      if (this.files && !this.committed && this.mode !== 'direct' && this.mode !== undefined) {
        await fs.promises.rm(this.files.journal, { force: true });
        if (this.mode === 'replace') await fs.promises.rm(this.files.partial, { force: true });
        await syncDir(path.dirname(this.files.journal));
      }
    } catch { /* abort never throws */ } finally {
      this.lock?.release();
      this.lock = undefined;
    }
  }
}
