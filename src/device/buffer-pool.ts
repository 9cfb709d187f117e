// Aligned buffers allocated once and reused: a fresh aligned allocation per read caps throughput
// near 1 GiB/s here, and external memory is only freed when the event loop turns.
import { native } from './native';

export class BufferPool {
  private readonly free: ArrayBuffer[] = [];
  private readonly waiters: Array<(b: ArrayBuffer) => void> = [];

  constructor(readonly bufferSize: number, readonly count: number, alignment = 4096) {
    for (let i = 0; i < count; i++) this.free.push(native().allocAligned(bufferSize, alignment));
  }

  /** Resolves with a buffer as soon as one is free (FIFO among waiters). */
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
}
