// A window of a device (a partition, a PV's data area) as a BlockReader of its own: a reader inside
// it sees offset 0 at the window's start and cannot read past its end.
import type { BlockReader } from '../device/device';

export class SliceReader implements BlockReader {
  constructor(readonly base: BlockReader, readonly offset: number, readonly size: number) {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(size) || offset < 0 || size < 0 || offset + size > base.size) {
      throw new RangeError(`window of ${size} bytes at ${offset} does not fit a device of ${base.size} bytes`);
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.readMany([{ offset, length }]))[0]!;
  }

  readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    for (const r of ranges) {
      if (!(r.offset >= 0 && r.length >= 0 && r.offset + r.length <= this.size)) {
        return Promise.reject(new RangeError(`read of ${r.length} bytes at ${r.offset} is outside a volume of ${this.size} bytes`));
      }
    }
    return this.base.readMany(ranges.map((r) => ({ offset: this.offset + r.offset, length: r.length })));
  }
}
