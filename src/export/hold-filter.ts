// The hold filter (seed 004, claims 2 and 6-8): while a hold is armed on this export, its changes
// (WRITE, TRIM, WRITE_ZEROES) wait in a FIFO queue instead of reaching the device; a read of a
// block with held data returns the newest held data; release sends them on in arrival order, and
// each client is acknowledged when its change has landed. Only this export's chain has the filter
// instance, so other exports of the daemon are never held.
// Order: a queued change is sent on only when every earlier queued change touching one of its blocks
// has landed (changes to other blocks go in parallel, a bounded window), so overlapping writes end
// with the last one. A new change that touches a block with a queued change queues behind it even
// when the policy would let it go.
import type { NbdBackend, NbdBuffer } from '../nbd/backend';
import { Filter } from './filter';

/** Index granularity of held changes (bytes); the hold method's block size. */
export const HOLD_BLOCK = 4096;
/** Released changes in flight at once (non-overlapping). */
const RELEASE_WINDOW = 64;

/** true: a change to blocks [first, end) must be held now. */
export type HoldPolicy = (first: number, end: number) => boolean;

export interface HoldHooks {
  /** A change to [first, end) was just queued (backup-blocks urges the copier). */
  held?(first: number, end: number): void;
  /** The queue's payload grew past the limit: the method decides (falls back), synchronously. */
  overLimit?(): void;
}

export interface HoldStats {
  /** Changes in the queue now (held or landing), their payload bytes, the oldest one's age. */
  count: number;
  bytes: number;
  oldestMs: number;
  /** Since the hold was armed: changes queued, the longest one stayed, the most bytes at once. */
  heldWrites: number;
  maxHoldMs: number;
  peakBytes: number;
}

interface HeldOp {
  kind: 'write' | 'trim' | 'zeroes';
  offset: number;
  length: number;
  data: Buffer | undefined;
  fua: boolean;
  noHole: boolean;
  first: number;
  end: number;
  at: number;
  seq: number;
  done: boolean;
  resolve: () => void;
  reject: (e: unknown) => void;
}

export class HoldFilter extends Filter {
  private policy: HoldPolicy | undefined;
  private hooks: HoldHooks = {};
  private limitBytes = Infinity;
  /** Arrival order; [head, cursor) sent on and landing, [cursor, length) still held. */
  private queue: HeldOp[] = [];
  private head = 0;
  private cursor = 0;
  private releasing = 0;
  /** Block -> the queued changes touching it, in arrival order (only blocks with queued changes). */
  private readonly index = new Map<number, HeldOp[]>();
  private seq = 0;
  private bytesNow = 0;
  private st = { heldWrites: 0, maxHoldMs: 0, peakBytes: 0 };
  private emptyWaiters: Array<() => void> = [];

  constructor(next: NbdBackend) {
    super(next);
  }

  get armed(): boolean { return this.policy !== undefined; }

  /**
   * Starts holding: from this call on every change the policy names is queued. Synchronous and O(1)
   * (it runs inside a freeze window). Changes that passed before are still landing: they entered the
   * snapshot filter below in the same turn, whose drainInFlight() waits for them.
   */
  arm(policy: HoldPolicy, hooks: HoldHooks = {}, limitBytes = Infinity): void {
    if (this.policy) throw new Error('a hold is already armed on this export');
    this.policy = policy;
    this.hooks = hooks;
    this.limitBytes = limitBytes;
    this.st = { heldWrites: 0, maxHoldMs: 0, peakBytes: this.bytesNow };
  }

  /** Another policy (undefined: hold nothing new); queued changes it frees are sent on in order. */
  setPolicy(policy: HoldPolicy | undefined): void {
    this.policy = policy;
    if (!policy) this.hooks = {};
    this.pump();
  }

  /** Stops holding and sends the queue on in order; resolves once the last queued change has landed. */
  release(): Promise<void> {
    this.setPolicy(undefined);
    if (this.head >= this.queue.length) return Promise.resolve();
    return new Promise((r) => this.emptyWaiters.push(r));
  }

  /** Sends on the queued changes the policy no longer holds, in order (call when the policy's answer may have changed). */
  pump(): void {
    const q = this.queue;
    while (this.cursor < q.length && this.releasing < RELEASE_WINDOW) {
      const op = q[this.cursor]!;
      if (this.policy?.(op.first, op.end)) break;
      if (!this.firstInLine(op)) break; // an earlier change to one of its blocks is still landing
      this.cursor++;
      this.releasing++;
      this.send(op).then(() => this.landed(op, undefined), (e: unknown) => this.landed(op, e ?? new Error('write failed')));
    }
  }

  /** What is held now and since arming. */
  holdStats(now = performance.now()): HoldStats {
    const oldest = this.head < this.queue.length ? this.queue[this.head]!.at : now;
    return { count: this.queue.length - this.head, bytes: this.bytesNow, oldestMs: now - oldest, ...this.st };
  }

  /** Queued ranges, oldest first (the copier is urged to take them when it starts). */
  *heldRanges(): Generator<[number, number]> {
    for (let i = this.cursor; i < this.queue.length; i++) yield [this.queue[i]!.first, this.queue[i]!.end];
  }

  override async read(offset: number, length: number): Promise<NbdBuffer> {
    if (this.index.size === 0) return this.next.read(offset, length);
    const ops = this.overlapping(offset, length);
    const b = await this.next.read(offset, length);
    if (ops.length === 0) return b;
    // Held data is newer than the device's: lay it over the read, oldest first so the newest wins.
    ops.sort((x, y) => x.seq - y.seq);
    for (const op of ops) {
      const s = Math.max(offset, op.offset);
      const e = Math.min(offset + length, op.offset + op.length);
      if (s >= e) continue;
      if (op.kind === 'write') op.data!.copy(b.data, s - offset, s - op.offset, e - op.offset);
      else b.data.fill(0, s - offset, e - offset);
    }
    return b;
  }

  override write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    if (this.policy === undefined && this.index.size === 0) return this.next.write(offset, data, fua);
    return this.change('write', offset, data.length, data, fua, false);
  }

  override trim(offset: number, length: number, fua: boolean): Promise<void> {
    if (this.policy === undefined && this.index.size === 0) return this.next.trim(offset, length, fua);
    return this.change('trim', offset, length, undefined, fua, false);
  }

  override writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    if (this.policy === undefined && this.index.size === 0) return this.next.writeZeroes(offset, length, fua, noHole);
    return this.change('zeroes', offset, length, undefined, fua, noHole);
  }

  private change(kind: HeldOp['kind'], offset: number, length: number, data: Buffer | undefined, fua: boolean, noHole: boolean): Promise<void> {
    const first = Math.floor(offset / HOLD_BLOCK);
    const end = Math.floor((offset + length - 1) / HOLD_BLOCK) + 1;
    if (!this.policy?.(first, end) && !this.touchesQueued(first, end)) return this.sendRaw(kind, offset, length, data, fua, noHole);
    return new Promise<void>((resolve, reject) => {
      const op: HeldOp = { kind, offset, length, data, fua, noHole, first, end, at: performance.now(), seq: ++this.seq, done: false, resolve, reject };
      this.queue.push(op);
      for (let b = first; b < end; b++) {
        const list = this.index.get(b);
        if (list) list.push(op); else this.index.set(b, [op]);
      }
      this.bytesNow += data ? length : 0;
      this.st.heldWrites++;
      if (this.bytesNow > this.st.peakBytes) this.st.peakBytes = this.bytesNow;
      this.hooks.held?.(first, end);
      if (this.bytesNow > this.limitBytes) this.hooks.overLimit?.();
      this.pump();
    });
  }

  private send(op: HeldOp): Promise<void> {
    try {
      return this.sendRaw(op.kind, op.offset, op.length, op.data, op.fua, op.noHole);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  private sendRaw(kind: HeldOp['kind'], offset: number, length: number, data: Buffer | undefined, fua: boolean, noHole: boolean): Promise<void> {
    if (kind === 'write') return this.next.write(offset, data!, fua);
    if (kind === 'trim') return this.next.trim(offset, length, fua);
    return this.next.writeZeroes(offset, length, fua, noHole);
  }

  private landed(op: HeldOp, err: unknown): void {
    op.done = true;
    this.releasing--;
    for (let b = op.first; b < op.end; b++) {
      const list = this.index.get(b)!;
      // Sent only when first in line for each block, so it is the first there.
      list.shift();
      if (list.length === 0) this.index.delete(b);
    }
    this.bytesNow -= op.data ? op.length : 0;
    const held = performance.now() - op.at;
    if (held > this.st.maxHoldMs) this.st.maxHoldMs = held;
    const q = this.queue;
    while (this.head < this.cursor && q[this.head]!.done) this.head++;
    if (this.head > 4096 && this.head * 2 > q.length) {
      this.queue = q.slice(this.head);
      this.cursor -= this.head;
      this.head = 0;
    }
    if (err === undefined) op.resolve(); else op.reject(err);
    op.data = undefined;
    this.pump();
    if (this.head >= this.queue.length && this.emptyWaiters.length) for (const w of this.emptyWaiters.splice(0)) w();
  }

  private firstInLine(op: HeldOp): boolean {
    for (let b = op.first; b < op.end; b++) if (this.index.get(b)![0] !== op) return false;
    return true;
  }

  private touchesQueued(first: number, end: number): boolean {
    if (this.index.size === 0) return false;
    for (let b = first; b < end; b++) if (this.index.has(b)) return true;
    return false;
  }

  private overlapping(offset: number, length: number): HeldOp[] {
    const first = Math.floor(offset / HOLD_BLOCK);
    const end = Math.floor((offset + length - 1) / HOLD_BLOCK) + 1;
    const out: HeldOp[] = [];
    for (let b = first; b < end; b++) {
      const list = this.index.get(b);
      if (list) for (const op of list) if (!out.includes(op)) out.push(op);
    }
    return out;
  }
}
