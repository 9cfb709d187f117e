// The GNU sparse 1.0 map of the disk image: the used blocks joined into maximal data regions, holes
// for the free blocks. In the archive it is the start of the member's data: ASCII decimal lines
// (entry count, then offset and size of each region), padded with zeros to a 512-byte block.
import type { Bitset } from '../util/bitset';
import { BLOCK, padTo512 } from './pax-header';

export interface SparseMap {
  /** The image's size (GNU.sparse.realsize). */
  realSize: number;
  /** Data regions as [offset, size] pairs in bytes, ascending, non-adjacent (holes between). */
  regions: Float64Array;
  /** Number of data regions (regions.length / 2). */
  count: number;
  /** Bytes of data stored (sum of region sizes). */
  storedBytes: number;
}

/** Joins runs of used blocks into regions (runs are maximal, so regions are never adjacent); the
 *  last block is clamped to the volume size. */
export function sparseMapFromBitset(used: Bitset, blockSize: number, volumeSize: number): SparseMap {
  const nbits = Math.min(used.size, Math.ceil(volumeSize / blockSize));
  let regions = new Float64Array(1024);
  let count = 0;
  let stored = 0;
  for (const [start, end] of used.runs(0, nbits)) {
    const off = start * blockSize;
    const size = Math.min(end * blockSize, volumeSize) - off;
    if (count * 2 + 2 > regions.length) {
      const grown = new Float64Array(regions.length * 2);
      grown.set(regions);
      regions = grown;
    }
    regions[count * 2] = off;
    regions[count * 2 + 1] = size;
    count++;
    stored += size;
  }
  return { realSize: volumeSize, regions: regions.subarray(0, count * 2), count, storedBytes: stored };
}

/** Entries written to the archive: the regions, plus (realSize, 0) when the image ends in a hole
 *  (GNU tar truncates the extracted file to that entry's offset; without it the size would be short). */
export function mapEntryCount(map: SparseMap): number {
  const endsInHole = map.count === 0 || map.regions[map.count * 2 - 2]! + map.regions[map.count * 2 - 1]! < map.realSize;
  return map.count + (endsInHole ? 1 : 0);
}

/** The map as it is stored at the start of the member data, padded to 512 bytes. */
export function encodeSparseMap(map: SparseMap): Buffer {
  const entries = mapEntryCount(map);
  const lines: string[] = [String(entries)];
  for (let k = 0; k < map.count; k++) lines.push(String(map.regions[k * 2]!), String(map.regions[k * 2 + 1]!));
  if (entries > map.count) lines.push(String(map.realSize), '0');
  const text = lines.join('\n') + '\n';
  const len = Buffer.byteLength(text, 'latin1');
  const out = Buffer.alloc(len + padTo512(len));
  out.write(text, 0, 'latin1');
  return out;
}

export { BLOCK };
