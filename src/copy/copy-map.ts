// The lockable "not yet copied" map of a snapshot (seed 001, FIG. 13 step 1306 and FIG. 14-15), one
// bit per snapshot block (4 KiB by default):
//   pending  the block's original is still only on the device: someone must copy it before it changes
//   busy     a task holds the block: the copier's read or a copy-before-write save is in flight, or a
//            snapshot-view read of a still-pending block; whoever meets a busy block waits for it
//   saved    the original is in the intermediate container (or the block is bad: `bad` too, zeros)
// A block that is none of these is done (copied to the sink) or not part of the backup (free,
// excluded): writes to it go straight through.
// Claiming is "pending and not busy -> busy, not pending" in one synchronous step (JS runs one thing at
// a time), so two claimers never copy the same block and a writer never overtakes an in-flight read.
import { Bitset } from '../util/bitset';

export type TaskKind = 'copy' | 'save' | 'view';

export interface Task {
  readonly start: number;
  readonly end: number;
  readonly kind: TaskKind;
  readonly done: Promise<void>;
}

interface TaskImpl extends Task {
  resolve: () => void;
}

/** Wakes everything waiting for "something changed" (a task ended, container space freed, disarm). */
export class Notifier {
  private waiters: Array<() => void> = [];
  wait(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  notify(): void {
    if (this.waiters.length === 0) return;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  get waiting(): number {
    return this.waiters.length;
  }
}

/** First set bit of `a` in [from, end); `end` if none. */
export function nextSet(a: Bitset, from: number, end: number): number {
  return a.next(from, true, end);
}

export class CopyMap {
  readonly pending: Bitset;
  readonly busy: Bitset;
  readonly saved: Bitset;
  /** Saved blocks whose original could not be read: emitted as zeros and listed as bad. */
  readonly bad: Bitset;
  private readonly tasks = new Set<TaskImpl>();
  /** Woken whenever a task ends, container space is freed, or the snapshot is disarmed. */
  readonly changed = new Notifier();

  /** `allPending`: the state at arming (every block pending); allocated before the freeze window. */
  constructor(readonly totalBlocks: number, allPending = true) {
    this.pending = new Bitset(totalBlocks, allPending);
    this.busy = new Bitset(totalBlocks);
    this.saved = new Bitset(totalBlocks);
    this.bad = new Bitset(totalBlocks);
  }

  /** A write to [first, end) must take the slow path (some block still pending or held). */
  needsWork(first: number, end: number): boolean {
    return this.pending.any(first, end) || this.busy.any(first, end);
  }

  get savedCount(): number {
    return this.saved.setCount;
  }

  get taskCount(): number {
    return this.tasks.size;
  }

  countTasks(kind: TaskKind): number {
    let n = 0;
    for (const t of this.tasks) if (t.kind === kind) n++;
    return n;
  }

  /**
   * Claims the run of pending, not busy, not saved blocks starting at `start` (at most up to `limit`):
   * they stop being pending and become busy under one task. Returns undefined when `start` is not claimable.
   */
  claimRun(start: number, limit: number, kind: 'copy' | 'save'): Task | undefined {
    // The run ends at the first block that is not pending, or is busy (whichever comes first).
    let e = this.pending.next(start, false, limit);
    e = this.busy.next(start, true, e);
    if (e <= start) return undefined;
    this.pending.clearRange(start, e);
    return this.lock(start, e, kind);
  }

  /** Locks [start, end) without changing pending (snapshot-view reads of pending blocks). */
  lock(start: number, end: number, kind: TaskKind): Task {
    let resolve!: () => void;
    const done = new Promise<void>((r) => { resolve = r; });
    const t: TaskImpl = { start, end, kind, done, resolve };
    this.tasks.add(t);
    this.busy.setRange(start, end);
    return t;
  }

  unlock(task: Task): void {
    const t = task as TaskImpl;
    if (!this.tasks.delete(t)) return;
    this.busy.clearRange(t.start, t.end);
    // View locks may overlap other tasks: put back the bits of the tasks still running there.
    for (const o of this.tasks) if (o.start < t.end && t.start < o.end) this.busy.setRange(Math.max(o.start, t.start), Math.min(o.end, t.end));
    t.resolve();
    this.changed.notify();
  }

  /** Resolves when every task overlapping [start, end) as of now has ended. */
  waitFor(start: number, end: number): Promise<void> {
    const ps: Array<Promise<void>> = [];
    for (const t of this.tasks) if (t.start < end && start < t.end) ps.push(t.done);
    if (ps.length === 0) return Promise.resolve();
    return ps.length === 1 ? ps[0]! : Promise.all(ps).then(() => undefined);
  }

  /** Block `b` (claimed by a save) is in the container now; bad: its original could not be read. */
  markSaved(b: number, bad = false): void {
    this.saved.set(b);
    if (bad) this.bad.set(b);
  }

  /** Forgets a saved block (its data went to the sink or is not needed): 'held', 'bad' or undefined. */
  unsave(b: number): 'held' | 'bad' | undefined {
    if (!this.saved.get(b)) return undefined;
    this.saved.clear(b);
    if (!this.bad.get(b)) return 'held';
    this.bad.clear(b);
    return 'bad';
  }

  /** First block in [from, end) that is pending, busy or saved; `end` if none. */
  nextWork(from: number, end: number): number {
    // Each scan is bounded by the nearest hit so far: the walk costs what it advances.
    let e = this.pending.next(from, true, end);
    e = this.busy.next(from, true, e);
    return this.saved.next(from, true, e);
  }

  /** Disarm: every task's waiters are released now (the tasks themselves still end normally). */
  releaseAllWaiters(): void {
    for (const t of this.tasks) t.resolve();
    this.changed.notify();
  }
}
