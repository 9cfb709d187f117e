// What an export's clients ask of the disk, seen from its write hook: how many changes complete a
// second, and how much of the time the clients leave the export idle between changes ("think
// time"). The automatic writer priority (auto-pace.ts) steers the copier by both: a client with
// think time is not held back by the backup; a client without it may be.

/** An idle gap shorter than this is the client's own turnaround (socket, scheduling), not think time. */
export const THINK_GAP_MS = 0.2;
const BUCKET_MS = 100;
const BUCKETS = 32;
/** A rate from before a backup counts only if no backup was armed during the window. */
export const BASELINE_WINDOW_MS = 1000;

export class WriteActivity {
  private inFlight = 0;
  private idleSince = 0;
  private thinkClosed = 0;
  /** Changes completed, ever. */
  completed = 0;
  /** performance.now() of the latest change to arrive. */
  lastEnterAt = -Infinity;
  private readonly counts = new Uint32Array(BUCKETS);
  private bucket = 0;
  private armedNow = false;
  private lastArmedAt = -Infinity;

  constructor(now: number = performance.now()) {
    this.idleSince = now;
    this.bucket = Math.floor(now / BUCKET_MS);
  }

  enter(now: number): void {
    this.lastEnterAt = now;
    if (this.inFlight++ === 0) {
      const gap = now - this.idleSince;
      if (gap >= THINK_GAP_MS) this.thinkClosed += gap;
    }
  }

  exit(now: number): void {
    this.completed++;
    this.advance(now);
    this.counts[this.bucket % BUCKETS]!++;
    if (--this.inFlight === 0) this.idleSince = now;
  }

  /** Milliseconds of think time so far (the gap open now included once it is long enough). */
  thinkMs(now: number): number {
    if (this.inFlight > 0) return this.thinkClosed;
    const gap = now - this.idleSince;
    return gap >= THINK_GAP_MS ? this.thinkClosed + gap : this.thinkClosed;
  }

  /** A backup's copy-before-write starts / ends: its time is no baseline. */
  setArmed(armed: boolean, now: number): void {
    this.armedNow = armed;
    this.lastArmedAt = now;
  }

  /**
   * Changes per second in the last second, if no backup was armed in it (else undefined): what the
   * clients asked for with the disk to themselves. The median of the 100 ms buckets that saw any
   * change, so a client that started or stopped within the second is not averaged with the quiet
   * part; fewer than three such buckets: undefined.
   */
  baselineRate(now: number): number | undefined {
    if (this.armedNow || now - this.lastArmedAt < BASELINE_WINDOW_MS) return undefined;
    this.advance(now);
    const active: number[] = [];
    // The current bucket is partial: take the whole buckets before it.
    for (let i = 1; i <= BASELINE_WINDOW_MS / BUCKET_MS; i++) {
      const c = this.counts[(this.bucket - i + BUCKETS) % BUCKETS]!;
      if (c > 0) active.push(c);
    }
    if (active.length < 3) return undefined;
    active.sort((a, b) => a - b);
    return active[Math.floor(active.length / 2)]! * (1000 / BUCKET_MS);
  }

  private advance(now: number): void {
    const b = Math.floor(now / BUCKET_MS);
    if (b === this.bucket) return;
    for (let i = Math.max(this.bucket + 1, b - BUCKETS + 1); i <= b; i++) this.counts[i % BUCKETS] = 0;
    this.bucket = b;
  }
}
