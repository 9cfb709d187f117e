// The one aligned-memory pool: every buffer O_DIRECT I/O touches (copy batches, container slabs and
// staging, NBD payload arenas, restore staging) comes from here and goes back here. A fresh aligned
// allocation per read caps throughput near 1 GiB/s, and external memory is only freed when the event
// loop turns and the GC runs: so buffers are reused, by size, across jobs, up to a retained cap.
import { native } from './native';

const ALIGN = 4096;
/** Free buffers kept for reuse at most (bytes); beyond, a given-back buffer is left to the GC. */
const RETAIN_BYTES = 512 << 20;

class AlignedPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private retained = 0;
  /** Retained buffers already zeroed (their pages given back) when they were returned. */
  private readonly released = new WeakSet<ArrayBuffer>();
  /** Bytes handed out and not yet given back. */
  inUse = 0;

  take(bytes: number): ArrayBuffer {
    const size = Math.ceil(bytes / ALIGN) * ALIGN;
    const list = this.free.get(size);
    const b = list?.pop();
    this.inUse += size;
    if (b) {
      this.retained -= size;
      // As a fresh allocation would be: no bytes of an earlier user leak. A mapped buffer was
      // zeroed when it came back (its pages returned to the kernel).
      if (!this.released.delete(b)) new Uint8Array(b).fill(0);
      return b;
    }
    return native().allocAligned(size, ALIGN);
  }

  give(b: ArrayBuffer): void {
    this.inUse -= b.byteLength;
    if (this.retained + b.byteLength > RETAIN_BYTES) return;
    // A large buffer (an anonymous mapping) kept for reuse keeps no memory while it waits: its pages
    // go back to the kernel and read as zeros. 100 exports' arenas and ten finished backups'
    // containers would otherwise stay resident in the pool.
    if (native().zeroAligned(b)) this.released.add(b);
    const list = this.free.get(b.byteLength) ?? [];
    list.push(b);
    this.free.set(b.byteLength, list);
    this.retained += b.byteLength;
  }
}

const pool = new AlignedPool();

/** Zeroed memory aligned for O_DIRECT (4 KiB), from the pool. Give it back with `giveAligned` when done. */
export function takeAligned(bytes: number): ArrayBuffer {
  return pool.take(bytes);
}

/** Returns a buffer to the pool; nothing may still read or write it (no I/O in flight on it). */
export function giveAligned(b: ArrayBuffer): void {
  pool.give(b);
}

/** Bytes of aligned memory in use right now (for status). */
export function alignedBytesInUse(): number {
  return pool.inUse;
}

/** A fixed set of equal buffers lent out one at a time (FIFO among waiters), from the pool. */
export class BufferPool {
  private readonly free: ArrayBuffer[] = [];
  private readonly all: ArrayBuffer[] = [];
  private readonly waiters: Array<(b: ArrayBuffer) => void> = [];

  constructor(readonly bufferSize: number, readonly count: number) {
    for (let i = 0; i < count; i++) {
      const b = takeAligned(bufferSize);
      this.free.push(b);
      this.all.push(b);
    }
  }

  /** Resolves with a buffer as soon as one is free. */
  acquire(): Promise<ArrayBuffer> {
    const b = this.free.pop();
    if (b) return Promise.resolve(b);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  release(b: ArrayBuffer): void {
    const w = this.waiters.shift();
    if (w) w(b);
    else this.free.push(b);
  }

  get available(): number {
    return this.free.length;
  }

  /** Gives every buffer back to the pool: call once nothing uses any of them. */
  dispose(): void {
    for (const b of this.all.splice(0)) giveAligned(b);
    this.free.length = 0;
  }
}
