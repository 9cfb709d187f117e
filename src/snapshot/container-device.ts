// Containers that are storage: a file on another file system, a raw partition, or a preallocated
// file INSIDE the protected file system written by block address. All three map slot i to a byte
// offset on some fd; originals are staged in a small pool of aligned buffers and written to their slot.
import type { Device } from '../device/device';
import { BufferPool } from '../device/memory';
import { type Container, SlotStore, type Staging } from './container';

const STAGING_BYTES = 256 << 10;

interface PooledStaging extends Staging { readonly pooled: ArrayBuffer[] }

export abstract class DeviceContainer implements Container {
  abstract readonly kind: 'file' | 'inside' | 'partition';
  abstract readonly description: string;
  private readonly pool: BufferPool;
  private readonly store: SlotStore;
  protected closed = false;

  constructor(protected readonly target: Device, readonly capacity: number, readonly blockSize: number) {
    this.pool = new BufferPool(Math.max(blockSize, STAGING_BYTES), 8);
    this.store = new SlotStore(capacity);
  }

  /** Byte offset of a slot on the container's device: slots packed from offset 0 unless overridden. */
  protected slotOffset(slot: number): number {
    return slot * this.blockSize;
  }

  get used(): number { return this.store.used; }
  get peak(): number { return this.store.peak; }
  reserve(n: number): number { return this.store.reserve(n); }
  unreserve(n: number): void { this.store.unreserve(n); }
  has(block: number): boolean { return this.store.has(block); }
  blocks(): IterableIterator<number> { return this.store.blocks(); }
  drop(block: number): void { this.store.drop(block); }

  async staging(n: number): Promise<Staging> {
    this.check();
    const bytes = n * this.blockSize;
    if (bytes > this.pool.bufferSize) throw new RangeError(`staging of ${n} blocks is more than ${this.pool.bufferSize} bytes`);
    const buf = await this.pool.acquire();
    const offsets = new Float64Array(n);
    for (let i = 0; i < n; i++) offsets[i] = i * this.blockSize;
    const s: PooledStaging = { buffer: buf, offsets, pooled: [buf] };
    return s;
  }

  /** Most blocks one staging buffer holds. */
  get maxStagedBlocks(): number {
    return Math.floor(this.pool.bufferSize / this.blockSize);
  }

  async put(staging: Staging, blocks: ArrayLike<number>, ok: ArrayLike<boolean>, n: number): Promise<void> {
    const buf = (staging as PooledStaging).pooled[0]!;
    try {
      this.check();
      let k = 0;
      for (let i = 0; i < n; i++) if (ok[i]) k++;
      this.store.unreserve(n - k);
      if (k === 0) return;
      const slots = new Int32Array(k);
      this.store.bind(k, slots);
      const segs = new Float64Array(k * 3);
      const which: number[] = [];
      for (let i = 0, j = 0; i < n; i++) {
        if (!ok[i]) continue;
        segs[j * 3] = this.slotOffset(slots[j]!);
        segs[j * 3 + 1] = this.blockSize;
        segs[j * 3 + 2] = staging.offsets[i]!;
        which.push(blocks[i]!);
        j++;
      }
      const res = await this.target.writeBatch(buf, segs);
      for (let j = 0; j < k; j++) {
        if (res[j] !== this.blockSize) {
          for (let q = 0; q < k; q++) this.store.release(slots[q]!);
          throw containerIoError('writing', this.description, res[j]!);
        }
      }
      for (let j = 0; j < k; j++) this.store.hold(which[j]!, slots[j]!);
    } finally {
      this.pool.release(buf);
    }
  }

  async get(blocks: ArrayLike<number>, buffer: ArrayBuffer, offsets: ArrayLike<number>, n: number): Promise<void> {
    this.check();
    const segs = new Float64Array(n * 3);
    for (let i = 0; i < n; i++) {
      const slot = this.store.slotOf(blocks[i]!);
      if (slot === undefined) throw new Error(`the container holds no original of block ${blocks[i]}`);
      segs[i * 3] = this.slotOffset(slot);
      segs[i * 3 + 1] = this.blockSize;
      segs[i * 3 + 2] = offsets[i]!;
    }
    const res = await this.target.readBatch(buffer, segs);
    for (let i = 0; i < n; i++) if (res[i] !== this.blockSize) throw containerIoError('reading', this.description, res[i]!);
  }

  excludedRanges(): ReadonlyArray<{ offset: number; length: number }> {
    return [];
  }

  /** The staging buffers go back to the pool (subclasses call it from close()). */
  protected releaseStaging(): void {
    this.pool.dispose();
  }

  private check(): void {
    if (this.closed) throw new Error(`the container ${this.description} was released`);
  }

  abstract close(): Promise<void>;
}

function containerIoError(what: string, desc: string, res: number): Error {
  const errno = res < 0 ? -res : 0;
  const err = new Error(`${what} the intermediate container ${desc} failed (${errno ? `errno ${errno}` : `short transfer of ${res} bytes`})`) as NodeJS.ErrnoException;
  if (errno) err.errno = errno;
  if (errno === 28) err.code = 'ENOSPC';
  if (errno === 5) err.code = 'EIO';
  return err;
}
