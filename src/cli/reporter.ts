// How long work is shown: a progress bar on a TTY, JSON lines with --json, and a closing summary.
export interface ReporterOptions {
  json: boolean;
  /** Where human output goes (progress bar, summary). */
  err?: NodeJS.WriteStream;
  out?: NodeJS.WriteStream;
}

export class Reporter {
  private lastDraw = 0;
  private lastJson = 0;
  private barShown = false;
  readonly json: boolean;
  private readonly err: NodeJS.WriteStream;
  private readonly out: NodeJS.WriteStream;

  constructor(opts: ReporterOptions) {
    this.json = opts.json;
    this.err = opts.err ?? process.stderr;
    this.out = opts.out ?? process.stdout;
  }

  /** A machine-readable event: one JSON object per line on stdout (only with --json). */
  event(name: string, data: Record<string, unknown>): void {
    if (this.json) this.out.write(JSON.stringify({ event: name, ...data }) + '\n');
  }

  /** A line for people (stderr, so stdout stays clean for data or JSON). */
  info(text: string): void {
    if (this.json) return;
    this.clearBar();
    this.err.write(text + '\n');
  }

  progress(label: string, done: number, total: number, extra = ''): void {
    const now = Date.now();
    if (this.json) {
      if (now - this.lastJson >= 500) {
        this.lastJson = now;
        this.event('progress', { label, done, total });
      }
      return;
    }
    if (!this.err.isTTY || now - this.lastDraw < 100) return;
    this.lastDraw = now;
    const width = Math.max(10, Math.min(40, (this.err.columns ?? 80) - 50));
    const frac = total > 0 ? Math.min(1, done / total) : 1;
    const fill = Math.round(frac * width);
    this.err.write(`\r${label} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${(frac * 100).toFixed(1).padStart(5)}% ${extra}\x1b[K`);
    this.barShown = true;
  }

  clearBar(): void {
    if (this.barShown) {
      this.err.write('\r\x1b[K');
      this.barShown = false;
    }
  }

  /** The one-screen summary (people) or the last JSON line `{"event":"done",...}`. */
  done(summary: Record<string, unknown>, lines: string[]): void {
    this.clearBar();
    if (this.json) this.event('done', summary);
    else this.err.write(lines.join('\n') + '\n');
  }
}
