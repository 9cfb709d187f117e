// The volume as of the snapshot instant, for reading METADATA after arming (the used-block map is
// read through it: a bitmap block overwritten since the instant comes from the container).
// A block is read from the container if its original was saved there, else from the device while
// the range is locked (a writer to it waits until the read has landed, then saves the original as
// usual). Valid for blocks not yet handed to the sink: use it before the copier starts.
import type { BlockReader, Device } from '../device/device';
import { giveAligned, takeAligned } from '../device/memory';
import type { Container } from './container';
import type { CopyMap } from '../copy/copy-map';

export class SnapshotView implements BlockReader {
  constructor(
    private readonly map: CopyMap,
    private readonly device: Device,
    private readonly container: Container,
    private readonly blockSize: number,
  ) {}

  get size(): number {
    return this.device.size;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const [b] = await this.readMany([{ offset, length }]);
    return b!;
  }

  readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    return Promise.all(ranges.map((r) => this.readOne(r.offset, r.length)));
  }

  private async readOne(offset: number, length: number): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const end = Math.min(Math.floor((offset + length - 1) / bs) + 1, this.map.totalBlocks);
    const map = this.map;
    // Wait until no save or copy is in flight on the range, then hold it.
    for (;;) {
      let busy = false;
      for (let i = first; i < end; i++) if (map.busy.get(i)) { busy = true; break; }
      if (!busy) break;
      await map.waitFor(first, end);
    }
    const task = map.lock(first, end, 'view');
    try {
      const out = Buffer.from(await this.device.read(offset, length));
      let scratch: ArrayBuffer | undefined;
      for (let blk = map.saved.next(first, true, end); blk < end; blk = map.saved.next(blk + 1, true, end)) {
        const bStart = blk * bs;
        const from = Math.max(offset, bStart), to = Math.min(offset + length, bStart + bs);
        if (map.bad.get(blk)) { out.fill(0, from - offset, to - offset); continue; }
        scratch ??= takeAligned(bs);
        await this.container.get([blk], scratch, [0], 1);
        Buffer.from(scratch, from - bStart, to - from).copy(out, from - offset);
      }
      if (scratch) giveAligned(scratch);
      return out;
    } finally {
      map.unlock(task);
    }
  }
}
