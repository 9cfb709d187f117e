// --max-rate: keeps a copy at or below a byte rate, so a backup can run beside production I/O.
export class RateLimit {
  private readonly started = performance.now();

  constructor(private readonly bytesPerSecond: number | undefined) {}

  /**
   * Waits until `bytesDone` is no longer ahead of the allowed rate, or until `cutShort()` says the
   * wait must end (checked every 20 ms: a writer that waits on the copy comes first).
   */
  async pace(bytesDone: number, cutShort?: () => boolean): Promise<void> {
    if (!this.bytesPerSecond) return;
    const due = this.started + (bytesDone / this.bytesPerSecond) * 1000;
    for (;;) {
      const wait = due - performance.now();
      if (wait <= 1 || cutShort?.()) return;
      await new Promise((r) => setTimeout(r, cutShort ? Math.min(wait, 20) : wait));
    }
  }
}
