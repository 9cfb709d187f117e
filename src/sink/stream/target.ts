// Where a byte stream goes: a file (written as "<name>.partial", renamed once complete), a tape or
// other device, standard output, any Writable (the daemon's data channel, an upload), a set of
// volumes; optionally through zstd. A format (the archive) writes records to it and never knows which.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Writable } from 'node:stream';
import { VolumeSetOutput } from './multi-volume';
import { DEFAULT_RECORD_SIZE, FdRecordOutput, WritableRecordOutput, checkRecordSize, openRecordFile, type RecordOutput } from './record-writer';
import { syncDir } from '../../util/durable-file';
import { ZstdRecordOutput } from './zstd';

/** A destination that makes its own output (an S3 upload): opened with the archive's expected size. */
export interface RecordDestination {
  readonly where: string;
  open(expectedBytes: number | undefined): Promise<RecordOutput>;
}

const isDestination = (o: unknown): o is RecordDestination => typeof (o as RecordDestination).open === 'function' && typeof (o as RecordDestination).where === 'string';

export interface StreamOptions {
  /**
   * A path (file or tape device, truncated/created 0600), '-' for standard output (written with
   * writev(2) on fd 1; do not write anything else to stdout), or a Writable.
   */
  out: string | Writable | RecordDestination;
  /** What a Writable `out` is, for errors (default "the archive stream"). */
  outName?: string;
  /** Bytes per write to the destination; multiple of 512, 512..1 MiB. Default 10240. */
  recordSize?: number;
  compress?: 'zstd';
  /** zstd level: 1..19, or negative for --fast=N. Default 1. */
  compressLevel?: number;
  /** Split into volumes of at most this many bytes (needs `out` to be a path). */
  tapeSize?: number;
  nextVolumeCommand?: string;
  /** Path of volume n (default: `out` for every volume). */
  volumePath?: (n: number) => string;
}

export class StreamTarget {
  readonly recordSize: number;
  readonly compression: 'none' | 'zstd';
  /** "standard output", the path, or the Writable's name. */
  readonly where: string;
  private output: RecordOutput | undefined;
  private createdFile: string | undefined;
  private readonly volumeSet: VolumeSetOutput | undefined;

  constructor(private readonly opts: StreamOptions) {
    this.recordSize = checkRecordSize(opts.recordSize ?? DEFAULT_RECORD_SIZE);
    this.compression = opts.compress === 'zstd' ? 'zstd' : 'none';
    this.where = typeof opts.out === 'string' ? (opts.out === '-' ? 'standard output' : opts.out) : isDestination(opts.out) ? opts.out.where : (opts.outName ?? 'the archive stream');
    if (opts.tapeSize !== undefined) {
      if (typeof opts.out !== 'string' || opts.out === '-') throw new Error('a multi-volume stream (tape size) needs a file or device path, not a stream');
      this.volumeSet = new VolumeSetOutput({ path: opts.out, volumePath: opts.volumePath, nextVolumeCommand: opts.nextVolumeCommand }, opts.tapeSize, this.recordSize);
    }
  }

  /** Number of the volume being written (multi-volume), else 1. */
  get volume(): number { return this.volumeSet?.volume ?? 1; }

  /** Opens the destination (once): records written to the result reach it in order. */
  async open(expectedBytes?: number): Promise<RecordOutput> {
    if (this.output) throw new Error('stream target: opened twice');
    const r = this.recordSize;
    const out = this.opts.out;
    let base: RecordOutput;
    if (this.volumeSet) base = this.volumeSet;
    else if (isDestination(out)) base = await out.open(expectedBytes);
    else if (out === '-') base = new FdRecordOutput(1, r, false);
    else if (typeof out === 'string') {
      // A file is written as "<target>.partial" and renamed when complete, so a backup killed mid-way
      // never leaves something under the final name; devices are written as they are.
      const st = await fs.promises.stat(out).catch(() => undefined);
      const toFile = !st || st.isFile();
      const o = await openRecordFile(toFile ? `${out}.partial` : out, r);
      if (o.regular) this.createdFile = toFile ? `${out}.partial` : out;
      base = o.out;
    } else {
      base = new WritableRecordOutput(out, r, { end: out !== process.stdout, where: this.opts.outName });
    }
    this.output = this.compression === 'zstd' ? new ZstdRecordOutput(base, r, this.opts.compressLevel ?? 1) : base;
    return this.output;
  }

  /** Everything is written: flush and close the destination, durable, under its final name. */
  async commit(): Promise<void> {
    await this.output?.close();
    const out = this.opts.out;
    if (this.createdFile?.endsWith('.partial') && typeof out === 'string') {
      await fs.promises.rename(this.createdFile, out);
      await syncDir(path.dirname(out));
    }
    this.createdFile = undefined;
  }

  /** Failure: stop writing; a partial file is removed (a stream or tape has no trailer, so it never reads as complete). */
  async discard(): Promise<void> {
    try { await this.output?.destroy(); } catch { /* never throws */ }
    if (this.createdFile) await fs.promises.rm(this.createdFile, { force: true }).catch(() => {});
    this.createdFile = undefined;
  }
}
