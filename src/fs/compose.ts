// Builds the map of a device from the maps of what it holds: each volume's map (any block size) is
// placed at its byte offsets through the public map API (runs() in, setRange() out), rounding each
// run outward to the device's blocks so that nothing is ever lost at a boundary.
import { Bitset } from '../util/bitset';
import type { UsedBlockMap } from './used-map';

/** A volume's byte range [start, end) -> the device byte ranges that hold it, in order. */
export type PieceMapper = (start: number, end: number) => Iterable<[number, number]>;

export class MapBuilder {
  readonly bitmap: Bitset;
  readonly totalBlocks: number;

  constructor(readonly size: number, readonly blockSize: number) {
    this.totalBlocks = Math.ceil(size / blockSize);
    this.bitmap = new Bitset(this.totalBlocks);
  }

  /** Marks device bytes [start, end) as used (clamped to the device, rounded out to whole blocks). */
  markBytes(start: number, end: number): void {
    const s = Math.max(0, start);
    const e = Math.min(this.size, end);
    if (e <= s) return;
    this.bitmap.setRange(Math.floor(s / this.blockSize), Math.ceil(e / this.blockSize));
  }

  /**
   * Places `map` (of a volume `length` bytes long) on the device through `pieces`; returns the
   * volume's used bytes (its own count, clamped to its length).
   */
  markMap(map: UsedBlockMap, length: number, pieces: PieceMapper): number {
    const bs = map.blockSize;
    let used = 0;
    for (const [s, e] of map.bitmap.runs()) {
      const a = s * bs;
      const b = Math.min(e * bs, length);
      if (b <= a) continue;
      used += b - a;
      for (const [x, y] of pieces(a, b)) this.markBytes(x, y);
    }
    return used;
  }

  /** Places a contiguous volume's map at device byte `offset`. */
  markVolume(map: UsedBlockMap, offset: number, length: number): number {
    return this.markMap(map, length, (a, b) => [[offset + a, offset + b]]);
  }

  /** Used bytes of the device in [start, end) by whole blocks (blocks straddling the ends count). */
  usedBytes(start: number, end: number): number {
    const s = Math.floor(Math.max(0, start) / this.blockSize);
    const e = Math.ceil(Math.min(this.size, end) / this.blockSize);
    if (e <= s) return 0;
    const n = this.bitmap.count(s, e);
    return Math.min(n * this.blockSize, Math.max(0, Math.min(this.size, end) - Math.max(0, start)));
  }
}

/**
 * The device's block size: 4096 when every boundary (partition starts and ends, PV data areas,
 * extents) is 4 KiB-aligned, so maps convert exactly and the copy moves whole pages; else 512,
 * the sector every partition table and volume manager aligns to.
 */
export function chooseBlockSize(boundaries: Iterable<number>): number {
  for (const b of boundaries) if (b % 4096 !== 0) return 512;
  return 4096;
}
