// The hold filter (seed 004, claims 2 and 6-8): while a hold is armed on this export, its changes
// (WRITE, TRIM, WRITE_ZEROES) wait in a FIFO queue instead of reaching the device; a read of a
// block with held data returns the newest held data; release sends them on in arrival order, and
// each client is acknowledged when its change has landed. Only this export's chain has the filter
// instance, so other exports of the daemon are never held.
// Order: a queued change is sent on only when every earlier queued change touching one of its blocks
// has landed (changes to other blocks go in parallel, a bounded window), so overlapping writes end
// with the last one. A new change that touches a block with a queued change queues behind it even
// when the policy would let it go.
// With a durable log (hold-log.ts) a held change is acknowledged as soon as it is in the log, and
// its payload leaves memory. Logged changes stay queued until release, and until the log is retired
// (every logged change on the device, flushed) a new change to a block the log touches is logged
// and queued behind the others (or, once the replay is done, waits the moment of the retire): a
// replay after a crash must never overwrite a newer write.
import type { NbdBackend, NbdBuffer } from '../nbd/backend';
import { Bitset } from '../util/bitset';
import { Filter } from './filter';

/** Index granularity of held changes (bytes); the hold method's block size. */
export const HOLD_BLOCK = 4096;
/** Released changes in flight at once (non-overlapping); fewer while clients write straight to the device, so they keep a share of it. */
const RELEASE_WINDOW = 256;
const RELEASE_WINDOW_SHARED = 16;
/** Clients count as writing for this long after a change went straight on. */
const CLIENT_ACTIVE_MS = 20;

/** true: a change to blocks [first, end) must be held now. */
export type HoldPolicy = (first: number, end: number) => boolean;

export interface HoldHooks {
  /** A change to [first, end) was just queued (backup-blocks urges the copier). */
  held?(first: number, end: number): void;
  /** The queue's payload grew past the limit: the method decides (falls back), synchronously. */
  overLimit?(): void;
}

/** The durable log a hold may append to (export/hold-log.ts). */
export interface HoldJournal {
  /** Durable when it resolves, with the payload's position; undefined: no room (or failed), stay in memory. */
  append(kind: 'write' | 'trim' | 'zeroes', offset: number, length: number, data: Buffer | undefined, fua: boolean, noHole: boolean): Promise<number | undefined>;
  read(pos: number, length: number): Promise<Buffer>;
  /** Every logged change is on the device: empty the log. */
  retire(): Promise<void>;
  /** Keep what is logged (a replay at the next serve will apply it). */
  close(): Promise<void>;
}

export interface HoldStats {
  /** Changes in the queue now (held or landing), their payload bytes, the oldest one's age. */
  count: number;
  bytes: number;
  oldestMs: number;
  /** Since the hold was armed: changes queued, the longest a client waited for its acknowledgement, */
  heldWrites: number;
  maxHoldMs: number;
  /** the longest a change stayed queued (= maxHoldMs without a log), the most payload bytes in memory at once. */
  maxQueuedMs: number;
  peakBytes: number;
  /** Of heldWrites, acknowledged from the durable log. */
  loggedWrites: number;
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
  /** Where its payload is in the log, once durable there (the client has its acknowledgement). */
  logPos: number | undefined;
  appending: boolean;
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
  // Queued changes by block, oldest first. A block touched by one change (the usual case) holds the
  // change itself: no array per block on the write path; a second change to it makes the list.
  private readonly index = new Map<number, HeldOp | HeldOp[]>();
  private seq = 0;
  /** When a client's change last went straight to the device (while something is queued). */
  private directAt = -Infinity;
  private bytesNow = 0;
  private st = { heldWrites: 0, maxHoldMs: 0, maxQueuedMs: 0, peakBytes: 0 };
  private emptyWaiters: Array<() => void> = [];
  private journal: HoldJournal | undefined;
  /** Blocks a logged change touches, until the log is retired. */
  private logged: Bitset | undefined;
  private loggedQueued = 0;
  private appending = 0;
  private loggedWrites = 0;
  private draining: Promise<void> | undefined;
  /** Set from the first step of a release: logged changes may go. */
  private releasingNow = false;
  private stateWaiters: Array<() => void> = [];
  /** A logged (acknowledged) change could not be written on release: the log is kept for the next serve. */
  private keepLog = false;

  constructor(next: NbdBackend) {
    super(next);
  }

  get armed(): boolean { return this.policy !== undefined; }

  /**
   * Starts holding: from this call on every change the policy names is queued. Synchronous and O(1)
   * (it runs inside a freeze window). Changes that passed before are still landing: they entered the
   * snapshot filter below in the same turn, whose drainInFlight() waits for them.
   */
  arm(policy: HoldPolicy, hooks: HoldHooks = {}, limitBytes = Infinity, journal?: HoldJournal): void {
    if (this.policy || this.draining) throw new Error('a hold is already armed on this export');
    this.policy = policy;
    this.hooks = hooks;
    this.limitBytes = limitBytes;
    this.st = { heldWrites: 0, maxHoldMs: 0, maxQueuedMs: 0, peakBytes: this.bytesNow };
    this.loggedWrites = 0;
    this.keepLog = false;
    this.journal = journal;
    this.logged = journal ? new Bitset(Math.ceil(this.size / HOLD_BLOCK)) : undefined;
  }

  /** Another policy (undefined: hold nothing new); queued changes it frees are sent on in order. */
  setPolicy(policy: HoldPolicy | undefined): void {
    this.policy = policy;
    if (!policy) this.hooks = {};
    this.pump();
  }

  /**
   * A narrower policy (--hold metadata, once the metadata map is read): queued changes it no longer
   * holds go now, ahead of the ones it still holds, unless they share a block with an earlier one
   * still held (per-block order is kept; changes to different blocks were in flight at once, so
   * their relative order is not the client's to rely on). Logged changes stay for the release.
   */
  narrow(policy: HoldPolicy): void {
    this.policy = policy;
    const q = this.queue;
    const free: HeldOp[] = [];
    const kept: HeldOp[] = [];
    const keptBlocks = new Set<number>();
    for (let i = this.cursor; i < q.length; i++) {
      const op = q[i]!;
      let stay = op.appending || op.logPos !== undefined || policy(op.first, op.end) || !!this.logged?.any(op.first, op.end);
      for (let b = op.first; !stay && b < op.end; b++) stay = keptBlocks.has(b);
      if (!stay) { free.push(op); continue; }
      kept.push(op);
      for (let b = op.first; b < op.end; b++) keptBlocks.add(b);
    }
    if (free.length && kept.length) this.queue = q.slice(0, this.cursor).concat(free, kept);
    this.pump();
  }

  /**
   * Stops holding and sends the queue on in order; with a log, retires it once every logged change
   * is on the device. Resolves once the last queued change has landed. Idempotent while it runs.
   */
  release(): Promise<void> {
    if (this.draining) return this.draining;
    // Cleared when done, also when drain() had nothing to wait for and ended in this very call.
    const p: Promise<void> = this.drain().finally(() => { if (this.draining === p) this.draining = undefined; });
    this.draining = p;
    return p;
  }

  private async drain(): Promise<void> {
    this.releasingNow = true;
    this.setPolicy(undefined);
    const journal = this.journal;
    if (journal) {
      // While the log is replayed, a new change to a block it touches is logged too (acknowledged at
      // once, replayed after the older ones) rather than held in memory until the log is retired; the
      // others go straight on. Once every logged change has landed, nothing new is logged.
      const replayed = () => this.appending === 0 && this.loggedQueued === 0;
      do await this.until(replayed); while (!replayed());
      this.journal = undefined;
      let retired = false;
      if (!this.keepLog) {
        try {
          await this.next.flush();
          await journal.retire();
          retired = true;
        } catch { /* kept: the next serve replays it */ }
      }
      if (!retired) await journal.close().catch(() => {});
      this.logged = undefined;
      this.pump();
    }
    if (this.head < this.queue.length) await new Promise<void>((r) => this.emptyWaiters.push(r));
    this.releasingNow = false;
  }

  private until(cond: () => boolean): Promise<void> {
    if (cond()) return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => { if (cond()) resolve(); else this.stateWaiters.push(check); };
      this.stateWaiters.push(check);
    });
  }

  private wake(): void {
    if (this.stateWaiters.length === 0) return;
    for (const w of this.stateWaiters.splice(0)) w();
  }

  /** Sends on the queued changes the policy no longer holds, in order (call when the policy's answer may have changed). */
  pump(): void {
    const q = this.queue;
    const window = performance.now() - this.directAt < CLIENT_ACTIVE_MS ? RELEASE_WINDOW_SHARED : RELEASE_WINDOW;
    while (this.cursor < q.length && this.releasing < window) {
      const op = q[this.cursor]!;
      if (op.appending) break; // durable or in memory: known in a moment
      if (op.logPos !== undefined) {
        if (!this.releasingNow) break; // acknowledged from the log: goes at release
      } else if (this.policy?.(op.first, op.end) || this.logged?.any(op.first, op.end)) break;
      if (!this.firstInLine(op)) break; // an earlier change to one of its blocks is still landing
      this.cursor++;
      this.releasing++;
      this.send(op).then(() => this.landed(op, undefined), (e: unknown) => this.landed(op, e ?? new Error('write failed')));
    }
  }

  /** What is held now and since arming. */
  holdStats(now = performance.now()): HoldStats {
    const oldest = this.head < this.queue.length ? this.queue[this.head]!.at : now;
    return { count: this.queue.length - this.head, bytes: this.bytesNow, oldestMs: now - oldest, ...this.st, loggedWrites: this.loggedWrites };
  }

  /** Queued ranges, oldest first (the copier is urged to take them when it starts). */
  *heldRanges(): Generator<[number, number]> {
    for (let i = this.cursor; i < this.queue.length; i++) yield [this.queue[i]!.first, this.queue[i]!.end];
  }

  override async read(offset: number, length: number): Promise<NbdBuffer> {
    for (;;) {
      if (this.index.size === 0) return this.next.read(offset, length);
      // The payloads as of now: an in-memory one may leave memory (logged, or landed) meanwhile.
      const ops = this.overlapping(offset, length).map((op) => ({ op, data: op.data }));
      const b = await this.next.read(offset, length);
      if (ops.length === 0) return b;
      if (await this.overlay(b.data, offset, length, ops)) return b;
      // A logged change landed and its log was retired during the read: the device has it now.
      b.release();
    }
  }

  /** Lays held data over a read, oldest first so the newest wins; false: a payload is gone, read again. */
  private async overlay(out: Buffer, offset: number, length: number, ops: Array<{ op: HeldOp; data: Buffer | undefined }>): Promise<boolean> {
    ops.sort((x, y) => x.op.seq - y.op.seq);
    for (const { op, data } of ops) {
      const s = Math.max(offset, op.offset);
      const e = Math.min(offset + length, op.offset + op.length);
      if (s >= e) continue;
      if (op.kind !== 'write') { out.fill(0, s - offset, e - offset); continue; }
      if (data) { data.copy(out, s - offset, s - op.offset, e - op.offset); continue; }
      if (op.logPos === undefined || !this.logReader) return false;
      try {
        (await this.logReader.read(op.logPos + (s - op.offset), e - s)).copy(out, s - offset);
      } catch {
        return false;
      }
    }
    return true;
  }

  private logReader: HoldJournal | undefined;

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
    if (!this.policy?.(first, end) && !this.touchesQueued(first, end) && !this.logged?.any(first, end)) {
      this.directAt = performance.now();
      return this.sendRaw(kind, offset, length, data, fua, noHole);
    }
    return new Promise<void>((resolve, reject) => {
      const op: HeldOp = { kind, offset, length, data, fua, noHole, first, end, at: performance.now(), seq: ++this.seq, done: false, logPos: undefined, appending: false, resolve, reject };
      this.queue.push(op);
      for (let b = first; b < end; b++) {
        const at = this.index.get(b);
        if (at === undefined) this.index.set(b, op);
        else if (Array.isArray(at)) at.push(op);
        else this.index.set(b, [at, op]);
      }
      this.bytesNow += data ? length : 0;
      this.st.heldWrites++;
      if (this.bytesNow > this.st.peakBytes) this.st.peakBytes = this.bytesNow;
      this.hooks.held?.(first, end);
      if (this.journal) this.log(op, this.journal);
      else if (this.bytesNow > this.limitBytes) this.hooks.overLimit?.();
      this.pump();
    });
  }

  /** Into the durable log: once there, the client is acknowledged and the payload leaves memory. */
  private log(op: HeldOp, journal: HoldJournal): void {
    op.appending = true;
    this.appending++;
    this.logReader = journal;
    const settle = (pos: number | undefined) => {
      op.appending = false;
      this.appending--;
      if (pos !== undefined) {
        op.logPos = pos;
        this.loggedQueued++;
        this.loggedWrites++;
        this.logged?.setRange(op.first, op.end);
        if (op.data) { this.bytesNow -= op.length; op.data = undefined; }
        this.acked(op);
        op.resolve();
      } else if (this.bytesNow > this.limitBytes) {
        this.hooks.overLimit?.(); // the log is full: memory is the limit again
      }
      this.wake();
      this.pump();
    };
    journal.append(op.kind, op.offset, op.length, op.data, op.fua, op.noHole).then(settle, () => settle(undefined));
  }

  private async send(op: HeldOp): Promise<void> {
    const data = op.kind === 'write' && !op.data ? await this.logReader!.read(op.logPos!, op.length) : op.data;
    return this.sendRaw(op.kind, op.offset, op.length, data, op.fua, op.noHole);
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
      const at = this.index.get(b)!;
      // Sent only when first in line for each block, so it is the first there.
      if (!Array.isArray(at)) { this.index.delete(b); continue; }
      at.shift();
      if (at.length === 1) this.index.set(b, at[0]!);
    }
    this.bytesNow -= op.data ? op.length : 0;
    const queued = performance.now() - op.at;
    if (queued > this.st.maxQueuedMs) this.st.maxQueuedMs = queued;
    const q = this.queue;
    while (this.head < this.cursor && q[this.head]!.done) this.head++;
    if (this.head > 4096 && this.head * 2 > q.length) {
      this.queue = q.slice(this.head);
      this.cursor -= this.head;
      this.head = 0;
    }
    if (op.logPos !== undefined) {
      // Acknowledged long ago: a failure now is the device's, and the log keeps the change.
      this.loggedQueued--;
      if (err !== undefined) this.keepLog = true;
    } else {
      this.acked(op);
      if (err === undefined) op.resolve(); else op.reject(err);
    }
    op.data = undefined;
    this.wake();
    this.pump();
    if (this.head >= this.queue.length && this.emptyWaiters.length) for (const w of this.emptyWaiters.splice(0)) w();
  }

  /** The client's wait for this change ends now. */
  private acked(op: HeldOp): void {
    const waited = performance.now() - op.at;
    if (waited > this.st.maxHoldMs) this.st.maxHoldMs = waited;
  }

  private firstInLine(op: HeldOp): boolean {
    for (let b = op.first; b < op.end; b++) {
      const at = this.index.get(b)!;
      if ((Array.isArray(at) ? at[0] : at) !== op) return false;
    }
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
    const out = new Set<HeldOp>();
    for (let b = first; b < end; b++) {
      const at = this.index.get(b);
      if (at === undefined) continue;
      if (Array.isArray(at)) for (const op of at) out.add(op);
      else out.add(at);
    }
    return [...out];
  }
}
