// The reconciling reader (seed 002, claims 13-17): the instant of a host's volume as the appliance
// sees it, from the shared LUN and the unit's Modified Map. A run of blocks is read from the LUN into
// the buffer FIRST, and only THEN is the MM checked for each block of it, substituting the cached
// original. That order is what makes the race with a host write safe: the host writes a block only
// after the appliance acknowledged its original, which is in the MM before the acknowledgement
// leaves. So if the check finds no original, the write had not landed when the check ran, hence not
// when the (earlier) LUN read ran either: the LUN had the original. Checking first would let a write
// land between an empty check and the read, and the output would hold the new data.
// Two faces: `reader` (metadata, the --run NBD export) leaves the MM as it is; `consuming` (the copy
// engine's source) marks what it read as done, so those slots are reused and the host stops sending.
import type { BatchReader, BlockReader, Device } from '../device/device';
import type { ModifiedMap, OriginalDataCache } from './odc';

export class ReconciledView {
  readonly reader: BlockReader;
  readonly consuming: BatchReader;
  /** Blocks whose original replaced the LUN's data in output reads. */
  substituted = 0;

  constructor(
    private readonly lun: Device,
    private readonly mm: ModifiedMap,
    private readonly odc: OriginalDataCache,
    readonly blockSize: number,
    /** Blocks [first, end) were read for the output: their originals are no longer needed. */
    private readonly onConsumed: (first: number, end: number) => void,
  ) {
    const size = lun.size;
    this.reader = {
      size,
      read: async (offset, length) => (await this.reader.readMany([{ offset, length }]))[0]!,
      readMany: async (ranges) => {
        const bufs = await lun.readMany(ranges);
        for (let i = 0; i < ranges.length; i++) this.substitute(bufs[i]!, 0, ranges[i]!.offset, bufs[i]!.length, false);
        return bufs;
      },
    };
    this.consuming = {
      path: `${lun.path} (reconciled)`,
      readBatch: async (buffer, segments) => {
        const res = await lun.readBatch(buffer, segments);
        const view = Buffer.from(buffer);
        const bs = this.blockSize;
        for (let i = 0; i * 3 < segments.length; i++) {
          const off = segments[i * 3]!;
          const len = segments[i * 3 + 1]!;
          // Only a complete read is the instant's run: a short or failed one is read again by the
          // engine (block by block, through here), so its originals must stay.
          if (res[i]! < Math.min(len, size - off)) continue;
          this.substitute(view, segments[i * 3 + 2]!, off, len, true);
          const first = Math.floor(off / bs);
          const end = Math.ceil((off + len) / bs);
          // A block is done only when wholly read (the batch covers whole blocks, the last one cut at the end).
          this.onConsumed(first, end);
        }
        return res;
      },
    };
  }

  /**
   * Puts the originals the MM holds over the LUN's bytes of [off, off+len) (at `at` in `buf`).
   * Runs after the LUN read completed (see the header).
   */
  private substitute(buf: Buffer, at: number, off: number, len: number, consume: boolean): void {
    if (this.mm.held === 0 || len <= 0) return;
    const bs = this.blockSize;
    const first = Math.floor(off / bs);
    const end = Math.ceil((off + len) / bs);
    for (let b = first; b < end; b++) {
      const slot = this.mm.slot(b);
      if (slot === undefined) continue;
      // The part of block b inside the range.
      const bStart = Math.max(b * bs, off);
      const bEnd = Math.min((b + 1) * bs, off + len, this.lun.size);
      if (bEnd <= bStart) continue;
      this.odc.read(slot, buf, at + (bStart - off), bEnd - bStart, bStart - b * bs);
      if (consume) { this.substituted++; this.mm.originalsUsed++; }
    }
  }
}
