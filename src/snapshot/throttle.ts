// Slowing writers down before the container is full (seed 001 claims 7, 26, 41, 57-58): above the
// high-water mark, a write that needs a container slot (it hits a block not yet copied) sleeps for a
// time that grows with the fill, from 0 at the mark to maxDelayMs when full. Writes to copied or free
// blocks never come here. When the container is full the writer waits for space (not for a timer):
// that is the container-full rule, not throttling.
export interface ThrottlePolicy {
  /** Fill fraction (0..1) above which writers into the not-yet-copied area are slowed. Default 0.8. */
  highWater: number;
  /** Delay at 100 % fill, in ms. Default 20. */
  maxDelayMs: number;
}

export const DEFAULT_THROTTLE: ThrottlePolicy = { highWater: 0.8, maxDelayMs: 20 };

/** Delay in ms for a writer that needs container space at this fill (0 below the mark). */
export function throttleDelay(policy: ThrottlePolicy, fill: number): number {
  if (fill < policy.highWater || policy.maxDelayMs <= 0) return 0;
  const span = 1 - policy.highWater;
  const x = span <= 0 ? 1 : Math.min(1, (fill - policy.highWater) / span);
  // Quadratic: gentle just above the mark, steep near full.
  return policy.maxDelayMs * (0.1 + 0.9 * x * x);
}

/** A sleep that the snapshot can cut short (disarm releases every sleeper at once). */
export class Sleepers {
  private readonly live = new Set<() => void>();

  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => { clearTimeout(timer); this.live.delete(done); resolve(); };
      const timer = setTimeout(done, ms);
      this.live.add(done);
    });
  }

  wakeAll(): void {
    for (const f of [...this.live]) f();
  }
}
