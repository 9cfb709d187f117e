// --max-rate: keeps a copy at or below a byte rate, so a backup can run beside production I/O.
export class RateLimit {
  private readonly started = performance.now();

  constructor(private readonly bytesPerSecond: number | undefined) {}

  /** Waits until `bytesDone` is no longer ahead of the allowed rate. */
  async pace(bytesDone: number): Promise<void> {
    if (!this.bytesPerSecond) return;
    const due = this.started + (bytesDone / this.bytesPerSecond) * 1000;
    const wait = due - performance.now();
    if (wait > 1) await new Promise((r) => setTimeout(r, wait));
  }
}
