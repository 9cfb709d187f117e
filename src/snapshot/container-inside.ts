// file:PATH INSIDE the protected file system (seed 000 claim 5): a preallocated file whose extents
// (FIEMAP) are written directly by block address through the protected device, never through the
// file system. Its blocks are left out of the backup and out of copy-on-write: the file system does
// not write them (they belong to the file), and only this container does. In the image the file
// still exists (its inode was there at the instant), with zeros or stale bytes as content.
import * as fs from 'node:fs';
import type { Device } from '../device/device';
import { DeviceContainer } from './container-device';

export class InsideContainer extends DeviceContainer {
  readonly kind = 'inside' as const;

  /** `slotOffsets[i]`: byte offset on the protected device of slot i (block-aligned, inside the file). */
  constructor(protectedDevice: Device, readonly path: string, private readonly slotOffsets: Float64Array, blockSize: number) {
    super(protectedDevice, slotOffsets.length, blockSize);
  }

  get description(): string {
    return `file ${this.path} inside the protected file system (${this.capacity * this.blockSize} bytes)`;
  }

  protected override slotOffset(slot: number): number {
    return this.slotOffsets[slot]!;
  }

  override excludedRanges(): ReadonlyArray<{ offset: number; length: number }> {
    const out: Array<{ offset: number; length: number }> = [];
    const sorted = Float64Array.from(this.slotOffsets).sort();
    for (const off of sorted) {
      const last = out[out.length - 1];
      if (last && last.offset + last.length === off) last.length += this.blockSize;
      else out.push({ offset: off, length: this.blockSize });
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.releaseStaging();
    // The protected device belongs to the caller: only the file goes.
    // On the thread pool: the file lives in the served file system.
    await fs.promises.rm(this.path, { force: true }).catch(() => { /* best effort */ });
  }
}

const FIEMAP_BAD_FLAGS = 0x2 /* UNKNOWN */ | 0x4 /* DELALLOC */ | 0x8 /* ENCODED */ | 0x80 /* DATA_ENCRYPTED */
  | 0x100 /* NOT_ALIGNED */ | 0x200 /* DATA_INLINE */ | 0x400 /* DATA_TAIL */ | 0x2000 /* SHARED */;

/** Slot offsets: every whole, block-aligned block inside the file's extents. */
export function slotsFromExtents(extents: Float64Array, blockSize: number, deviceSize: number): Float64Array {
  const out: number[] = [];
  for (let i = 0; i + 3 < extents.length; i += 4) {
    const phys = extents[i + 1]!, len = extents[i + 2]!, flags = extents[i + 3]!;
    if ((flags & FIEMAP_BAD_FLAGS) !== 0) continue;
    let s = Math.ceil(phys / blockSize) * blockSize;
    const e = Math.min(phys + len, deviceSize);
    for (; s + blockSize <= e; s += blockSize) out.push(s);
  }
  return Float64Array.from(out);
}
