// A sink that writes nothing: it reads the same blocks from another device and counts the blocks
// that differ. `verify --against` is a backup whose sink is a comparison.
import { Device } from '../device/device';
import { giveAligned, takeAligned } from '../device/memory';
import { UserError } from '../util/errors';
import type { BackupSink, DataBatch, FinishInfo, VolumeInfo } from './sink';

export class CompareSink implements BackupSink {
  readonly randomAccess = true;
  private dev?: Device;
  private buf?: ArrayBuffer;
  private blockSize = 4096;
  differingBlocks = 0;
  firstDifferingBlock: number | undefined;
  comparedBytes = 0;

  constructor(readonly against: string) {}

  get description(): string {
    return `comparison with ${this.against}`;
  }

  async begin(volume: VolumeInfo): Promise<void> {
    this.blockSize = volume.blockSize;
    this.dev = Device.open(this.against, { write: false });
    if (this.dev.size < volume.size) {
      throw new UserError(`${this.against} is smaller (${this.dev.size} bytes) than the backed-up volume (${volume.size} bytes)`, 'compare against the device the backup was taken from, or one at least as large');
    }
  }

  async write(batch: DataBatch): Promise<void> {
    const dev = this.dev!;
    if (!this.buf || this.buf.byteLength < batch.buffer.byteLength) {
      if (this.buf) giveAligned(this.buf);
      this.buf = takeAligned(batch.buffer.byteLength);
    }
    const res = await dev.readBatch(this.buf, batch.segments);
    const bs = this.blockSize;
    for (let i = 0; i < res.length; i++) {
      const off = batch.segments[i * 3]!, len = batch.segments[i * 3 + 1]!, at = batch.segments[i * 3 + 2]!;
      if (res[i]! < 0) throw new UserError(`reading ${this.against} at byte ${off} failed (errno ${-res[i]!})`);
      const n = Math.min(len, res[i]!);
      this.comparedBytes += n;
      const a = Buffer.from(batch.buffer, at, n);
      const b = Buffer.from(this.buf, at, n);
      if (a.equals(b)) continue;
      for (let o = 0; o < n; o += bs) {
        const l = Math.min(bs, n - o);
        if (a.compare(b, o, o + l, o, o + l) !== 0) {
          const block = Math.floor((off + o) / bs);
          this.differingBlocks++;
          if (this.firstDifferingBlock === undefined || block < this.firstDifferingBlock) this.firstDifferingBlock = block;
        }
      }
    }
  }

  private releaseBuffer(): void {
    if (this.buf) giveAligned(this.buf);
    this.buf = undefined;
  }

  async finish(_info: FinishInfo): Promise<void> {
    this.releaseBuffer();
    this.dev?.close();
    this.dev = undefined;
  }

  async abort(_reason: Error): Promise<void> {
    this.releaseBuffer();
    try { this.dev?.close(); } catch { /* closed */ }
    this.dev = undefined;
  }
}
