// Walks a used-block map and streams those blocks from a device into a sink, in ascending order,
// with several large batches in flight (one native call per batch, no per-block promises).
// Unreadable blocks are found by re-reading a failed segment block by block, then handled by the
// error policy (seed 001, FIG. 15): abort, or mark the block invalid, write zeros and go on.
import { BufferPool } from '../device/buffer-pool';
import { RateLimit } from './rate-limit';
import type { Device } from '../device/device';
import type { BackupSink } from '../sink/sink';
import type { Bitset } from '../util/bitset';
import { UserError } from '../util/errors';

export type ErrorPolicy = 'abort' | 'ignore';

export interface CopyProgress {
  bytesDone: number;
  bytesTotal: number;
  badBlocks: number;
}

export interface CopyOptions {
  source: Device;
  /** Blocks to copy (bit i = bytes [i*blockSize, (i+1)*blockSize) of the source). */
  blocks: Bitset;
  blockSize: number;
  sink: BackupSink;
  onError?: ErrorPolicy;
  /** Bytes per batch buffer (default 8 MiB). */
  batchBytes?: number;
  /** Batches in flight (default 4). */
  depth?: number;
  /** Bytes per second at most (--max-rate); unlimited when absent. */
  maxRate?: number;
  /** Free gaps up to this many bytes between used runs are read through (default 128 KiB). */
  maxGapBytes?: number;
  onProgress?: (p: CopyProgress) => void;
  signal?: AbortSignal;
}

export interface CopyResult {
  bytes: number;
  blocks: number;
  badBlocks: number[];
  durationMs: number;
}

export class UnreadableBlockError extends UserError {
  constructor(readonly block: number, readonly offset: number, device: string, errno: number) {
    super(
      `block ${block} (byte offset ${offset}) of ${device} cannot be read (errno ${errno})`,
      'the device has a bad block; rerun with "--on-error ignore" to write zeros for it and list it as bad',
    );
  }
}

interface Batch {
  buffer: ArrayBuffer;
  /** What is read from the source: used runs joined across small free gaps. */
  reads: Float64Array;
  readCount: number;
  /** What the sink gets: the used runs only (volume offset, length, buffer offset). */
  segments: Float64Array;
  count: number;
}

const SECTOR = 512;

export async function copyBlocks(opts: CopyOptions): Promise<CopyResult> {
  const started = performance.now();
  const { source, blocks, blockSize, sink } = opts;
  const policy = opts.onError ?? 'abort';
  const batchBytes = opts.batchBytes ?? 8 << 20;
  const depth = opts.depth ?? 4;
  // Reading a short free gap costs less than another I/O: one 256 KiB read beats two 4 KiB ones.
  const maxGap = opts.maxGapBytes ?? 128 << 10;
  const maxSegments = 4096;
  const size = source.size;
  const bytesTotal = Math.min(blocks.count() * blockSize, size);
  const pool = new BufferPool(batchBytes, depth);
  const badBlocks: number[] = [];
  let bytesDone = 0;
  let blocksDone = 0;

  const runs = blocks.runs();
  let pending: [number, number] | undefined; // byte range not yet placed in a batch

  /** Fills one batch buffer with the next runs; undefined when the map is exhausted. */
  // Segment tables live with their buffer and are reused with it: no allocation per batch.
  const tables = new Map<ArrayBuffer, { segs: Float64Array; reads: Float64Array }>();
  const nextBatch = (buffer: ArrayBuffer): Batch | undefined => {
    let tab = tables.get(buffer);
    if (!tab) tables.set(buffer, (tab = { segs: new Float64Array(maxSegments * 3), reads: new Float64Array(maxSegments * 3) }));
    const { segs, reads } = tab;
    let used = 0; // buffer bytes consumed (read spans, gaps included)
    let n = 0;
    let nr = 0;
    let readEnd = -1; // end (volume offset) of the current read span
    while (n < maxSegments) {
      if (!pending) {
        const r = runs.next();
        if (r.done) break;
        const start = r.value[0] * blockSize;
        if (start >= size) break;
        pending = [start, Math.min(r.value[1] * blockSize, size)];
      }
      const [s, e] = pending;
      const joins = nr > 0 && s >= readEnd && s - readEnd <= maxGap;
      const gap = joins ? s - readEnd : 0;
      const room = batchBytes - used - gap;
      if (room < SECTOR) break;
      const take = Math.min(e - s, room);
      // Lengths stay sector-aligned for O_DIRECT; a device size that is not is padded (zero-filled).
      const len = Math.ceil(take / SECTOR) * SECTOR;
      if (len > room) break;
      if (joins) {
        reads[(nr - 1) * 3 + 1]! += gap + len;
      } else {
        reads[nr * 3] = s;
        reads[nr * 3 + 1] = len;
        reads[nr * 3 + 2] = used;
        nr++;
      }
      segs[n * 3] = s;
      segs[n * 3 + 1] = len;
      segs[n * 3 + 2] = used + gap;
      n++;
      used += gap + len;
      readEnd = s + len;
      pending = s + take < e ? [s + take, e] : undefined;
      if (pending) break; // the buffer is full
    }
    if (n === 0) return undefined;
    return { buffer, reads: reads.subarray(0, nr * 3), readCount: nr, segments: segs.subarray(0, n * 3), count: n };
  };

  const readBatch = async (b: Batch): Promise<Batch> => {
    const res = await source.readBatch(b.buffer, b.reads);
    for (let i = 0; i < b.readCount; i++) {
      const off = b.reads[i * 3]!, len = b.reads[i * 3 + 1]!, at = b.reads[i * 3 + 2]!;
      const got = res[i]!;
      if (got === len) continue;
      if (got >= 0 && off + got >= size) {
        new Uint8Array(b.buffer, at + got, len - got).fill(0); // past the end of an odd-sized source
        continue;
      }
      // Only the used blocks inside the failed span matter: an unreadable free block is no loss.
      for (let j = 0; j < b.count; j++) {
        const so = b.segments[j * 3]!;
        if (so >= off && so < off + len) await rereadByBlock(b.buffer, so, b.segments[j * 3 + 1]!, b.segments[j * 3 + 2]!);
      }
    }
    return b;
  };

  /**
   * A span failed: find which used blocks are unreadable and apply the error policy to each.
   * Adjacent reads submitted together get merged by the block layer into one request that fails
   * as a whole, so even and odd blocks go in two separate batches: no two reads in flight touch.
   */
  const rereadByBlock = async (buffer: ArrayBuffer, off: number, len: number, at: number): Promise<void> => {
    const n = Math.ceil(len / blockSize);
    for (let parity = 0; parity < 2; parity++) {
      const count = Math.floor((n - parity + 1) / 2);
      if (count <= 0) continue;
      const segs = new Float64Array(count * 3);
      for (let k = 0; k < count; k++) {
        const j = parity + 2 * k;
        const o = off + j * blockSize;
        segs[k * 3] = o;
        segs[k * 3 + 1] = Math.min(blockSize, off + len - o);
        segs[k * 3 + 2] = at + j * blockSize;
      }
      const res = await source.readBatch(buffer, segs);
      for (let k = 0; k < count; k++) {
        const want = segs[k * 3 + 1]!;
        const got = res[k]!;
        if (got === want || (got >= 0 && segs[k * 3]! + got >= size)) continue;
        const block = Math.floor(segs[k * 3]! / blockSize);
        const errno = got < 0 ? -got : 5;
        if (policy === 'abort') throw new UnreadableBlockError(block, segs[k * 3]!, source.path, errno);
        badBlocks.push(block);
        new Uint8Array(buffer, segs[k * 3 + 2]!, want).fill(0);
      }
    }
  };

  const rate = new RateLimit(opts.maxRate);
  const inflight: Array<Promise<Batch>> = [];
  // A rejected read not yet awaited must not become an unhandled rejection while we wait on others.
  const track = (p: Promise<Batch>) => { p.catch(() => {}); inflight.push(p); };
  const deliver = async (b: Batch) => {
    await sink.write({ buffer: b.buffer, segments: b.segments });
    for (let i = 0; i < b.count; i++) bytesDone += Math.min(b.segments[i * 3 + 1]!, size - b.segments[i * 3]!);
    blocksDone = Math.round(bytesDone / blockSize);
    pool.release(b.buffer);
    opts.onProgress?.({ bytesDone, bytesTotal, badBlocks: badBlocks.length });
    await rate.pace(bytesDone);
  };

  try {
    for (;;) {
      if (opts.signal?.aborted) throw opts.signal.reason instanceof Error ? opts.signal.reason : new Error('cancelled');
      const buffer = await pool.acquire();
      const b = nextBatch(buffer);
      if (!b) { pool.release(buffer); break; }
      track(readBatch(b));
      if (inflight.length >= depth) await deliver(await inflight.shift()!);
    }
    while (inflight.length) await deliver(await inflight.shift()!);
  } catch (e) {
    // Let reads still in flight land before their buffers can be collected.
    await Promise.allSettled(inflight);
    throw e;
  }
  badBlocks.sort((a, b) => a - b);
  return { bytes: bytesDone, blocks: blocksDone, badBlocks, durationMs: performance.now() - started };
}
