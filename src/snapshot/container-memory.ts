// The default container: one aligned allocation in this process. Its staging memory is the slots
// themselves: the copy-before-write read lands straight in the slot (through the I/O ring), and put
// only records which block it holds; get copies the slot into the copier's batch buffer.
import { ioRing } from '../device/io-ring';
import { giveAligned, takeAligned } from '../device/memory';
import { type Container, SlotStore, type Staging } from './container';

interface SlotStaging extends Staging { readonly slots: Int32Array }

export class MemoryContainer implements Container {
  readonly kind = 'memory' as const;
  readonly capacity: number;
  private mem?: ArrayBuffer;
  private readonly store: SlotStore;
  private readonly ringIndex: number | undefined;

  constructor(bytes: number, readonly blockSize: number) {
    this.capacity = Math.floor(bytes / blockSize);
    if (this.capacity < 1) throw new RangeError(`a container of ${bytes} bytes holds no ${blockSize}-byte block`);
    this.mem = takeAligned(this.capacity * blockSize);
    this.store = new SlotStore(this.capacity);
    // Saves (copy-before-write reads, one block or a few, with a writer waiting) go through the
    // I/O ring: Device.readBatch uses it for registered memory.
    this.ringIndex = ioRing()?.register(this.mem);
  }

  get description(): string { return `memory (${this.capacity * this.blockSize} bytes)`; }
  get used(): number { return this.store.used; }
  get peak(): number { return this.store.peak; }
  reserve(n: number): number { return this.store.reserve(n); }
  unreserve(n: number): void { this.store.unreserve(n); }
  has(block: number): boolean { return this.store.has(block); }
  blocks(): IterableIterator<number> { return this.store.blocks(); }
  drop(block: number): void { this.store.drop(block); }

  async staging(n: number): Promise<Staging> {
    const mem = this.live();
    const slots = new Int32Array(n);
    this.store.bind(n, slots);
    const offsets = new Float64Array(n);
    for (let i = 0; i < n; i++) offsets[i] = slots[i]! * this.blockSize;
    const s: SlotStaging = { buffer: mem, offsets, slots };
    return s;
  }

  async put(staging: Staging, blocks: ArrayLike<number>, ok: ArrayLike<boolean>, n: number): Promise<void> {
    const { slots } = staging as SlotStaging;
    for (let i = 0; i < n; i++) {
      if (ok[i]) this.store.hold(blocks[i]!, slots[i]!);
      else this.store.release(slots[i]!);
    }
  }

  async get(blocks: ArrayLike<number>, buffer: ArrayBuffer, offsets: ArrayLike<number>, n: number): Promise<void> {
    const mem = this.live();
    const bs = this.blockSize;
    const dst = new Uint8Array(buffer);
    for (let i = 0; i < n; i++) {
      const slot = this.store.slotOf(blocks[i]!);
      if (slot === undefined) throw new Error(`the container holds no original of block ${blocks[i]}`);
      dst.set(new Uint8Array(mem, slot * bs, bs), offsets[i]!);
    }
  }

  excludedRanges(): ReadonlyArray<{ offset: number; length: number }> {
    return [];
  }

  private live(): ArrayBuffer {
    if (!this.mem) throw new Error('the memory container was released');
    return this.mem;
  }

  async close(): Promise<void> {
    const mem = this.mem;
    if (!mem) return;
    this.mem = undefined;
    // Back to the pool only once no ring operation can still touch it.
    if (this.ringIndex !== undefined) await ioRing()!.unregisterWhenIdle(this.ringIndex).catch(() => {});
    giveAligned(mem);
  }
}
