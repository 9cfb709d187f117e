// The raw image sink: a sparse file (or a whole device) the size of the volume, written with O_DIRECT
// at the blocks' own offsets. A file target is written as "<target>.partial" and renamed only when
// complete, so an interrupted backup never leaves something that looks like a finished image.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../device/device';
import { isNativeError } from '../device/native';
import { syncDirSync } from '../util/durable-file';
import { UserError } from '../util/errors';
import type { BackupSink, DataBatch, FinishInfo, VolumeInfo } from './sink';

export interface ImageSinkOptions {
  /** Overwrite an existing target file. */
  force?: boolean;
}

export class ImageSink implements BackupSink {
  readonly randomAccess = true;
  private dev?: Device;
  private volumeSize = 0;
  private readonly workPath: string;
  private readonly isDevice: boolean;
  /** Writing over an earlier state (a chain's incrementals): zero blocks must be written too. */
  inPlace = false;

  constructor(readonly target: string, opts: ImageSinkOptions = {}) {
    let st: fs.Stats | undefined;
    try { st = fs.statSync(target); } catch { st = undefined; }
    if (st?.isDirectory()) throw new UserError(`target ${target} is a directory`, 'name a file, e.g. ' + target.replace(/\/$/, '') + '/volume.img');
    this.isDevice = !!st?.isBlockDevice();
    if (st && !this.isDevice && !st.isFile()) throw new UserError(`target ${target} is neither a regular file nor a block device`);
    if (st?.isFile() && !opts.force) throw new UserError(`target ${target} already exists`, 'choose another name, or pass --force to overwrite it');
    if (!st) {
      const dir = path.dirname(path.resolve(target));
      if (!fs.existsSync(dir)) throw new UserError(`the target's directory ${dir} does not exist`, `create it first (mkdir -p ${dir}), or choose another target`);
    }
    this.workPath = this.isDevice ? target : `${target}.partial`;
  }

  get description(): string {
    return this.isDevice ? `device ${this.target}` : `image ${this.target}`;
  }

  async begin(volume: VolumeInfo): Promise<void> {
    this.volumeSize = volume.size;
    if (this.isDevice) {
      this.dev = Device.open(this.target, { write: true, exclusive: true });
      if (this.dev.size < volume.size) {
        const have = this.dev.size;
        this.dev.close();
        throw new UserError(`target device ${this.target} is too small: ${have} bytes, the volume needs ${volume.size}`, 'choose a device at least as large as the volume');
      }
      return;
    }
    fs.rmSync(this.workPath, { force: true });
    this.dev = Device.open(this.workPath, { write: true, create: true });
    // The holes of a sparse file are the free blocks; set the size first so the file is sparse.
    try {
      fs.ftruncateSync(this.dev.fd, volume.size);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EFBIG') throw e;
      this.dev.close();
      this.dev = undefined;
      fs.rmSync(this.workPath, { force: true });
      throw new UserError(
        `the file system holding ${this.target} cannot hold a file of ${volume.size} bytes (ext4 stops at 16 TiB)`,
        'write the image to XFS or btrfs, to a device, or back up to an archive (.tar) instead',
      );
    }
  }

  async write(batch: DataBatch): Promise<void> {
    const dev = this.dev!;
    // In a new sparse file an all-zero block is already there as a hole: leave it one (a volume with
    // no known file system is copied whole, and its never-written areas read as zeros).
    const segments = this.isDevice || this.inPlace ? batch.segments : withoutZeroRuns(batch.buffer, batch.segments);
    if (segments.length === 0) return;
    const res = await dev.writeBatch(batch.buffer, segments);
    for (let i = 0; i < res.length; i++) {
      const want = segments[i * 3 + 1]!;
      if (res[i] === want) continue;
      const off = segments[i * 3]!;
      const errno = res[i]! < 0 ? -res[i]! : 28;
      if (errno === 28 /* ENOSPC */ || (res[i]! >= 0 && res[i]! < want)) {
        throw new UserError(`no space left on the file system holding ${this.target} (at byte ${off} of ${this.volumeSize})`, 'free space there or choose another target; the partial image was removed');
      }
      if (errno === 122 /* EDQUOT */) throw new UserError(`disk quota exceeded writing ${this.target}`);
      throw new UserError(`writing ${this.target} failed at byte ${off} (errno ${errno})`);
    }
  }

  /** [offset, offset+length) reads as zeros (a chain's zero ranges). */
  async zero(offset: number, length: number): Promise<void> {
    await this.dev!.zeroRange(offset, length);
  }

  async finish(_info: FinishInfo): Promise<void> {
    const dev = this.dev!;
    // Sector padding of an odd-sized volume's last block may have grown the file: cut it back.
    if (!this.isDevice) fs.ftruncateSync(dev.fd, this.volumeSize);
    try {
      await dev.sync();
    } catch (e) {
      throw isNativeError(e) && e.code === 'ENOSPC' ? new UserError(`no space left on the file system holding ${this.target}`) : e;
    }
    dev.close();
    this.dev = undefined;
    if (!this.isDevice) {
      fs.renameSync(this.workPath, this.target);
      syncDirSync(path.dirname(this.target));
    }
  }

  async abort(_reason: Error): Promise<void> {
    try { this.dev?.close(); } catch { /* already closed */ }
    this.dev = undefined;
    if (!this.isDevice) fs.rmSync(this.workPath, { force: true });
  }
}

const ZERO_GRAIN = 64 << 10;
const ZEROS = Buffer.alloc(ZERO_GRAIN);

/** The segments with their all-zero 64 KiB-aligned pieces cut out (so the file keeps those holes). */
export function withoutZeroRuns(buffer: ArrayBuffer, segments: Float64Array): Float64Array {
  const out: number[] = [];
  for (let i = 0; i < segments.length; i += 3) {
    const off = segments[i]!, len = segments[i + 1]!, at = segments[i + 2]!;
    let runStart = -1;
    for (let p = 0; p < len; p += ZERO_GRAIN) {
      const n = Math.min(ZERO_GRAIN, len - p);
      const zero = Buffer.from(buffer, at + p, n).equals(n === ZERO_GRAIN ? ZEROS : ZEROS.subarray(0, n));
      if (!zero && runStart < 0) runStart = p;
      if (zero && runStart >= 0) { out.push(off + runStart, p - runStart, at + runStart); runStart = -1; }
    }
    if (runStart >= 0) out.push(off + runStart, len - runStart, at + runStart);
  }
  return Float64Array.from(out);
}

