// The default container: one aligned allocation in this process. A save reads the original straight
// into its slot (no staging copy); a load copies the slot into the copier's batch buffer.
import type { Device } from '../device/device';
import { ioRing } from '../device/io-ring';
import { native } from '../device/native';
import { type Container, roundUp512 } from './container';

export class MemoryContainer implements Container {
  readonly kind = 'memory' as const;
  readonly capacity: number;
  private mem?: ArrayBuffer;

  constructor(bytes: number, readonly blockSize: number) {
    this.capacity = Math.floor(bytes / blockSize);
    if (this.capacity < 1) throw new RangeError(`a container of ${bytes} bytes holds no ${blockSize}-byte block`);
    this.mem = native().allocAligned(this.capacity * blockSize, 4096);
    // Saves (copy-before-write reads, one block or a few, with a writer waiting) go through the
    // I/O ring: Device.readBatch uses it for registered memory.
    this.ringIndex = ioRing()?.register(this.mem);
  }

  private readonly ringIndex: number | undefined;

  get description(): string {
    return `memory (${this.capacity * this.blockSize} bytes)`;
  }

  async save(dev: Device, blocks: ArrayLike<number>, lengths: ArrayLike<number>, slots: ArrayLike<number>, count: number): Promise<Int32Array> {
    const mem = this.mem;
    if (!mem) throw new Error('the memory container was released');
    const bs = this.blockSize;
    const segs = new Float64Array(count * 3);
    for (let i = 0; i < count; i++) {
      segs[i * 3] = blocks[i]! * bs;
      segs[i * 3 + 1] = roundUp512(lengths[i]!);
      segs[i * 3 + 2] = slots[i]! * bs;
    }
    // A writer is held until this read lands: urgent.
    const res = await dev.readBatch(mem, segs, { urgent: true });
    const out = new Int32Array(count);
    for (let i = 0; i < count; i++) {
      const got = res[i]!;
      if (got === segs[i * 3 + 1]! || got >= lengths[i]!) continue;
      out[i] = got < 0 ? -got : 5;
    }
    return out;
  }

  async load(slots: ArrayLike<number>, buffer: ArrayBuffer, bufOffsets: ArrayLike<number>, count: number): Promise<void> {
    const mem = this.mem;
    if (!mem) throw new Error('the memory container was released');
    const bs = this.blockSize;
    const dst = new Uint8Array(buffer);
    for (let i = 0; i < count; i++) dst.set(new Uint8Array(mem, slots[i]! * bs, bs), bufOffsets[i]!);
  }

  excludedRanges(): ReadonlyArray<{ offset: number; length: number }> {
    return [];
  }

  async close(): Promise<void> {
    this.mem = undefined;
    if (this.ringIndex !== undefined) await ioRing()!.unregisterWhenIdle(this.ringIndex).catch(() => {});
  }
}
