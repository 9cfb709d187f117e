// The intermediate block container (seed 000 claims 1-5, seed 001 FIG. 10-12): where the original of
// a block goes when a write reaches it before the copier does. It holds originals BY BLOCK NUMBER:
// the copy-before-write filter reads the original from the device into the room the container lends
// (its own memory, or a staging buffer), then puts it; the copier gets it back and drops it. Room is
// reserved first, so a full container is backpressure (the writer waits), never a failed write. A
// remote container (the backup appliance) fits the same interface: put sends, has answers from what
// the far side acknowledged.

export interface Staging {
  /** Aligned memory the originals are read into; block i of the put goes at offsets[i]. */
  readonly buffer: ArrayBuffer;
  readonly offsets: Float64Array;
}

export interface Container {
  /** "memory (64 MiB)", "file /mnt/other/cow (64 MiB)", ... */
  readonly description: string;
  readonly kind: 'memory' | 'file' | 'inside' | 'partition' | 'remote';
  readonly blockSize: number;
  /** Blocks it can hold at most. */
  readonly capacity: number;
  /** Blocks held or reserved now, and the most ever at once. */
  readonly used: number;
  readonly peak: number;
  /** Reserves room for up to `n` blocks; returns how many (0: full). */
  reserve(n: number): number;
  /** Gives back reserved room that was not put (a claim failed, or the read of an original did). */
  unreserve(n: number): void;
  /** Memory to read `n` (reserved) originals into before put(). */
  staging(n: number): Promise<Staging>;
  /**
   * Stores the staged originals of `blocks[i]` for which ok[i] is true, keyed by block; the room of
   * the others is given back. Rejects only when the container itself fails (the backup is lost).
   */
  put(staging: Staging, blocks: ArrayLike<number>, ok: ArrayLike<boolean>, n: number): Promise<void>;
  has(block: number): boolean;
  /** The blocks held, in no particular order. */
  blocks(): IterableIterator<number>;
  /** Copies the originals of `blocks[i]` into `buffer` at `offsets[i]` (blockSize bytes each). */
  get(blocks: ArrayLike<number>, buffer: ArrayBuffer, offsets: ArrayLike<number>, n: number): Promise<void>;
  /** Forgets a block (its original reached the backup, or is not needed): its room is free again. */
  drop(block: number): void;
  /**
   * Byte ranges of the PROTECTED device the container occupies (a container inside the protected
   * file system): left out of the backup and out of copy-before-write. Block-aligned.
   */
  excludedRanges(): ReadonlyArray<{ offset: number; length: number }>;
  /** Frees memory, removes a container file. Never throws. */
  close(): Promise<void>;
}

/** Free slots: a stack, O(1) take and give back. */
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

  get used(): number { return this.capacity - this.top; }
  get available(): number { return this.top; }
  /** Fraction of the slots in use, 0..1. */
  get fill(): number { return this.capacity === 0 ? 1 : (this.capacity - this.top) / this.capacity; }

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

/**
 * The bookkeeping every local container shares: room (reserved + held), and the slot of each held
 * block. Reservations are counted, not assigned: a slot is bound when the block is put (memory
 * containers bind at staging time, since their staging memory is the slot itself).
 */
export class SlotStore {
  private readonly slots: SlotAllocator;
  private readonly bySlot = new Map<number, number>();
  private reserved = 0;
  peak = 0;

  constructor(readonly capacity: number) {
    this.slots = new SlotAllocator(capacity);
  }

  get used(): number { return this.slots.used + this.reserved; }

  reserve(n: number): number {
    const k = Math.max(0, Math.min(n, this.capacity - this.used));
    this.reserved += k;
    if (this.used > this.peak) this.peak = this.used;
    return k;
  }

  unreserve(n: number): void {
    this.reserved = Math.max(0, this.reserved - n);
  }

  /** Turns `n` reservations into slots (into `out`). */
  bind(n: number, out: Int32Array): void {
    const k = this.slots.take(n, out);
    if (k !== n) throw new Error(`container bookkeeping: ${n} reserved slots asked, ${k} free`);
    this.reserved -= n;
  }

  /** A bound slot back to the free list (its block was not stored). */
  release(slot: number): void {
    this.slots.give(slot);
  }

  /** Records that `block` now lives in `slot`. */
  hold(block: number, slot: number): void {
    const old = this.bySlot.get(block);
    if (old !== undefined) this.slots.give(old); // only the first original of a block counts: never happens twice
    this.bySlot.set(block, slot);
  }

  slotOf(block: number): number | undefined { return this.bySlot.get(block); }
  has(block: number): boolean { return this.bySlot.has(block); }
  blocks(): IterableIterator<number> { return this.bySlot.keys(); }
  get held(): number { return this.bySlot.size; }

  drop(block: number): void {
    const s = this.bySlot.get(block);
    if (s === undefined) return;
    this.bySlot.delete(block);
    this.slots.give(s);
  }
}

export function roundUp512(n: number): number {
  return Math.ceil(n / 512) * 512;
}
