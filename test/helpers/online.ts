// Fixtures for the end-to-end online-backup tests: a private livesnap daemon serving a device, real
// NBD clients (long-running qemu-io processes, nbdfuse + a direct-I/O loop device + a mount), the
// `livesnap backup --json` CLI as a child whose events are timestamped on arrival, and the
// self-describing sector format the exactness checks are built on.
//
// Every fixture registers its own undo with t.teardown, also on failure. Ava runs teardowns in
// reverse order of registration, so a stack built daemon -> nbdfuse -> loop -> mount is undone
// mount -> loop -> nbdfuse -> daemon.
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import * as zlib from 'node:zlib';
import type { ExecutionContext } from 'ava';
import { BIN } from './cli';
import { runStatus, scratchDir, sparseFile } from './system';

const exec = promisify(execFile);

export { serialIf } from './skip';

export const now = (): number => performance.now();
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function waitUntil(cond: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** The CLI, asynchronously (the daemon and the clients must keep running meanwhile). */
export async function cli(args: string[], env?: NodeJS.ProcessEnv): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [BIN, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    c.stdout.on('data', (d) => (stdout += d));
    c.stderr.on('data', (d) => (stderr += d));
    c.once('close', (status) => resolve({ status, stdout, stderr }));
  });
}

export function lastJsonOf(stdout: string): Record<string, unknown> {
  const lines = stdout.trim().split('\n').filter((l) => l.startsWith('{'));
  return JSON.parse(lines[lines.length - 1] ?? '{}') as Record<string, unknown>;
}

// ---------------------------------------------------------------------------------------------
// The daemon

export interface Served {
  control: string;
  runDir: string;
  name: string;
  socket: string;
  uri: string;
  size: number;
  pid: number;
  /** The daemon's log (daemon.log beside the control socket). */
  logTail(): string;
  status(): Promise<StatusReply>;
}

export interface JobStatus { id: string; export: string; to: string; state: string; bytesDone: number; bytesTotal: number; worstWriteDelayMs: number; error: string | null; writesWaiting: number; writerPriority?: string }
export interface StatusReply { pid: number; io?: string; exports: Array<{ name: string; cache?: string; job: JobStatus | null }>; jobs: JobStatus[] }

/**
 * Serves `device` as `name` from a daemon of its own (control socket under `dir`). At teardown:
 * `livesnap stop --control`, then SIGKILL of the pid if it is still there after 5 s.
 */
export async function serveDevice(t: ExecutionContext, dir: string, device: string, name: string, serveArgs: string[] = [], env?: NodeJS.ProcessEnv): Promise<Served> {
  const runDir = path.join(dir, 'run');
  fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
  const control = path.join(runDir, 'control.sock');
  const logFile = path.join(runDir, 'daemon.log');
  const logTail = () => (fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8').trim().split('\n').slice(-15).join('\n') : '(no daemon log)');
  const status = async (): Promise<StatusReply> => {
    const r = await cli(['status', '--json', '--control', control]);
    if (r.status !== 0) throw new Error(`livesnap status failed (${r.status}): ${r.stderr}`);
    return lastJsonOf(r.stdout) as unknown as StatusReply;
  };
  const state = serveArgs.includes('--state') ? [] : ['--state', path.join(runDir, `state-${name}`)];
  const r = await cli(['serve', device, '--name', name, '--control', control, '--json', ...state, ...serveArgs], env);
  let pid = 0;
  t.teardown(async () => {
    if (!pid) {
      // serve may have started the daemon and then failed: find it through its socket.
      const s = await cli(['status', '--json', '--control', control]);
      if (s.status === 0) pid = Number(lastJsonOf(s.stdout).pid) || 0;
    }
    await cli(['stop', '--control', control]);
    if (pid) {
      const end = Date.now() + 5000;
      while (alive(pid) && Date.now() < end) await sleep(50);
      if (alive(pid)) { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }
    }
  });
  if (r.status !== 0) throw new Error(`livesnap serve ${device} failed (${r.status}): ${r.stderr}\n${logTail()}`);
  const res = lastJsonOf(r.stdout);
  const st = await status();
  pid = st.pid;
  return { control, runDir, name, socket: String(res.socket), uri: String(res.uri), size: Number(res.size), pid, logTail, status };
}

/** A new sparse volume (`vol.raw`, `sizeMiB`) in a scratch directory, served as `name` by a daemon of its own. */
export async function servedVolume(t: ExecutionContext, prefix: string, name: string, sizeMiB: number, serveArgs: string[] = [], env?: NodeJS.ProcessEnv): Promise<{ dir: string; size: number; vol: string; served: Served }> {
  const dir = scratchDir(t, prefix);
  const size = sizeMiB * (1 << 20);
  const vol = sparseFile(path.join(dir, 'vol.raw'), size);
  return { dir, size, vol, served: await serveDevice(t, dir, vol, name, serveArgs, env) };
}

export function alive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch { return false; }
}

// ---------------------------------------------------------------------------------------------
// The backup CLI as a child process, its JSON lines timestamped as they arrive

export interface BackupRun {
  proc: ChildProcess;
  /** performance.now() just before the CLI was spawned. */
  launchedAt: number;
  /** Resolves with the armed event and the instant this process received it. */
  armed: Promise<{ event: Record<string, unknown>; receivedAt: number }>;
  exit: Promise<{ status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; lines: Array<Record<string, unknown>> }>;
}

export function startBackup(t: ExecutionContext, args: string[]): BackupRun {
  const launchedAt = now();
  const proc = spawn(process.execPath, [BIN, 'backup', ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL'); });
  let stdout = '', stderr = '', buf = '';
  const lines: Array<Record<string, unknown>> = [];
  let armedResolve!: (v: { event: Record<string, unknown>; receivedAt: number }) => void;
  let armedReject!: (e: Error) => void;
  const armed = new Promise<{ event: Record<string, unknown>; receivedAt: number }>((res, rej) => { armedResolve = res; armedReject = rej; });
  armed.catch(() => {});
  proc.stdout!.on('data', (d: Buffer) => {
    const at = now();
    stdout += d;
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!line.startsWith('{')) continue;
      const j = JSON.parse(line) as Record<string, unknown>;
      lines.push(j);
      if (j.event === 'armed') armedResolve({ event: j, receivedAt: at });
    }
  });
  proc.stderr!.on('data', (d) => (stderr += d));
  const exit = new Promise<{ status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; lines: Array<Record<string, unknown>> }>((res) => {
    proc.once('close', (status, signal) => {
      armedReject(new Error(`backup exited (${status ?? signal}) without an armed event: ${stderr}`));
      res({ status, signal, stdout, stderr, lines });
    });
  });
  return { proc, launchedAt, armed, exit };
}

// ---------------------------------------------------------------------------------------------
// qemu-io as a long-running NBD client: one connection, one command at a time, fed on stdin

export class QemuIo {
  readonly proc: ChildProcess;
  private out = '';
  private waiters: Array<{ ok: RegExp; resolve: (line: string) => void; reject: (e: Error) => void }> = [];
  private exited: Promise<number | null>;
  dead: Error | undefined;

  constructor(t: ExecutionContext, uri: string) {
    this.proc = spawn('qemu-io', ['-f', 'raw', uri], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.proc.stdin!.on('error', () => {});
    const onData = (d: Buffer) => {
      this.out += d.toString();
      let nl: number;
      while ((nl = this.out.indexOf('\n')) >= 0) {
        const line = this.out.slice(0, nl).replace(/^(qemu-io> )+/, '');
        this.out = this.out.slice(nl + 1);
        this.onLine(line);
      }
    };
    this.proc.stdout!.on('data', onData);
    this.proc.stderr!.on('data', onData);
    this.exited = new Promise((res) => this.proc.once('close', (code) => {
      this.dead = new Error(`qemu-io exited (${code})`);
      for (const w of this.waiters.splice(0)) w.reject(this.dead);
      res(code);
    }));
    t.teardown(() => { if (this.proc.exitCode === null) this.proc.kill('SIGKILL'); });
  }

  private onLine(line: string): void {
    if (!line.trim() || /^\d.*ops;/.test(line)) return; // the statistics line after each command
    const w = this.waiters.shift();
    if (!w) return;
    if (w.ok.test(line)) w.resolve(line);
    else w.reject(new Error(`qemu-io: ${line}`));
  }

  /** Sends one command; resolves on the line matching `ok`, rejects on any other answer. */
  command(cmd: string, ok: RegExp): Promise<string> {
    if (this.dead) return Promise.reject(this.dead);
    return new Promise((resolve, reject) => {
      this.waiters.push({ ok, resolve, reject });
      this.proc.stdin!.write(cmd + '\n');
    });
  }

  /** Writes the contents of `sourceFile` (exactly `len` bytes) at `off`. */
  write(sourceFile: string, off: number, len: number, fua = false): Promise<string> {
    return this.command(`write ${fua ? '-f ' : ''}-s ${sourceFile} ${off} ${len}`, /^wrote \d+\/\d+ bytes at offset \d+/);
  }

  async quit(): Promise<number | null> {
    if (this.proc.exitCode === null) this.proc.stdin!.end('quit\n');
    return this.exited;
  }
}

// ---------------------------------------------------------------------------------------------
// Self-describing sectors: every 512-byte sector says which write put it there and where.
//   0..3   "LSNP"      4..7  writer id      8..15  byte offset of this sector     16..23  write seq
//   24..127 a fixed text (so no file-system probe ever mistakes a sector for a superblock)
//   128..507 bytes from a generator seeded by (seq, offset)              508..511 crc32 of 0..507

export const SECTOR = 512;
const FILLER = Buffer.alloc(104, 'livesnap self-describing sector. ');

export function fillSectors(buf: Buffer, offset: number, seq: number, writer: number): Buffer {
  for (let s = 0; s < buf.length; s += SECTOR) {
    const off = offset + s;
    buf.write('LSNP', s, 'latin1');
    buf.writeUInt32LE(writer, s + 4);
    buf.writeBigUInt64LE(BigInt(off), s + 8);
    buf.writeBigUInt64LE(BigInt(seq), s + 16);
    FILLER.copy(buf, s + 24);
    let x = (Math.imul(seq, 0x9e3779b1) ^ Math.imul(off / SECTOR, 0x85ebca6b) ^ 0x5bd1e995) >>> 0 || 1;
    for (let i = 128; i < 508; i += 4) {
      x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      buf.writeUInt32LE(x, s + i);
    }
    buf.writeUInt32LE(zlib.crc32(buf.subarray(s, s + 508)), s + 508);
  }
  return buf;
}

export type SectorState = { kind: 'zero' } | { kind: 'write'; seq: number; writer: number } | { kind: 'bad'; why: string };

/** What a sector read back holds: zeros, a whole sector of a known write at its own offset, or garbage. */
export function parseSector(buf: Buffer, at: number, expectOffset: number): SectorState {
  if (buf.readUInt32LE(at) === 0) {
    for (let i = at; i < at + SECTOR; i += 4) if (buf.readUInt32LE(i) !== 0) return { kind: 'bad', why: 'neither zeros nor a self-describing sector' };
    return { kind: 'zero' };
  }
  if (buf.toString('latin1', at, at + 4) !== 'LSNP') return { kind: 'bad', why: 'no magic' };
  if (zlib.crc32(buf.subarray(at, at + 508)) !== buf.readUInt32LE(at + 508)) return { kind: 'bad', why: 'checksum mismatch (torn or corrupt sector)' };
  const off = Number(buf.readBigUInt64LE(at + 8));
  if (off !== expectOffset) return { kind: 'bad', why: `sector of offset ${off} found at ${expectOffset}` };
  return { kind: 'write', seq: Number(buf.readBigUInt64LE(at + 16)), writer: buf.readUInt32LE(at + 4) };
}

export interface WriteRecord {
  seq: number;
  writer: number;
  offset: number;
  length: number;
  /** performance.now() when the command was sent / when its acknowledgement was read. */
  start: number;
  ack?: number;
  failed?: string;
}

/**
 * Several concurrent writers, each its own qemu-io process (its own NBD connection), writing
 * self-describing data at random 4 KiB-aligned offsets until stopped. Records every write.
 */
export class SelfDescribingWriters {
  readonly records: WriteRecord[] = [];
  private seq = 0;
  private stopping = false;
  private loops: Promise<void>[] = [];
  readonly clients: QemuIo[] = [];

  constructor(
    private readonly t: ExecutionContext,
    private readonly dir: string,
    private readonly uri: string,
    private readonly volumeSize: number,
    private readonly r: () => number,
    private readonly opts: { writers: number; maxBlocks: number; region?: [number, number]; fua?: boolean; firstSeq?: number },
  ) {
    fs.mkdirSync(dir, { recursive: true });
    // Two groups on one volume need disjoint numbers (a sector names its write).
    this.seq = opts.firstSeq ?? 0;
  }

  start(): void {
    for (let w = 0; w < this.opts.writers; w++) {
      const q = new QemuIo(this.t, this.uri);
      this.clients.push(q);
      this.loops.push(this.loop(w + 1, q));
    }
  }

  private async loop(writer: number, q: QemuIo): Promise<void> {
    const bs = 4096;
    const [lo, hi] = this.opts.region ?? [0, this.volumeSize];
    const src = path.join(this.dir, `w${writer}.bin`);
    while (!this.stopping) {
      // Mostly single blocks, some long runs (they cross copied/uncopied boundaries).
      const blocks = this.r() < 0.7 ? 1 : 1 + Math.floor(this.r() * this.opts.maxBlocks);
      const length = Math.min(blocks * bs, hi - lo);
      const offset = lo + Math.floor(this.r() * ((hi - lo - length) / bs + 1)) * bs;
      const seq = ++this.seq;
      await fs.promises.writeFile(src, fillSectors(Buffer.allocUnsafe(length), offset, seq, writer));
      const rec: WriteRecord = { seq, writer, offset, length, start: now() };
      this.records.push(rec);
      try {
        await q.write(src, offset, length, this.opts.fua);
        rec.ack = now();
      } catch (e) {
        rec.failed = (e as Error).message;
        if (q.dead) return;
      }
    }
  }

  /** Waits until `n` writes have been acknowledged (from the start). */
  /** Waits for n acknowledged writes; with `startedAfter`, only writes issued after that instant count. */
  async acked(n: number, ms = 30_000, startedAfter = -Infinity): Promise<void> {
    await waitUntil(() => this.records.filter((r) => r.ack !== undefined && r.start > startedAfter).length >= n, ms, `${n} acknowledged writes`);
  }

  /** Stops issuing writes, waits for the last ones, quits qemu-io: returns the exit codes. */
  async stop(): Promise<Array<number | null>> {
    this.stopping = true;
    await Promise.all(this.loops);
    return Promise.all(this.clients.map((c) => c.quit()));
  }

  /** Stops issuing writes without waiting for anything (the server is gone). */
  abandon(): void {
    this.stopping = true;
  }
}

/** Reads `len` bytes at `off` of a file or device (O_DIRECT not needed: the writer is gone/flushed). */
export function readRange(file: string, off: number, len: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(len);
    let got = 0;
    while (got < len) {
      const n = fs.readSync(fd, b, got, len - got, off + got);
      if (n <= 0) break;
      got += n;
    }
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

/** Index: for each 4 KiB block, the writes that touched it, in issue order. */
export function writesByBlock(records: WriteRecord[], blockSize = 4096): Map<number, WriteRecord[]> {
  const m = new Map<number, WriteRecord[]>();
  for (const r of records) {
    for (let b = r.offset / blockSize; b < (r.offset + r.length) / blockSize; b++) {
      let l = m.get(b);
      if (!l) m.set(b, (l = []));
      l.push(r);
    }
  }
  return m;
}

export interface SnapshotCheck { blocks: number; fromWrites: number; zeros: number; inWrites: number; outWrites: number; ambiguousWrites: number; problems: string[] }

/**
 * Checks an image against the instant of arming. A write acknowledged before the backup CLI was
 * launched is IN; a write sent after the armed event was received is OUT; anything else may be
 * either. For every 4 KiB block: all 8 sectors come from ONE write (or are all zeros) — never torn —
 * that write is not OUT, and it is not superseded by an IN write to the block sent after it was
 * acknowledged; zeros only where no IN write touched the block.
 */
export function checkSnapshot(imagePath: string, size: number, records: WriteRecord[], launchedAt: number, armedReceivedAt: number): SnapshotCheck {
  const bs = 4096;
  const bySeq = new Map(records.map((r) => [r.seq, r]));
  const cls = (r: WriteRecord): 'in' | 'out' | 'either' => (r.ack !== undefined && r.ack < launchedAt ? 'in' : r.start > armedReceivedAt ? 'out' : 'either');
  const res: SnapshotCheck = { blocks: size / bs, fromWrites: 0, zeros: 0, inWrites: 0, outWrites: 0, ambiguousWrites: 0, problems: [] };
  for (const r of records) {
    const c = cls(r);
    if (c === 'in') res.inWrites++;
    else if (c === 'out') res.outWrites++;
    else res.ambiguousWrites++;
  }
  const byBlock = writesByBlock(records, bs);
  const problem = (s: string) => { if (res.problems.length < 20) res.problems.push(s); };
  const CHUNK = 16 << 20;
  const ZERO = Buffer.alloc(bs);
  let image: Buffer = Buffer.alloc(0);
  let chunkStart = 0;
  for (let b = 0; b < res.blocks; b++) {
    if (b * bs >= chunkStart + image.length) {
      chunkStart = b * bs;
      image = readRange(imagePath, chunkStart, Math.min(CHUNK, size - chunkStart));
    }
    const at = b * bs - chunkStart;
    if (image.compare(ZERO, 0, bs, at, at + bs) === 0 && !byBlock.has(b)) { res.zeros++; continue; }
    const states = [];
    for (let s = 0; s < bs / SECTOR; s++) states.push(parseSector(image, at + s * SECTOR, b * bs + s * SECTOR));
    const bad = states.find((s) => s.kind === 'bad');
    if (bad && bad.kind === 'bad') { problem(`block ${b}: ${bad.why}`); continue; }
    const first = states[0]!;
    const same = states.every((s) => (s.kind === 'zero' && first.kind === 'zero') || (s.kind === 'write' && first.kind === 'write' && s.seq === first.seq));
    if (!same) { problem(`block ${b}: torn (${states.map((s) => (s.kind === 'write' ? s.seq : 0)).join(',')})`); continue; }
    const touching = byBlock.get(b) ?? [];
    if (first.kind === 'zero') {
      res.zeros++;
      const mustIn = touching.find((r) => cls(r) === 'in');
      if (mustIn) problem(`block ${b}: zeros, but write #${mustIn.seq} was acknowledged before the backup started`);
      continue;
    }
    if (first.kind !== 'write') continue;
    res.fromWrites++;
    const w = bySeq.get(first.seq);
    if (!w || !touching.includes(w)) { problem(`block ${b}: holds write #${first.seq}, which never touched it`); continue; }
    if (cls(w) === 'out') { problem(`block ${b}: holds write #${w.seq}, sent ${(w.start - armedReceivedAt).toFixed(1)} ms after the armed event was received`); continue; }
    const newer = touching.find((r) => r !== w && cls(r) === 'in' && w.ack !== undefined && r.start > w.ack);
    if (newer) problem(`block ${b}: holds write #${w.seq}, but write #${newer.seq} (sent after it was acknowledged) was acknowledged before the backup started`);
    if (w.ack === undefined && cls(w) !== 'either') problem(`block ${b}: holds unacknowledged write #${w.seq}`);
  }
  return res;
}

/**
 * Checks the live volume after all writes ended: every block holds a write that touched it and was
 * acknowledged, not superseded by one sent after its acknowledgement; zeros only where nothing
 * was acknowledged. With `allowUnacked`, sectors of unacknowledged (in-flight) writes are accepted.
 */
export function checkFinal(volPath: string, records: WriteRecord[], opts: { allowUnacked?: boolean } = {}): { checked: number; problems: string[] } {
  const bs = 4096;
  const bySeq = new Map(records.map((r) => [r.seq, r]));
  const byBlock = writesByBlock(records, bs);
  const problems: string[] = [];
  const problem = (s: string) => { if (problems.length < 20) problems.push(s); };
  let checked = 0;
  for (const [b, touching] of byBlock) {
    checked++;
    const vol = readRange(volPath, b * bs, bs);
    const acked = touching.filter((r) => r.ack !== undefined);
    for (let s = 0; s < bs / SECTOR; s++) {
      const off = b * bs + s * SECTOR;
      const st = parseSector(vol, s * SECTOR, off);
      if (st.kind === 'bad') { problem(`block ${b} sector ${s}: ${st.why}`); continue; }
      if (st.kind === 'zero') {
        if (acked.length) problem(`block ${b} sector ${s}: zeros, but write #${acked[0]!.seq} was acknowledged`);
        continue;
      }
      const w = bySeq.get(st.seq);
      if (!w || !touching.includes(w)) { problem(`block ${b} sector ${s}: holds write #${st.seq}, which never touched it`); continue; }
      if (w.ack === undefined) {
        if (!opts.allowUnacked) problem(`block ${b} sector ${s}: holds unacknowledged write #${w.seq}`);
        continue;
      }
      const newer = acked.find((r) => r !== w && r.start > w.ack!);
      if (newer) problem(`block ${b} sector ${s}: holds write #${w.seq}, but write #${newer.seq} sent after its acknowledgement was acknowledged too (lost write)`);
    }
  }
  return { checked, problems };
}

// ---------------------------------------------------------------------------------------------
// nbdfuse + losetup --direct-io=on (+ mount): how a machine without the nbd module attaches an export

export interface FuseStack { fuseDir: string; fuseFile: string; loop: string; mnt?: string }

export async function attachExport(t: ExecutionContext, dir: string, served: Served, opts: { mount?: boolean; mkfs?: string[] } = {}): Promise<FuseStack> {
  const fuseDir = path.join(dir, 'fuse');
  fs.mkdirSync(fuseDir, { recursive: true });
  const fuseFile = path.join(fuseDir, served.name);
  const fuse = spawn('nbdfuse', [fuseFile, served.uri], { stdio: ['ignore', 'ignore', 'pipe'] });
  let fuseErr = '';
  fuse.stderr!.on('data', (d) => (fuseErr += d));
  const fuseExit = new Promise<void>((res) => fuse.once('close', () => res()));
  t.teardown(async () => {
    await exec('fusermount3', ['-u', fuseDir]).catch(() => exec('fusermount3', ['-uz', fuseDir]).catch(() => {}));
    if (fuse.exitCode === null && fuse.signalCode === null) {
      const k = setTimeout(() => fuse.kill('SIGKILL'), 3000);
      await fuseExit;
      clearTimeout(k);
    }
  });
  // Every look at the FUSE file goes through a child process: stat on it may block until it is up.
  await waitUntil(async () => (await exec('stat', ['-c', '%s', fuseFile]).then((r) => r.stdout.trim(), () => '')) === String(served.size), 10_000, `nbdfuse to expose ${fuseFile} (${fuseErr})`);
  const loop = (await exec('losetup', ['-f', '--show', '--direct-io=on', fuseFile])).stdout.trim();
  t.teardown(async () => { await exec('losetup', ['-d', loop]).catch(() => {}); });
  if (opts.mkfs) await exec(opts.mkfs[0]!, [...opts.mkfs.slice(1), loop]);
  const stack: FuseStack = { fuseDir, fuseFile, loop };
  if (opts.mount) {
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt, { recursive: true });
    await exec('mount', [loop, mnt]);
    t.teardown(async () => {
      runStatus('fsfreeze', ['-u', mnt]);
      await exec('umount', [mnt]).catch(() => exec('umount', ['-l', mnt]).catch(() => {}));
    });
    stack.mnt = mnt;
  }
  return stack;
}

export const sh = async (script: string): Promise<string> => (await exec('sh', ['-c', script], { maxBuffer: 64 << 20 })).stdout;
