// The raw image sink: a sparse file (or a whole device) the size of the volume, written with O_DIRECT
// at the blocks' own offsets. A file target is written as "<target>.partial" and renamed only when
// complete, so an interrupted backup never leaves something that looks like a finished image.
import * as fs from 'node:fs';
import { Device } from '../device/device';
import { isNativeError } from '../device/native';
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

  constructor(readonly target: string, private readonly opts: ImageSinkOptions = {}) {
    let st: fs.Stats | undefined;
    try { st = fs.statSync(target); } catch { st = undefined; }
    if (st?.isDirectory()) throw new UserError(`target ${target} is a directory`, 'name a file, e.g. ' + target.replace(/\/$/, '') + '/volume.img');
    this.isDevice = !!st?.isBlockDevice();
    if (st && !this.isDevice && !st.isFile()) throw new UserError(`target ${target} is neither a regular file nor a block device`);
    if (st?.isFile() && !opts.force) throw new UserError(`target ${target} already exists`, 'choose another name, or pass --force to overwrite it');
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
    fs.ftruncateSync(this.dev.fd, volume.size);
  }

  async write(batch: DataBatch): Promise<void> {
    const dev = this.dev!;
    const res = await dev.writeBatch(batch.buffer, batch.segments);
    for (let i = 0; i < res.length; i++) {
      const want = batch.segments[i * 3 + 1]!;
      if (res[i] === want) continue;
      const off = batch.segments[i * 3]!;
      const errno = res[i]! < 0 ? -res[i]! : 28;
      if (errno === 28 /* ENOSPC */ || (res[i]! >= 0 && res[i]! < want)) {
        throw new UserError(`no space left on the file system holding ${this.target} (at byte ${off} of ${this.volumeSize})`, 'free space there or choose another target; the partial image was removed');
      }
      if (errno === 122 /* EDQUOT */) throw new UserError(`disk quota exceeded writing ${this.target}`);
      throw new UserError(`writing ${this.target} failed at byte ${off} (errno ${errno})`);
    }
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
      syncDir(this.target);
    }
  }

  async abort(_reason: Error): Promise<void> {
    try { this.dev?.close(); } catch { /* already closed */ }
    this.dev = undefined;
    if (!this.isDevice) fs.rmSync(this.workPath, { force: true });
  }
}

function syncDir(file: string): void {
  const dir = require('node:path').dirname(file) as string;
  try {
    const fd = fs.openSync(dir, 'r');
    try { fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
  } catch { /* best effort: not every file system allows fsync on a directory */ }
}
