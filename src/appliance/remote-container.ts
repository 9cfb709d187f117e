// The host's container when the backup goes to an appliance: put() sends the originals over the link
// and resolves when the appliance acknowledged them (they are in its ODC), and only then does the
// held write go on (seed 002, claim 3). The host keeps nothing: has() is always false, and its room
// is only the originals in flight (a bounded staging pool), so a slow appliance slows the writers
// of not-yet-saved blocks and nobody else. fail() rejects every put in flight: the write then goes
// on (copy-before-write never fails a client's write) and the backup is lost.
import { BufferPool } from '../device/memory';
import { type Container, SlotStore, type Staging } from '../snapshot/container';
import type { HostLink } from './link';

const STAGING_BLOCKS = 64;
const STAGING_BUFFERS = 32;

interface Pending { id: number; resolve: () => void; reject: (e: Error) => void }

export class RemoteContainer implements Container {
  readonly kind = 'remote' as const;
  readonly capacity: number;
  private readonly pool: BufferPool;
  /** Room = originals in flight (reserved, never bound to slots: nothing is held here). */
  private readonly room: SlotStore;
  private nextId = 1;
  private readonly pending: Pending[] = [];
  private error: Error | undefined;
  private readyWait: Promise<void>;
  private readyResolve!: () => void;
  /** Originals sent: messages, blocks, payload bytes. */
  readonly sent = { messages: 0, blocks: 0, bytes: 0 };
  /** Room was given back (the snapshot's map wakes writers waiting for room). */
  onRoom: (() => void) | undefined;

  constructor(private readonly link: HostLink, readonly description: string, readonly blockSize: number, private readonly volumeSize: number) {
    this.pool = new BufferPool(STAGING_BLOCKS * blockSize, STAGING_BUFFERS);
    this.capacity = STAGING_BLOCKS * STAGING_BUFFERS;
    this.room = new SlotStore(this.capacity);
    this.readyWait = new Promise((r) => { this.readyResolve = r; });
  }

  /** The appliance accepted the unit: originals may flow. */
  ready(): void { this.readyResolve(); }

  get used(): number { return this.room.used; }
  get peak(): number { return this.room.peak; }
  reserve(n: number): number { return this.room.reserve(n); }

  unreserve(n: number): void {
    this.room.unreserve(n);
    this.onRoom?.();
  }

  async staging(n: number): Promise<Staging> {
    if (n > STAGING_BLOCKS) throw new RangeError(`staging of ${n} blocks is more than ${STAGING_BLOCKS}`);
    const buffer = await this.pool.acquire();
    const offsets = new Float64Array(n);
    for (let i = 0; i < n; i++) offsets[i] = i * this.blockSize;
    return { buffer, offsets };
  }

  async put(staging: Staging, blocks: ArrayLike<number>, ok: ArrayLike<boolean>, n: number): Promise<void> {
    try {
      await this.readyWait;
      if (this.error) throw this.error;
      // Runs of consecutive good blocks: one message each (cbw's saves are runs already).
      const acks: Array<Promise<void>> = [];
      let i = 0;
      while (i < n) {
        if (!ok[i]) { i++; continue; }
        let j = i + 1;
        while (j < n && ok[j] && blocks[j] === blocks[j - 1]! + 1 && staging.offsets[j] === staging.offsets[j - 1]! + this.blockSize) j++;
        const first = blocks[i]!;
        const bytes = Math.min((j - i) * this.blockSize, this.volumeSize - first * this.blockSize);
        const payload = Buffer.from(staging.buffer, staging.offsets[i]!, bytes);
        const id = this.nextId++;
        acks.push(new Promise<void>((resolve, reject) => this.pending.push({ id, resolve, reject })));
        this.link.send({ t: 'orig', id, first, count: j - i }, payload);
        this.sent.messages++;
        this.sent.blocks += j - i;
        this.sent.bytes += bytes;
        i = j;
      }
      await Promise.all(acks);
    } finally {
      this.pool.release(staging.buffer);
      this.unreserve(n);
    }
  }

  /** The appliance has every original up to and including message `id`. */
  acked(id: number): void {
    while (this.pending.length && this.pending[0]!.id <= id) this.pending.shift()!.resolve();
  }

  /** The link or the job failed: every put in flight (and every later one) rejects with `e`. */
  fail(e: Error): void {
    this.error ??= e;
    this.readyResolve();
    for (const p of this.pending.splice(0)) p.reject(e);
  }

  has(): boolean { return false; }
  blocks(): IterableIterator<number> { return [][Symbol.iterator](); }
  async get(): Promise<void> { throw new Error('an appliance container holds nothing on the host'); }
  drop(): void {}
  excludedRanges(): ReadonlyArray<{ offset: number; length: number }> { return []; }

  async close(): Promise<void> {
    this.fail(this.error ?? new Error('the backup ended'));
    this.pool.dispose();
  }
}
