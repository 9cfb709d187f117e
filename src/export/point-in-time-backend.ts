// A point in time served read-only over NBD (QEMU's fleecing, its snapshot-access node): an
// unmodified backup program reads the instant while the live export keeps taking writes. Reads of
// used blocks come through the snapshot's reader (the device, or the container where a block was
// overwritten since); free blocks read as zeros and are reported as holes by block status, so
// nbdcopy and qemu-img skip them. Writes are refused: the backend is read-only.
import type { BlockReader } from '../device/device';
import { type AllocationExtent, usedBlockExtents } from '../nbd/allocation';
import { heapBuffer, type NbdBackend, NbdError, type NbdBuffer } from '../nbd/backend';
import { NBD_EPERM } from '../nbd/protocol';
import type { Bitset } from '../util/bitset';

export class PointInTimeBackend implements NbdBackend {
  readonly minBlockSize = 512;
  readonly preferredBlockSize = 4096;
  readonly maxBlockSize = 32 << 20;
  readonly readOnly = true;
  readonly multiConn = true;
  /** Bytes read by clients so far. */
  bytesRead = 0;

  constructor(
    private readonly reader: BlockReader,
    private readonly used: Bitset,
    private readonly blockSize: number,
    readonly size: number,
    readonly description: string,
  ) {}

  async read(offset: number, length: number): Promise<NbdBuffer> {
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const end = Math.ceil((offset + length) / bs);
    this.bytesRead += length;
    if (!this.used.any(first, end)) return heapBuffer(Buffer.alloc(length));
    const out = Buffer.from(await this.reader.read(offset, length));
    // Free blocks of the instant read as zeros, whatever the device holds there now.
    for (let b = this.used.next(first, false, end); b < end; b = this.used.next(b + 1, false, end)) {
      const s = Math.max(offset, b * bs), e = Math.min(offset + length, (b + 1) * bs);
      out.fill(0, s - offset, e - offset);
    }
    return heapBuffer(out);
  }

  extents(offset: number, length: number): Promise<AllocationExtent[]> {
    return Promise.resolve(usedBlockExtents(this.used, { blockSize: this.blockSize, exportSize: this.size, freeReadsAsZero: true }, offset, length));
  }

  private refuse(): Promise<never> {
    return Promise.reject(new NbdError('the point-in-time export is read-only', NBD_EPERM));
  }

  write(): Promise<void> { return this.refuse(); }
  trim(): Promise<void> { return this.refuse(); }
  writeZeroes(): Promise<void> { return this.refuse(); }
  async flush(): Promise<void> {}
}
