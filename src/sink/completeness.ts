// The last word before a backup says "done": every block its map names reached the sink exactly
// once, and nothing else did. Wraps any sink; a copy engine that skips, repeats or strays fails the
// backup loudly here (and the sink's partial output is removed by the job's abort) instead of
// producing an image that silently holds less than its map.
import { Bitset } from '../util/bitset';
import type { BackupSink, DataBatch, FinishInfo, VolumeInfo } from './sink';

export class IncompleteBackupError extends Error {
  constructor(message: string) {
    super(`internal error, the backup is not complete: ${message}`);
    this.name = 'IncompleteBackupError';
  }
}

export class CompletenessCheck implements BackupSink {
  private used: Bitset | undefined;
  private delivered: Bitset | undefined;
  private blockSize = 1;

  constructor(readonly inner: BackupSink) {}

  get description(): string { return this.inner.description; }
  get randomAccess(): boolean | undefined { return this.inner.randomAccess; }

  /** Blocks the sink has received so far. */
  get blocksDelivered(): number { return this.delivered?.setCount ?? 0; }

  async begin(volume: VolumeInfo, used: Bitset): Promise<void> {
    this.used = used;
    this.blockSize = volume.blockSize;
    this.delivered = new Bitset(used.size);
    await this.inner.begin(volume, used);
  }

  async write(batch: DataBatch): Promise<void> {
    const used = this.used!, got = this.delivered!;
    const s = batch.segments;
    for (let i = 0; i < s.length; i += 3) {
      const first = Math.floor(s[i]! / this.blockSize);
      const end = Math.min(Math.ceil((s[i]! + s[i + 1]!) / this.blockSize), used.size);
      if (end <= first) continue;
      if (used.count(first, end) !== end - first) {
        throw new IncompleteBackupError(`blocks ${first}..${end - 1} were sent to ${this.inner.description} but the map does not hold block ${used.next(first, false, end)}`);
      }
      if (got.any(first, end)) throw new IncompleteBackupError(`block ${got.next(first, true, end)} was sent to ${this.inner.description} twice`);
      got.setRange(first, end);
    }
    await this.inner.write(batch);
  }

  async finish(info: FinishInfo): Promise<void> {
    const used = this.used!, got = this.delivered!;
    if (got.setCount !== used.setCount) {
      const missing = used.clone();
      missing.andNot(got);
      throw new IncompleteBackupError(
        `${got.setCount} of the ${used.setCount} blocks in the map reached ${this.inner.description} (${missing.setCount} missing, the first is block ${missing.next(0, true)})`,
      );
    }
    await this.inner.finish(info);
  }

  abort(reason: Error): Promise<void> {
    return this.inner.abort(reason);
  }
}
