// In-memory images for parser fuzzing: the sectors a reader read from a real image are captured
// once; mutated copies are then read with no I/O. Sectors never captured read as zeros.
import type { BlockReader } from '../../src/device/device';
import { Device } from '../../src/device/device';

const SECTOR = 512;

export class MemReader implements BlockReader {
  constructor(readonly size: number, readonly sectors: Map<number, Buffer>) {}

  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.readMany([{ offset, length }]))[0]!;
  }

  async readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    await Promise.resolve();
    return ranges.map((r) => {
      if (!(r.offset >= 0 && r.length >= 0 && r.offset + r.length <= this.size)) throw new RangeError(`read of ${r.length} at ${r.offset} outside the image`);
      const out = Buffer.alloc(r.length);
      const first = Math.floor(r.offset / SECTOR), last = Math.ceil((r.offset + r.length) / SECTOR);
      if (last - first > this.sectors.size) {
        for (const [s, b] of this.sectors) if (s >= first && s < last) copySector(b, s, r.offset, r.length, out);
      } else {
        for (let s = first; s < last; s++) { const b = this.sectors.get(s); if (b) copySector(b, s, r.offset, r.length, out); }
      }
      return out;
    });
  }

  bytes(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    for (let s = Math.floor(offset / SECTOR); s < Math.ceil((offset + length) / SECTOR); s++) {
      const b = this.sectors.get(s);
      if (b) copySector(b, s, offset, length, out);
    }
    return out;
  }

  /** A copy with `data` written at `offset` (copy-on-write: the original is untouched). */
  withBytes(offset: number, data: Buffer): MemReader {
    const m = new Map(this.sectors);
    const first = Math.floor(offset / SECTOR), last = Math.ceil((offset + data.length) / SECTOR);
    for (let s = first; s < last; s++) {
      const b = Buffer.from(m.get(s) ?? Buffer.alloc(SECTOR));
      const from = Math.max(s * SECTOR, offset), to = Math.min((s + 1) * SECTOR, offset + data.length);
      data.copy(b, from - s * SECTOR, from - offset, to - offset);
      m.set(s, b);
    }
    return new MemReader(this.size, m);
  }
}

function copySector(b: Buffer, s: number, offset: number, length: number, out: Buffer): void {
  const from = Math.max(s * SECTOR, offset), to = Math.min((s + 1) * SECTOR, offset + length);
  if (to > from) b.copy(out, from - offset, from - s * SECTOR, to - s * SECTOR);
}

/** Runs `use` on the real image, recording every sector it reads; returns those sectors in memory (zero sectors left out). */
export async function capture(file: string, use: (r: BlockReader) => Promise<unknown>): Promise<MemReader> {
  const dev = Device.open(file);
  try {
    const wanted = new Set<number>();
    const rec: BlockReader = {
      size: dev.size,
      read: (o, l) => rec.readMany([{ offset: o, length: l }]).then((b) => b[0]!),
      readMany: async (ranges) => {
        for (const r of ranges) for (let s = Math.floor(r.offset / SECTOR); s < Math.ceil((r.offset + r.length) / SECTOR); s++) wanted.add(s);
        return dev.readMany(ranges);
      },
    };
    await use(rec);
    const sectors = new Map<number, Buffer>();
    const keys = [...wanted].sort((a, b) => a - b);
    const zero = Buffer.alloc(SECTOR);
    for (let i = 0; i < keys.length; i += 4096) {
      const part = keys.slice(i, i + 4096);
      const bufs = await dev.readMany(part.map((s) => ({ offset: s * SECTOR, length: SECTOR })));
      part.forEach((s, k) => { if (!bufs[k]!.equals(zero)) sectors.set(s, Buffer.from(bufs[k]!)); });
    }
    return new MemReader(dev.size, sectors);
  } finally {
    dev.close();
  }
}
