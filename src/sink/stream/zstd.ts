// --compress zstd: the tar stream goes through the `zstd` program (Node 20's zlib has no zstd).
// Writing: the compressed output is re-blocked into fixed records; the last record is padded with a
// zstd *skippable frame* (magic 0x184D2A50), not zeros, so `zstd -d` and `tar --zstd` accept it.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { RecordWriter, type RecordOutput } from './record-writer';

export const ZSTD_MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);

let zstdChecked: boolean | undefined;

/** Throws a clear error when the zstd program is missing. */
export function requireZstd(): void {
  zstdChecked ??= spawnSync('zstd', ['--version'], { stdio: 'ignore' }).status === 0;
  if (!zstdChecked) throw new Error('zstd compression needs the "zstd" program, which is not installed (apt-get install zstd)');
}

/** Padding of `gap` bytes (or gap + recordSize if gap < 8) as one zstd skippable frame. */
export function skippablePadding(gap: number, recordSize: number): Buffer {
  const n = gap >= 8 ? gap : gap + recordSize;
  const b = Buffer.alloc(n);
  b.writeUInt32LE(0x184d2a50, 0);
  b.writeUInt32LE(n - 8, 4);
  return b;
}

function childExit(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve, reject) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve(child.exitCode);
    child.once('error', reject);
    child.once('close', (code) => resolve(code));
  });
}

/**
 * A RecordOutput that compresses: bytes in (any size) go to `zstd`'s stdin; its output is blocked
 * into `recordSize` records on `out`. close() ends the stream, pads and closes `out`.
 */
export class ZstdRecordOutput implements RecordOutput {
  private readonly child: ChildProcess;
  private readonly outer: RecordWriter;
  private readonly pump: Promise<void>;
  private stderr = '';
  private error: Error | undefined;

  constructor(private readonly out: RecordOutput, private readonly recordSize: number, level = 1, threads = 0) {
    requireZstd();
    const lv = level < 0 ? [`--fast=${-level}`] : [`-${level}`];
    this.child = spawn('zstd', ['-q', '-c', `-T${threads}`, ...lv], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stderr!.on('data', (d: Buffer) => { this.stderr += d.toString(); });
    this.child.stdin!.on('error', (e) => { this.error ??= e; });
    this.child.on('error', (e) => { this.error ??= e; });
    const outer = new RecordWriter(out, recordSize, 4 << 20, 3);
    this.outer = outer;
    const stdout = this.child.stdout! as AsyncIterable<Buffer>;
    this.pump = (async () => {
      for await (const chunk of stdout) await outer.write(chunk);
    })();
    this.pump.catch((e: Error) => { this.error ??= e; });
  }

  write(data: Buffer): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.child.stdin!.write(data, (e) => (e ? reject(this.failure(e)) : resolve()));
    });
  }

  private failure(e: Error): Error {
    return new Error(`zstd failed: ${this.stderr.trim() || e.message}`);
  }

  async close(): Promise<void> {
    this.child.stdin!.end();
    const [code] = await Promise.all([childExit(this.child), this.pump]);
    if (code !== 0 || this.error) throw this.failure(this.error ?? new Error(`exit status ${code}`));
    await this.outer.finish((gap) => skippablePadding(gap, this.recordSize));
    await this.out.close();
  }

  destroy(): void | Promise<void> {
    try { this.child.kill(); } catch { /* ignore */ }
    return this.out.destroy();
  }
}

/** The decompressed side of `zstd -d` fed from `raw`; `rawBytes` counts the compressed input. */
export function zstdDecompress(raw: AsyncIterator<Uint8Array>, head: Uint8Array[]): { output: AsyncIterable<Buffer>; finished: Promise<number>; kill(): void } {
  requireZstd();
  const child = spawn('zstd', ['-d', '-c', '-q'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  child.stdin.on('error', () => { /* reported via the exit status */ });
  let killed = false;
  let exited = false;
  child.once('exit', () => { exited = true; });
  const feed = (async () => {
    let rawBytes = 0;
    const put = (b: Uint8Array) => new Promise<void>((resolve) => {
      rawBytes += b.length;
      if (!child.stdin.write(b)) {
        const done = () => { child.stdin.off('drain', done); child.stdin.off('close', done); resolve(); };
        child.stdin.once('drain', done);
        child.stdin.once('close', done);
      } else resolve();
    });
    for (const b of head) await put(b);
    for (;;) {
      if (killed || exited || child.stdin.destroyed) break;
      const r = await raw.next();
      if (r.done) break;
      await put(r.value);
    }
    child.stdin.end();
    return rawBytes;
  })();
  const finished = (async () => {
    const rawBytes = await feed;
    const code = await childExit(child);
    if (code !== 0 && !killed) throw new Error(`zstd could not decompress the archive: ${stderr.trim() || `exit status ${code}`}`);
    return rawBytes;
  })();
  finished.catch(() => {});
  return {
    output: child.stdout,
    finished,
    kill() {
      killed = true;
      try { child.stdin.destroy(); child.kill(); } catch { /* ignore */ }
      void raw.return?.();
    },
  };
}
