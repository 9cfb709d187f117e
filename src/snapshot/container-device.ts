// Containers that are storage: a file on another file system, a raw partition, or a preallocated
// file INSIDE the protected file system written by block address. All three map slot i to a byte
// offset on some fd and move data through a small pool of aligned staging buffers.
import type { Device } from '../device/device';
import { BufferPool } from '../device/buffer-pool';
import { type Container, saveViaStaging } from './container';

export abstract class DeviceContainer implements Container {
  abstract readonly kind: 'file' | 'inside' | 'partition';
  abstract readonly description: string;
  private readonly pool: BufferPool;
  protected closed = false;

  constructor(protected readonly target: Device, readonly capacity: number, readonly blockSize: number) {
    this.pool = new BufferPool(Math.max(blockSize, 256 << 10), 8);
  }

  /** Byte offset of slot `slot` on `target`. */
  /** Byte offset of a slot on the container's device: slots packed from offset 0 unless overridden. */
  protected slotOffset(slot: number): number {
    return slot * this.blockSize;
  }

  async save(dev: Device, blocks: ArrayLike<number>, lengths: ArrayLike<number>, slots: ArrayLike<number>, count: number): Promise<Int32Array> {
    if (this.closed) throw new Error(`the container ${this.description} was released`);
    const staging = await this.pool.acquire();
    try {
      return await saveViaStaging(dev, staging, this.blockSize, blocks, lengths, count, async (buf, base, n, ok) => {
        const segs = new Float64Array(n * 3);
        let k = 0;
        for (let i = 0; i < n; i++) {
          if (!ok[i]) continue;
          segs[k * 3] = this.slotOffset(slots[base + i]!);
          segs[k * 3 + 1] = this.blockSize;
          segs[k * 3 + 2] = i * this.blockSize;
          k++;
        }
        if (k === 0) return;
        const res = await this.target.writeBatch(buf, segs.subarray(0, k * 3));
        for (let i = 0; i < k; i++) {
          if (res[i] !== this.blockSize) throw containerIoError('writing', this.description, res[i]!);
        }
      });
    } finally {
      this.pool.release(staging);
    }
  }

  async load(slots: ArrayLike<number>, buffer: ArrayBuffer, bufOffsets: ArrayLike<number>, count: number): Promise<void> {
    if (this.closed) throw new Error(`the container ${this.description} was released`);
    const segs = new Float64Array(count * 3);
    for (let i = 0; i < count; i++) {
      segs[i * 3] = this.slotOffset(slots[i]!);
      segs[i * 3 + 1] = this.blockSize;
      segs[i * 3 + 2] = bufOffsets[i]!;
    }
    const res = await this.target.readBatch(buffer, segs);
    for (let i = 0; i < count; i++) if (res[i] !== this.blockSize) throw containerIoError('reading', this.description, res[i]!);
  }

  excludedRanges(): ReadonlyArray<{ offset: number; length: number }> {
    return [];
  }

  abstract close(): Promise<void>;
}

function containerIoError(what: string, desc: string, res: number): Error {
  const errno = res < 0 ? -res : 0;
  const err = new Error(`${what} the intermediate container ${desc} failed (${errno ? `errno ${errno}` : `short transfer of ${res} bytes`})`) as NodeJS.ErrnoException;
  if (errno) err.errno = errno;
  if (errno === 28) err.code = 'ENOSPC';
  if (errno === 5) err.code = 'EIO';
  return err;
}
