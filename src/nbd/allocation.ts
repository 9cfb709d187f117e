// Allocation status of an export's bytes (the base:allocation metadata context of NBD_CMD_BLOCK_STATUS):
// which ranges are holes, which read as zeroes. Backends report it through NbdBackend.extents; this
// file also turns a used-block map (one bit per block: used or free) into such extents, for a
// backend that knows which blocks hold data and reports the free ones as holes.

/** One run of bytes with one allocation status. */
export interface AllocationExtent {
  /** Bytes in the run (> 0). */
  length: number;
  /** Not allocated in the backing store (NBD_STATE_HOLE). */
  hole: boolean;
  /** Reads back as zeroes (NBD_STATE_ZERO). Only claim it when a READ of the run returns zeroes. */
  zero: boolean;
}

/**
 * A used-block map (a bitset, for instance): bit i says whether block i is used. Only
 * `next` is needed (the first index at or after `from` whose bit equals `value`, or `size`).
 */
export interface UsedBlockMap {
  readonly size: number;
  next(from: number, value: boolean): number;
}

export interface UsedBlockOptions {
  /** Bytes per block of the map. */
  blockSize: number;
  /** The export's size in bytes (the last block may be partial). */
  exportSize: number;
  /** True when the backend's READ of a free block returns zeroes: free blocks are then holes AND zero. */
  freeReadsAsZero: boolean;
}

/**
 * Extents of [offset, offset + length) from a used-block map: used blocks are data, free blocks
 * holes (and zero when the backend reads them as zeroes). Stops after `maxExtents` runs; the caller
 * asks again from where the answer ended. Exact at any offset (no 32-bit arithmetic).
 */
export function usedBlockExtents(map: UsedBlockMap, opts: UsedBlockOptions, offset: number, length: number, maxExtents = 1024): AllocationExtent[] {
  const bs = opts.blockSize;
  const end = Math.min(offset + length, opts.exportSize);
  const out: AllocationExtent[] = [];
  let pos = offset;
  while (pos < end && out.length < maxExtents) {
    const block = Math.floor(pos / bs);
    const used = block < map.size ? map.next(block, true) === block : false;
    // The run ends where the map flips (or at the map's end: past it every block counts as free).
    const flip = block < map.size ? map.next(block, !used) : Number.POSITIVE_INFINITY;
    const runEnd = Math.min(end, flip * bs);
    out.push({ length: runEnd - pos, hole: !used, zero: !used && opts.freeReadsAsZero });
    pos = runEnd;
  }
  return out;
}
