// Fixed-size records. RecordWriter aggregates bytes in a few large buffers and hands whole records
// to a RecordOutput; WritableRecordOutput issues ONE stream.write() per record (corked, so Node
// passes them to _writev in one go: on a file or pipe that is one writev() syscall; on a tape the
// kernel turns each iovec into one write, i.e. one tape block of exactly recordSize bytes).
import * as fs from 'node:fs';
import type { Writable } from 'node:stream';
import { UserError } from '../../util/errors';

export const DEFAULT_RECORD_SIZE = 10240;
export const MAX_RECORD_SIZE = 1 << 20;

export function checkRecordSize(n: number): number {
  if (!Number.isSafeInteger(n) || n < 512 || n > MAX_RECORD_SIZE || n % 512 !== 0) {
    throw new RangeError(`record size ${n} must be a multiple of 512 between 512 and ${MAX_RECORD_SIZE}`);
  }
  return n;
}

/**
 * A write error of the archive's destination, said as what happened to the archive: a reader that
 * went away or a full device, rather than "EPIPE" or "Premature close".
 */
export function outputError(e: unknown, where: string): Error {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'EPIPE' || code === 'ECONNRESET' || code === 'ERR_STREAM_PREMATURE_CLOSE' || code === 'ERR_STREAM_DESTROYED') {
    return new UserError(`${where} was closed by its reader before the archive ended: the archive is incomplete`, 'keep the reading command (ssh, tape writer, pipe) running until the backup reports completion');
  }
  if (code === 'ENOSPC') return new UserError(`no space left on ${where}: the archive is incomplete`, 'free space there, or write to another place');
  if (code === 'EIO') return new UserError(`${where} reported an I/O error: the archive is incomplete`);
  return e instanceof Error ? e : new Error(String(e));
}

/** Takes whole records; the promise resolves once `data` may be reused. */
export interface RecordOutput {
  write(data: Buffer): Promise<void>;
  /** All written: flush, make durable, close. */
  close(): Promise<void>;
  /** Failure: stop, never throws (an upload resolves once it is aborted). */
  destroy(): void | Promise<void>;
}

/** Records to a Node Writable, one write() per record (or one write per call when recordSize is 0). */
export class WritableRecordOutput implements RecordOutput {
  private error: Error | undefined;
  private readonly onError = (e: Error) => { this.error ??= outputError(e, this.opts.where ?? 'the archive stream'); };

  constructor(readonly stream: Writable, readonly recordSize: number, private readonly opts: { fd?: number; end?: boolean; where?: string } = {}) {
    stream.on('error', this.onError);
  }

  write(data: Buffer): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    const s = this.stream;
    return new Promise((resolve, reject) => {
      const done = (e?: Error | null) => (e ? reject(this.error ?? outputError(e, this.opts.where ?? 'the archive stream')) : this.error ? reject(this.error) : resolve());
      const r = this.recordSize;
      if (r === 0 || data.length === r) {
        s.write(data, done);
        return;
      }
      s.cork();
      const last = data.length - r;
      for (let off = 0; off < last; off += r) s.write(data.subarray(off, off + r));
      s.write(data.subarray(last), done);
      s.uncork();
    });
  }

  async close(): Promise<void> {
    if (this.error) throw this.error;
    const s = this.stream;
    if (this.opts.end === false) {
      await new Promise<void>((resolve, reject) => s.write(Buffer.alloc(0), (e) => (e ? reject(e) : resolve())));
    } else {
      await new Promise<void>((resolve, reject) => {
        s.once('error', (e) => reject(outputError(e, this.opts.where ?? 'the archive stream')));
        s.end(() => resolve());
      });
    }
    if (this.error) throw this.error;
    const fd = this.opts.fd;
    if (fd !== undefined) {
      // Durable before "complete" is reported. fsync is EINVAL on pipes/char devices: that is fine.
      await new Promise<void>((resolve, reject) => fs.fsync(fd, (e) => (e && e.code !== 'EINVAL' && e.code !== 'EROFS' ? reject(e) : resolve())));
      await new Promise<void>((resolve) => fs.close(fd, () => resolve()));
    }
    s.off('error', this.onError);
  }

  destroy(): void {
    try {
      this.stream.destroy();
      if (this.opts.fd !== undefined) fs.close(this.opts.fd, () => {});
    } catch { /* never throws */ }
  }
}

const IOV_MAX = 1024;

/**
 * Records straight to a file descriptor with writev(2): one iovec per record (on a tape the kernel
 * writes each iovec as one block), no per-record stream overhead. Retries EAGAIN (a non-blocking pipe).
 */
export class FdRecordOutput implements RecordOutput {
  // Writes without a position use the fd's offset: two writev() calls running at once on libuv's
  // pool could land in either order (and a short write on a pipe would interleave), so they queue.
  private tail: Promise<void> = Promise.resolve();

  constructor(readonly fd: number, readonly recordSize: number, private readonly owned: boolean) {}

  write(data: Buffer): Promise<void> {
    const p = this.tail.then(() => this.writeNow(data));
    this.tail = p.catch(() => {});
    return p;
  }

  private async writeNow(data: Buffer): Promise<void> {
    const r = this.recordSize;
    let off = 0;
    while (off < data.length) {
      const iov: Buffer[] = [];
      for (let o = off; o < data.length && iov.length < IOV_MAX; o += r) iov.push(data.subarray(o, Math.min(o + r, data.length)));
      let n: number;
      try {
        n = await new Promise<number>((resolve, reject) => fs.writev(this.fd, iov, (e, k) => (e ? reject(e) : resolve(k))));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') { await new Promise((res) => setTimeout(res, 1)); continue; }
        throw outputError(e, this.fd === 1 ? 'standard output' : 'the archive');
      }
      if (n <= 0) throw new Error(`short write (${n} bytes) to the archive`);
      off += n;
    }
  }

  async close(): Promise<void> {
    if (!this.owned) return;
    // Durable before "complete" is reported. fsync is EINVAL on pipes/char devices: that is fine.
    await new Promise<void>((resolve, reject) => fs.fsync(this.fd, (e) => (e && e.code !== 'EINVAL' && e.code !== 'EROFS' ? reject(e) : resolve())));
    await new Promise<void>((resolve, reject) => fs.close(this.fd, (e) => (e ? reject(e) : resolve())));
  }

  destroy(): void {
    if (this.owned) fs.close(this.fd, () => {});
  }
}

/** Opens a file or device for writing (created 0600, truncated), as a RecordOutput. */
export async function openRecordFile(file: string, recordSize: number): Promise<{ out: RecordOutput; fd: number; created: boolean; regular: boolean }> {
  const existed = fs.existsSync(file);
  const fd = await new Promise<number>((resolve, reject) => fs.open(file, 'w', 0o600, (e, fd) => (e ? reject(e) : resolve(fd))));
  const regular = fs.fstatSync(fd).isFile();
  return { out: new FdRecordOutput(fd, recordSize, true), fd, created: !existed, regular };
}

/**
 * Aggregates bytes into whole records. Data from archive offset `holdFrom` on stays in the current
 * buffer when it is flushed (the caller hashes a chunk in place once it is complete), so the buffer
 * must exceed the largest held span plus one record.
 */
export class RecordWriter {
  private readonly free: Buffer[] = [];
  private readonly inflight: Array<{ buf: Buffer; p: Promise<void> }> = [];
  private cur: Buffer;
  private fill = 0;
  /** Archive offset of cur[0]. */
  private base = 0;
  private failed: Error | undefined;
  /** Archive offset from which bytes must stay in the buffer (Infinity: none). */
  holdFrom = Infinity;

  constructor(private readonly out: RecordOutput, readonly recordSize: number, bufferSize = 8 << 20, buffers = 3) {
    const size = Math.max(Math.ceil(bufferSize / recordSize), 2) * recordSize;
    for (let i = 0; i < buffers; i++) this.free.push(Buffer.allocUnsafeSlow(size));
    this.cur = this.free.pop()!;
  }

  get bufferSize(): number { return this.cur.length; }

  /** Bytes appended so far (= archive offset of the next byte). */
  get position(): number { return this.base + this.fill; }

  /** The current buffer and where free space starts; copy into it, then commit(n). */
  get buffer(): Buffer { return this.cur; }
  get fillOffset(): number { return this.fill; }
  get available(): number { return this.cur.length - this.fill; }
  commit(n: number): void { this.fill += n; }

  /** A view of bytes still in the current buffer. */
  view(archiveOffset: number, length: number): Buffer {
    const s = archiveOffset - this.base;
    if (s < 0 || s + length > this.fill) throw new Error(`internal: archive bytes ${archiveOffset}+${length} are no longer buffered`);
    return this.cur.subarray(s, s + length);
  }

  async write(src: Uint8Array): Promise<void> {
    let o = 0;
    while (o < src.length) {
      if (this.fill === this.cur.length) await this.flushFull();
      const n = Math.min(src.length - o, this.cur.length - this.fill);
      this.cur.set(src.subarray(o, o + n), this.fill);
      this.fill += n;
      o += n;
    }
  }

  async writeZeros(n: number): Promise<void> {
    while (n > 0) {
      if (this.fill === this.cur.length) await this.flushFull();
      const k = Math.min(n, this.cur.length - this.fill);
      this.cur.fill(0, this.fill, this.fill + k);
      this.fill += k;
      n -= k;
    }
  }

  /** Makes room: sends the whole records before `holdFrom`, keeps the rest in a fresh buffer. */
  async flushFull(): Promise<void> {
    if (this.failed) throw this.failed;
    const r = this.recordSize;
    const keepFrom = Math.min(this.holdFrom, this.position) - this.base;
    const end = Math.floor(keepFrom / r) * r;
    if (end <= 0) throw new Error('internal: record buffer too small for the held chunk');
    const next = await this.takeBuffer();
    const tail = this.fill - end;
    this.cur.copy(next, 0, end, this.fill);
    this.send(this.cur.subarray(0, end), this.cur);
    this.cur = next;
    this.base += end;
    this.fill = tail;
  }

  private send(data: Buffer, owner: Buffer): void {
    const p = this.out.write(data).catch((e: Error) => { this.failed ??= e; });
    this.inflight.push({ buf: owner, p });
  }

  private async takeBuffer(): Promise<Buffer> {
    while (this.free.length === 0) {
      const f = this.inflight.shift()!;
      await f.p;
      if (this.failed) throw this.failed;
      this.free.push(f.buf);
    }
    return this.free.pop()!;
  }

  /**
   * Pads to a whole record and sends everything. `pad(n)` may supply the padding bytes (n >= 1 is
   * the gap to the record boundary; it may return more, e.g. a zstd skippable frame needs >= 8);
   * the default is zeros.
   */
  async finish(pad?: (gap: number) => Buffer): Promise<void> {
    const r = this.recordSize;
    this.holdFrom = Infinity;
    const gap = (r - (this.position % r)) % r;
    if (gap > 0) {
      if (pad) await this.write(pad(gap));
      else await this.writeZeros(gap);
    }
    if (this.position % r !== 0) throw new Error('internal: padding did not end on a record boundary');
    if (this.fill > 0) {
      this.send(this.cur.subarray(0, this.fill), this.cur);
      this.base += this.fill;
      this.fill = 0;
    }
    for (const f of this.inflight.splice(0)) await f.p;
    if (this.failed) throw this.failed;
  }
}
