// Turns a stream of (volume offset, bytes) pieces of any size — as an archive reader yields them —
// into sector-aligned DataBatches for a BackupSink (O_DIRECT needs 512-byte aligned offsets, lengths
// and memory). Two buffers alternate so the next batch fills while the last one is written.
import { giveAligned, takeAligned } from '../device/memory';
import type { BackupSink } from './sink';

const SECTOR = 512;
const MAX_SEGS = 4096;

export class AlignedStager {
  private readonly bufs: [ArrayBuffer, ArrayBuffer];
  private cur = 0;
  private used = 0;
  private segs = new Float64Array(MAX_SEGS * 3);
  private n = 0;
  private inflight: Promise<void> | undefined;

  constructor(private readonly sink: BackupSink, private readonly size = 8 << 20) {
    this.bufs = [takeAligned(size), takeAligned(size)];
  }

  async push(offset: number, bytes: Uint8Array): Promise<void> {
    let pos = 0;
    while (pos < bytes.length) {
      const off = offset + pos;
      const last = this.n - 1;
      const contiguous = this.n > 0 && this.segs[last * 3]! + this.segs[last * 3 + 1]! === off;
      if (!contiguous) {
        // A new region starts on a sector boundary of the volume: place it on one in the buffer.
        this.used = Math.ceil(this.used / SECTOR) * SECTOR;
        if (this.n === MAX_SEGS || this.used >= this.size) await this.flush(false);
        this.segs[this.n * 3] = off;
        this.segs[this.n * 3 + 1] = 0;
        this.segs[this.n * 3 + 2] = this.used;
        this.n++;
      }
      const take = Math.min(bytes.length - pos, this.size - this.used);
      new Uint8Array(this.bufs[this.cur], this.used, take).set(bytes.subarray(pos, pos + take));
      this.used += take;
      this.segs[(this.n - 1) * 3 + 1]! += take;
      pos += take;
      if (this.used === this.size) await this.flush(false);
    }
  }

  /** Writes what is staged; `final` pads the last segment to a whole sector with zeros. */
  /** Gives the buffers back to the pool: after the final flush, or when the restore failed. */
  async dispose(): Promise<void> {
    await this.inflight?.catch(() => {});
    for (const b of this.bufs) giveAligned(b);
  }

  async flush(final: boolean): Promise<void> {
    if (this.n === 0) { if (final && this.inflight) await this.inflight; return; }
    const buf = this.bufs[this.cur]!;
    const segs = this.segs;
    const n = this.n;
    // An unaligned tail of the last segment moves to the next buffer (unless this is the end).
    let carry: Uint8Array | undefined;
    let carryOff = 0;
    const li = (n - 1) * 3;
    const end = segs[li]! + segs[li + 1]!;
    if (end % SECTOR !== 0) {
      if (final) {
        const pad = SECTOR - (end % SECTOR);
        new Uint8Array(buf, segs[li + 2]! + segs[li + 1]!, pad).fill(0);
        segs[li + 1]! += pad;
      } else {
        const keep = end % SECTOR;
        carryOff = end - keep;
        carry = new Uint8Array(buf, segs[li + 2]! + segs[li + 1]! - keep, keep).slice();
        segs[li + 1]! -= keep;
      }
    }
    const count = segs[li + 1] === 0 ? n - 1 : n;
    if (this.inflight) await this.inflight;
    const p = count > 0 ? this.sink.write({ buffer: buf, segments: segs.slice(0, count * 3) }) : undefined;
    p?.catch(() => {}); // surfaced by the next await of this.inflight, never as an unhandled rejection
    this.inflight = p;
    this.cur ^= 1;
    this.used = 0;
    this.n = 0;
    this.segs = new Float64Array(MAX_SEGS * 3);
    if (carry) await this.push(carryOff, carry);
    if (final && this.inflight) { await this.inflight; this.inflight = undefined; }
  }
}
