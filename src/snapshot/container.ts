// The intermediate block container (seed 000 claims 1-5, seed 001 FIG. 10-12): where the original of
// a block goes when a write reaches it before the copier does. A container only moves bytes between
// the protected device and its numbered slots; which slot is free is the SlotAllocator's business.
import type { Device } from '../device/device';

export interface Container {
  /** "memory 64 MiB", "file /mnt/other/cow (64 MiB)", ... */
  readonly description: string;
  readonly kind: 'memory' | 'file' | 'inside' | 'partition';
  /** Number of block slots. */
  readonly capacity: number;
  readonly blockSize: number;
  /**
   * Copies `count` blocks from the device (block numbers `blocks[i]`, byte offset blocks[i]*blockSize,
   * `lengths[i]` bytes — shorter only for an odd-sized volume's last block) into `slots[i]`.
   * Resolves with one entry per block: 0 = saved, >0 = errno of the failed DEVICE read (the block is
   * bad). A failure of the container itself rejects.
   */
  save(dev: Device, blocks: ArrayLike<number>, lengths: ArrayLike<number>, slots: ArrayLike<number>, count: number): Promise<Int32Array>;
  /** Copies slots into `buffer` at `bufOffsets[i]` (blockSize bytes each). Rejects on failure. */
  load(slots: ArrayLike<number>, buffer: ArrayBuffer, bufOffsets: ArrayLike<number>, count: number): Promise<void>;
  /**
   * Byte ranges of the PROTECTED device the container occupies (a container inside the protected
   * file system): left out of the backup and out of copy-on-write. Block-aligned.
   */
  excludedRanges(): ReadonlyArray<{ offset: number; length: number }>;
  /** Frees memory, removes a container file. Never throws. */
  close(): Promise<void>;
}

/** Free container slots: a stack, O(1) take and give back. */
export class SlotAllocator {
  private readonly free: Int32Array;
  private top: number;
  /** Most slots ever in use at once. */
  peak = 0;

  constructor(readonly capacity: number) {
    this.free = new Int32Array(capacity);
    for (let i = 0; i < capacity; i++) this.free[i] = capacity - 1 - i;
    this.top = capacity;
  }

  get used(): number {
    return this.capacity - this.top;
  }

  get available(): number {
    return this.top;
  }

  /** Fraction of the container in use, 0..1. */
  get fill(): number {
    return this.capacity === 0 ? 1 : (this.capacity - this.top) / this.capacity;
  }

  /** Takes up to `n` slots into `out` (from index 0); returns how many. */
  take(n: number, out: Int32Array): number {
    const k = Math.min(n, this.top, out.length);
    for (let i = 0; i < k; i++) out[i] = this.free[--this.top]!;
    if (this.capacity - this.top > this.peak) this.peak = this.capacity - this.top;
    return k;
  }

  give(slot: number): void {
    if (slot < 0) return;
    this.free[this.top++] = slot;
  }
}

/** Shared by the device-backed containers: read originals into a staging buffer, write them to slots. */
export async function saveViaStaging(
  dev: Device,
  staging: ArrayBuffer,
  blockSize: number,
  blocks: ArrayLike<number>,
  lengths: ArrayLike<number>,
  count: number,
  /** Writes staged blocks base..base+n-1 (at staging offset (i-base)*blockSize) where ok[i-base] is 1. */
  writeSlots: (buffer: ArrayBuffer, base: number, n: number, ok: Int32Array) => Promise<void>,
): Promise<Int32Array> {
  const out = new Int32Array(count);
  const per = Math.floor(staging.byteLength / blockSize);
  for (let base = 0; base < count; base += per) {
    const n = Math.min(per, count - base);
    const segs = new Float64Array(n * 3);
    for (let i = 0; i < n; i++) {
      segs[i * 3] = blocks[base + i]! * blockSize;
      segs[i * 3 + 1] = roundUp512(lengths[base + i]!);
      segs[i * 3 + 2] = i * blockSize;
    }
    const res = await dev.readBatch(staging, segs);
    const ok = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      const got = res[i]!;
      if (got === segs[i * 3 + 1]! || (got >= lengths[base + i]!)) { ok[i] = 1; continue; }
      out[base + i] = got < 0 ? -got : 5;
    }
    await writeSlots(staging, base, n, ok);
  }
  return out;
}

export function roundUp512(n: number): number {
  return Math.ceil(n / 512) * 512;
}
