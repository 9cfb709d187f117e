// The filter every export has for snapshots: each change (WRITE, TRIM, WRITE_ZEROES) asks the guard
// a snapshot attached here whether it may go now (copy-before-write saves the original first; a
// hold queue keeps it). Without a snapshot a change costs one property check. It also counts changes
// in flight, so a snapshot armed now can wait for the ones that passed before its instant to land
// before any original is read (no torn block), and measures what the clients do (rate, think time).
import type { NbdBackend } from '../nbd/backend';
import { Filter } from './filter';
import { WriteActivity } from './write-activity';

/** What a snapshot attaches to decide each change. */
export interface ChangeGuard {
  /** undefined: the change may go now. A promise: it goes when that resolves (it never rejects). */
  beforeChange(offset: number, length: number): Promise<void> | undefined;
  /** Attached: changes that entered before are still landing until `drained` resolves (undefined: none). */
  attached(drained: Promise<void> | undefined): void;
  /** Detached: release every change held. */
  detached(): void;
}

export class SnapshotFilter extends Filter {
  private guard: ChangeGuard | undefined;
  private entered = 0;
  private completed = 0;
  private drainTarget = 0;
  private drainResolve: (() => void) | undefined;
  /** drainInFlight() callers: each resolves once `completed` reaches its target. */
  private inFlightWaiters: Array<{ target: number; resolve: () => void }> = [];

  /** When clients last wrote, their write rate and think time: the copier yields the device to them. */
  readonly activity = new WriteActivity();

  constructor(next: NbdBackend) {
    super(next);
  }

  override write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.change(offset, data.length, () => this.next.write(offset, data, fua));
  }

  override trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.change(offset, length, () => this.next.trim(offset, length, fua));
  }

  override writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    return this.change(offset, length, () => this.next.writeZeroes(offset, length, fua, noHole));
  }

  // No async wrapper: with nothing attached the change starts in the same turn, with no promise of
  // its own beyond the backend's.
  private change(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    const pending = this.beforeChange(offset, length);
    const run = (): Promise<void> => {
      let p: Promise<void>;
      try {
        p = op();
      } catch (e) {
        this.afterChange();
        return Promise.reject(e);
      }
      return p.then(() => this.afterChange(), (e: unknown) => { this.afterChange(); throw e; });
    };
    return pending ? pending.then(run) : run();
  }

  /** The start of a change of [offset, offset+length): what the attached snapshot says of it. */
  beforeChange(offset: number, length: number): Promise<void> | undefined {
    this.entered++;
    this.activity.enter(performance.now());
    return this.guard?.beforeChange(offset, length);
  }

  /** The end of a change (done or failed). */
  afterChange(): void {
    this.completed++;
    this.activity.exit(performance.now());
    if (this.drainResolve !== undefined && this.completed >= this.drainTarget) {
      const r = this.drainResolve;
      this.drainResolve = undefined;
      r();
    }
    if (this.inFlightWaiters.length) {
      const due = this.inFlightWaiters.filter((w) => this.completed >= w.target);
      if (due.length) {
        this.inFlightWaiters = this.inFlightWaiters.filter((w) => this.completed < w.target);
        for (const w of due) w.resolve();
      }
    }
  }

  /** Resolves once every change that entered before this call has completed (a hold's instant). */
  drainInFlight(): Promise<void> {
    if (this.completed >= this.entered) return Promise.resolve();
    const target = this.entered;
    return new Promise((resolve) => this.inFlightWaiters.push({ target, resolve }));
  }

  get attachedGuard(): ChangeGuard | undefined {
    return this.guard;
  }

  /**
   * Arms: from now on every change goes through `guard`. Returns a promise that resolves once every
   * change that entered before this call has completed. The synchronous part is O(1): it is what
   * runs inside a freeze window.
   */
  attach(guard: ChangeGuard): Promise<void> {
    if (this.guard) throw new Error('a snapshot is already armed on this export');
    this.guard = guard;
    this.activity.setArmed(true, performance.now());
    if (this.completed >= this.entered) {
      guard.attached(undefined);
      return Promise.resolve();
    }
    this.drainTarget = this.entered;
    // Every later change waits in the guard for `drained`, so none completes before the older ones.
    const drained = new Promise<void>((resolve) => { this.drainResolve = resolve; });
    guard.attached(drained);
    return drained;
  }

  /** Disarms: the filter becomes a pass-through at once and every held change is released. */
  detach(guard: ChangeGuard): void {
    if (this.guard !== guard) return;
    this.guard = undefined;
    this.activity.setArmed(false, performance.now());
    if (this.drainResolve) { const r = this.drainResolve; this.drainResolve = undefined; r(); }
    guard.detached();
  }
}
