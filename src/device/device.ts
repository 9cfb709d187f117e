// A block device or regular file opened for direct I/O, with the checks a user needs explained.
import * as fs from 'node:fs';
import { ioRing } from './io-ring';
import { native, isNativeError, type NativeStat } from './native';
import { UserError } from '../util/errors';

export interface DeviceOpenOptions {
  write?: boolean;
  /** Refuse a block device that is mounted or claimed (O_EXCL). */
  exclusive?: boolean;
  create?: boolean;
  /** Fall back to buffered I/O where the file system refuses O_DIRECT (tmpfs); default false. */
  allowBuffered?: boolean;
  /** O_DIRECT (default true). Buffered writes let the kernel merge many small writes before a final fdatasync. */
  direct?: boolean;
}

/** What metadata parsers read through: any byte range, alignment handled for them. */
export interface BlockReader {
  readonly size: number;
  read(offset: number, length: number): Promise<Buffer>;
  /** Many ranges in one batch (one native call), results in the same order. */
  readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]>;
}

/** What the copy engine reads blocks through: batches of [offset, length, bufferOffset] triplets into aligned memory. */
export interface BatchReader {
  /** For messages (the device's path, or what the reader stands for). */
  readonly path: string;
  /** Results per segment: bytes read, or -errno. */
  readBatch(buffer: ArrayBuffer, segments: Float64Array, opts?: { urgent?: boolean }): Promise<Int32Array>;
}

export class Device implements BlockReader, BatchReader {
  private closed = false;

  private constructor(
    readonly path: string,
    readonly fd: number,
    readonly info: NativeStat,
    readonly direct: boolean,
    readonly writable: boolean,
  ) {}

  static open(path: string, opts: DeviceOpenOptions = {}): Device {
    let st: fs.Stats | undefined;
    try {
      st = fs.statSync(path);
    } catch (e) {
      if (!opts.create) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') throw new UserError(`${path}: no such file or device`, 'check the path; for a loop device, see "losetup -a"');
        if (code === 'EACCES') throw new UserError(`${path}: permission denied`, 'run as root or as a user with access to the device');
        throw e;
      }
    }
    if (st?.isDirectory()) throw new UserError(`${path} is a directory, not a block device or image file`, 'name the device (e.g. /dev/sdb1) or an image file');
    if (st && !st.isBlockDevice() && !st.isFile()) throw new UserError(`${path} is neither a block device nor a regular file`);
    const flags = { write: !!opts.write, direct: opts.direct ?? true, exclusive: !!opts.exclusive && !!st?.isBlockDevice(), create: !!opts.create };
    let fd: number;
    let direct = flags.direct;
    try {
      fd = native().open(path, flags);
    } catch (e) {
      if (isNativeError(e) && e.code === 'EINVAL' && flags.direct) {
        if (!opts.allowBuffered) {
          throw new UserError(
            `${path}: the file system holding it refuses O_DIRECT (tmpfs does)`,
            'put the image on a disk-backed file system (ext4, xfs, btrfs), or attach it with "losetup"',
          );
        }
        fd = native().open(path, { ...flags, direct: false });
        direct = false;
      } else if (isNativeError(e) && e.code === 'EBUSY') {
        throw new UserError(
          `${path} is in use (mounted or held by another program)`,
          `unmount it first (see "findmnt ${path}"); to back up a mounted volume use "--method freeze --mount <mountpoint>"`,
        );
      } else if (isNativeError(e) && (e.code === 'EACCES' || e.code === 'EPERM')) {
        throw new UserError(`${path}: permission denied`, 'run as root or as a user with access to the device');
      } else if (isNativeError(e) && e.code === 'EROFS') {
        throw new UserError(`${path} is read-only`, 'choose a writable target');
      } else {
        throw e;
      }
    }
    const info = native().stat(fd);
    return new Device(path, fd, info, direct, !!opts.write);
  }

  get size(): number {
    return this.info.blockDevice ? this.info.size : native().stat(this.fd).size;
  }

  /** Alignment every O_DIRECT offset, length and buffer must respect. */
  get alignment(): number {
    return Math.max(512, this.info.logicalSectorSize);
  }

  get isBlockDevice(): boolean {
    return this.info.blockDevice;
  }

  /**
   * Memory registered with the I/O ring (the memory container) goes through the ring: no
   * thread-pool round trip. urgent (ring only): the real-time I/O class, ahead of best-effort bulk
   * reads — for reads someone is waiting on, such as a copy-before-write save with a writer held.
   */
  readBatch(buffer: ArrayBuffer, segments: Float64Array, opts: { urgent?: boolean } = {}): Promise<Int32Array> {
    const ring = ioRing();
    const idx = ring?.indexOf(buffer);
    if (idx !== undefined) return ring!.batch(this.fd, false, idx, segments, !!opts.urgent);
    return native().readBatch(this.fd, buffer, segments);
  }

  writeBatch(buffer: ArrayBuffer, segments: Float64Array): Promise<Int32Array> {
    return native().writeBatch(this.fd, buffer, segments);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const [b] = await this.readMany([{ offset, length }]);
    return b!;
  }

  /**
   * Metadata reads: rounds each range out to the sector alignment, reads all in one batch, and
   * returns exactly the asked bytes. Not for the bulk data path (it allocates per call).
   */
  async readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    const a = this.alignment;
    const segs = new Float64Array(ranges.length * 3);
    let total = 0;
    const starts: number[] = [];
    ranges.forEach((r, i) => {
      if (r.offset < 0 || r.length < 0 || r.offset + r.length > this.size) {
        throw new RangeError(`read of ${r.length} bytes at ${r.offset} is outside ${this.path} (${this.size} bytes)`);
      }
      const s = Math.floor(r.offset / a) * a;
      const e = Math.min(Math.ceil((r.offset + r.length) / a) * a, Math.ceil(this.size / a) * a);
      segs[i * 3] = s;
      segs[i * 3 + 1] = Math.max(a, e - s);
      segs[i * 3 + 2] = total;
      starts.push(s);
      total += Math.max(a, e - s);
    });
    if (ranges.length === 0) return [];
    const buf = native().allocAligned(total, 4096);
    const res = await this.readBatch(buf, segs);
    return ranges.map((r, i) => {
      const got = res[i]!;
      if (got < 0) {
        const err = new Error(`read of ${r.length} bytes at offset ${r.offset} on ${this.path} failed (errno ${-got})`) as NodeJS.ErrnoException;
        err.errno = got;
        throw err;
      }
      const rel = r.offset - starts[i]!;
      if (got < rel + r.length) throw new Error(`short read at offset ${r.offset} on ${this.path}: ${got - rel} of ${r.length} bytes`);
      return Buffer.from(buf, segs[i * 3 + 2]! + rel, r.length);
    });
  }

  /** Makes [offset, offset+length) read as zeros: BLKZEROOUT on a device, FALLOC_FL_ZERO_RANGE on a file. */
  zeroRange(offset: number, length: number): Promise<void> {
    return native().zeroRange(this.fd, offset, length);
  }

  /** Discards [offset, offset+length): BLKDISCARD on a device, a punched hole in a file. */
  discard(offset: number, length: number): Promise<void> {
    return native().discard(this.fd, offset, length);
  }

  sync(): Promise<void> {
    return native().fdatasync(this.fd);
  }

  /**
   * Where a regular file holds data within [offset, offset+length): [start, end) ranges (SEEK_DATA
   * / SEEK_HOLE), at most `maxRanges`; everything else in the range is a hole and reads as zeroes.
   * `complete` is false when the answer stopped at maxRanges (it then covers up to the last end).
   * Undefined for a block device (it has no holes to find).
   */
  async dataRanges(offset: number, length: number, maxRanges = 1024): Promise<{ ranges: Array<[number, number]>; complete: boolean } | undefined> {
    if (!this.info.regularFile) return undefined;
    const flat = await native().dataRanges(this.fd, offset, length, maxRanges);
    const ranges: Array<[number, number]> = [];
    for (let i = 0; i + 1 < flat.length; i += 2) ranges.push([flat[i]!, flat[i + 1]!]);
    return { ranges, complete: ranges.length < maxRanges };
  }

  /**
   * flock(2) without waiting: true when taken. An export holds "exclusive" on its device for as long
   * as it is served, so a second livesnap (or daemon) cannot serve or write it.
   */
  tryLock(mode: 'exclusive' | 'shared'): boolean {
    return native().lock(this.fd, mode);
  }

  /** Device.open on the thread pool: for a path whose lookup may wait on a file system this process serves. */
  static async openAsync(path: string, opts: DeviceOpenOptions & { exclusive?: false } = {}): Promise<Device> {
    const flags = { write: !!opts.write, direct: opts.direct ?? true, create: !!opts.create };
    let fd: number;
    try {
      fd = await native().openAsync(path, flags);
    } catch (e) {
      if (isNativeError(e) && e.code === 'ENOENT') throw new UserError(`${path}: no such file or device`, 'check the path');
      if (isNativeError(e) && (e.code === 'EACCES' || e.code === 'EPERM')) throw new UserError(`${path}: permission denied`, 'run as root or as a user with access to it');
      throw e;
    }
    return new Device(path, fd, native().stat(fd), flags.direct, flags.write);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    native().close(this.fd);
  }
}
