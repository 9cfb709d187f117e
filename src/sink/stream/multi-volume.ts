// Multi-volume archives (--tape-size): the record stream is cut into volumes of a whole number of
// records; between volumes livesnap runs the next-volume command (env LIVESNAP_VOLUME = number of
// the volume about to be written/read, from 2; LIVESNAP_ARCHIVE = the path) or asks on the terminal.
// The concatenation of the volumes is the archive: `cat vol1 vol2 vol3 | tar -xf -` works too.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { UserError } from '../../util/errors';
import { openRecordFile, type RecordOutput } from './record-writer';

export interface VolumeOptions {
  /** Path of the archive (tape device or file). */
  path: string;
  /** Path of volume n (n >= 1); default: `path` for every volume (a tape changer, or a command that moves the file away). */
  volumePath?: (n: number) => string;
  /** Shell command run before volume n >= 2; non-zero exit aborts. Without it: ask on /dev/tty. */
  nextVolumeCommand?: string;
}

/** Runs the next-volume command, or prompts on the terminal. */
export async function changeVolume(opts: VolumeOptions, n: number, verb: 'write' | 'read'): Promise<void> {
  const target = opts.volumePath?.(n) ?? opts.path;
  if (opts.nextVolumeCommand) {
    const child = spawn('sh', ['-c', opts.nextVolumeCommand], {
      stdio: ['ignore', 2, 2],
      env: { ...process.env, LIVESNAP_VOLUME: String(n), LIVESNAP_ARCHIVE: target },
    });
    const code = await new Promise<number | null>((resolve, reject) => { child.once('error', reject); child.once('close', resolve); });
    if (code !== 0) throw new Error(`the next-volume command exited with status ${code} before volume ${n}: stopping`);
    return;
  }
  let tty: number;
  try {
    tty = fs.openSync('/dev/tty', 'r+');
  } catch {
    throw new Error(`volume ${n} is needed but there is no --next-volume-command and no terminal to ask on`);
  }
  try {
    fs.writeSync(tty, `Prepare volume ${n} in ${target} (to ${verb}) and press Enter: `);
    const b = Buffer.alloc(256);
    for (;;) {
      const k = fs.readSync(tty, b, 0, b.length, null);
      if (k <= 0 || b.subarray(0, k).includes(0x0a)) break;
    }
  } finally {
    fs.closeSync(tty);
  }
}

/** Writes records across volumes of at most `tapeSize` bytes (rounded down to whole records). */
export class VolumeSetOutput implements RecordOutput {
  private cur: RecordOutput | undefined;
  private curInfo: { file: string; ino: number; dev: number; regular: boolean } | undefined;
  private inVolume = 0;
  private readonly capacity: number;
  volume = 0;

  constructor(private readonly opts: VolumeOptions, tapeSize: number, private readonly recordSize: number) {
    this.capacity = Math.floor(tapeSize / recordSize) * recordSize;
    if (this.capacity < recordSize) throw new RangeError(`tape size ${tapeSize} is smaller than one ${recordSize}-byte record`);
  }

  private async open(): Promise<void> {
    this.volume++;
    const file = this.opts.volumePath?.(this.volume) ?? this.opts.path;
    if (this.curInfo?.regular && this.curInfo.file === file) {
      // Never overwrite the volume just written: the command must have moved it (or changed the tape).
      const st = fs.statSync(file, { throwIfNoEntry: false });
      if (st && st.ino === this.curInfo.ino && st.dev === this.curInfo.dev) {
        throw new Error(`volume ${this.volume - 1} is still at ${file}: the next-volume command must move it away or load a new medium`);
      }
    }
    const o = await openRecordFile(file, this.recordSize);
    const st = fs.fstatSync(o.fd);
    this.cur = o.out;
    this.curInfo = { file, ino: st.ino, dev: st.dev, regular: o.regular };
    this.inVolume = 0;
  }

  // The record writer keeps several writes in flight; volume accounting and switching need them one at a time.
  private tail: Promise<void> = Promise.resolve();

  write(data: Buffer): Promise<void> {
    const p = this.tail.then(() => this.writeNow(data));
    this.tail = p.catch(() => {});
    return p;
  }

  private async writeNow(data: Buffer): Promise<void> {
    let o = 0;
    while (o < data.length) {
      if (!this.cur) await this.open();
      else if (this.inVolume === this.capacity) {
        await this.cur.close();
        await changeVolume(this.opts, this.volume + 1, 'write');
        await this.open();
      }
      const n = Math.min(data.length - o, this.capacity - this.inVolume);
      await this.cur!.write(data.subarray(o, o + n));
      this.inVolume += n;
      o += n;
    }
  }

  async close(): Promise<void> {
    await this.tail;
    if (!this.cur) await this.open();
    await this.cur!.close();
  }

  destroy(): void {
    this.cur?.destroy();
  }
}

/** Reads a file or device with big reads (a tape read must be at least one record: 1 MiB covers all). */
export async function* readFileChunks(file: string, readSize = 1 << 20): AsyncGenerator<Buffer> {
  const fh = await fs.promises.open(file, 'r');
  try {
    for (;;) {
      const b = Buffer.allocUnsafe(readSize);
      const { bytesRead } = await fh.read(b, 0, readSize, null);
      if (bytesRead === 0) return;
      yield bytesRead === readSize ? b : b.subarray(0, bytesRead);
    }
  } finally {
    await fh.close();
  }
}

/**
 * The volumes of a multi-volume archive as one byte stream: either a list of paths, or one path
 * re-read after running the next-volume command (or asking on the terminal) for each new volume.
 * The reader stops pulling once the archive is complete, so no extra volume is requested.
 */
export async function* readVolumes(src: string[] | (VolumeOptions & { volumes?: number })): AsyncGenerator<Buffer> {
  if (Array.isArray(src)) {
    for (const f of src) yield* readFileChunks(f);
    return;
  }
  for (let n = 1; ; n++) {
    if (n > 1) {
      if (src.volumes !== undefined && n > src.volumes) return;
      await changeVolume(src, n, 'read');
    }
    let any = false;
    for await (const b of readFileChunks(src.volumePath?.(n) ?? src.path)) { any = true; yield b; }
    if (!any) throw new UserError(`volume ${n} of the archive is empty`, 'load the right volume (tape) and run again');
  }
}
