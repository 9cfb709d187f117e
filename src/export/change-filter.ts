// Change tracking, always on, at the head of the export's filter chain (seed 003): every write, trim
// and write-zeroes marks its regions in the change map (incremental/change-map.ts) and goes on only
// once the mark is durable, so nothing is acknowledged that the map could forget. Reads pass.
// A backup's instant falls inside an epoch switch: beginEpoch() (writes mark the old and the new
// epoch; writes already in flight are marked in the new one too), the arming, freezeEpoch().
import type { NbdBackend } from '../nbd/backend';
import type { ChangeMap } from '../incremental/change-map';
import type { Bitset } from '../util/bitset';
import { Filter } from './filter';

export class ChangeFilter extends Filter {
  /** Writes that entered and have not completed: [offset, length] by id. */
  private readonly inFlight = new Map<number, [number, number]>();
  private seq = 0;

  constructor(next: NbdBackend, readonly map: ChangeMap) {
    super(next);
  }

  private async tracked(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    const id = ++this.seq;
    this.inFlight.set(id, [offset, length]);
    try {
      const m = this.map.mark(offset, length);
      if (m) await m;
      await op();
    } finally {
      this.inFlight.delete(id);
    }
  }

  override write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    // Already marked (the usual case): no wait, but still on the in-flight list for an epoch switch.
    const id = ++this.seq;
    this.inFlight.set(id, [offset, data.length]);
    const m = this.map.mark(offset, data.length);
    const done = () => { this.inFlight.delete(id); };
    const p = m ? m.then(() => this.next.write(offset, data, fua)) : this.next.write(offset, data, fua);
    p.then(done, done);
    return p;
  }

  override trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.tracked(offset, length, () => this.next.trim(offset, length, fua));
  }

  override writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    return this.tracked(offset, length, () => this.next.writeZeroes(offset, length, fua, noHole));
  }

  /** Before the instant: a new epoch for backup `id`; writes in flight now count in it too. */
  async beginEpoch(id: string): Promise<void> {
    await this.map.beginEpoch(id);
    const marks = [...this.inFlight.values()].map(([o, l]) => this.map.mark(o, l)).filter((p): p is Promise<void> => p !== undefined);
    await Promise.all(marks);
  }

  /** After the instant: the closing epoch's changed blocks. */
  async freezeEpoch(blockSize: number, totalBlocks: number): Promise<Bitset> {
    return this.map.freezeEpoch(blockSize, totalBlocks);
  }
}
