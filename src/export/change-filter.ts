// Change tracking, always on, at the head of the export's filter chain (seed 003): every write, trim
// and write-zeroes marks its regions in the change map (incremental/change-map.ts) and goes on only
// once the mark is durable, so nothing is acknowledged that the map could forget. Reads pass.
// A backup's instant falls inside an epoch switch: beginEpoch() (from then on writes mark the old
// and the new epoch; it returns once every write that entered before has landed, so those are all
// inside the instant), the arming, freezeEpoch() (writes mark only the new epoch).
import type { NbdBackend } from '../nbd/backend';
import type { ChangeMap } from '../incremental/change-map';
import type { Bitset } from '../util/bitset';
import { Filter } from './filter';

export class ChangeFilter extends Filter {
  /** Writes in flight by generation (the generation flips at each epoch switch): counters, no per-write record. */
  private gen: 0 | 1 = 0;
  private readonly inFlight = [0, 0];
  private drained: (() => void) | undefined;
  /** Writes waiting for their mark, and the last one's mark: a read waits until they have gone down. */
  private waiting = 0;
  private lastMark: Promise<void> | undefined;

  constructor(next: NbdBackend, readonly map: ChangeMap) {
    super(next);
  }

  private tracked(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    const g = this.gen;
    this.inFlight[g]!++;
    const m = this.map.mark(offset, length);
    let p: Promise<void>;
    if (m) {
      this.waiting++;
      this.lastMark = m;
      p = m.then(() => { this.waiting--; return op(); }, (e: unknown) => { this.waiting--; throw e; });
    } else {
      p = op();
    }
    const exit = () => {
      if (--this.inFlight[g]! === 0 && g !== this.gen) this.drained?.();
    };
    p.then(exit, exit);
    return p;
  }

  // A write sent before a read reaches the filters below first (the hold queue answers reads with
  // held data): a read waits while earlier writes wait for their mark.
  override read(offset: number, length: number): ReturnType<Filter['read']> {
    if (this.waiting === 0 || !this.lastMark) return this.next.read(offset, length);
    const go = () => this.next.read(offset, length);
    return this.lastMark.then(go, go);
  }

  override write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.tracked(offset, data.length, () => this.next.write(offset, data, fua));
  }

  override trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.tracked(offset, length, () => this.next.trim(offset, length, fua));
  }

  override writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    return this.tracked(offset, length, () => this.next.writeZeroes(offset, length, fua, noHole));
  }

  /** Before the instant: a new epoch for backup `id`; resolves once the writes that entered before it have landed. */
  async beginEpoch(id: string): Promise<void> {
    await this.map.beginEpoch(id);
    const old = this.gen;
    this.gen = (1 - old) as 0 | 1;
    if (this.inFlight[old]! > 0) await new Promise<void>((r) => (this.drained = r));
    this.drained = undefined;
  }

  /** After the instant: the closing epoch's changed blocks. */
  async freezeEpoch(blockSize: number, totalBlocks: number): Promise<Bitset> {
    return this.map.freezeEpoch(blockSize, totalBlocks);
  }
}
