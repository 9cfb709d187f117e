// The demo of the real thing: the demo volume is SERVED by livesnap, its ext4 is mounted through
// nbdfuse + a direct-I/O loop device (how a machine without the nbd module attaches an export),
// a writer keeps creating, overwriting and deleting files, and an online backup is taken meanwhile.
// The image is then restored elsewhere, verified, checked with e2fsck and by every file's checksum.
//
// Everything that reads or writes the mounted file system runs in child processes: their I/O comes
// back into this process's NBD server, so this event loop must never block on it.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { request } from '../control/client';
import { Daemon } from '../control/daemon';
import { restoreImage, verifyImage } from '../jobs/restore';
import { UserError } from '../util/errors';
import { sh, shStatus } from './system';

const run = promisify(execFile);

export interface OnlineDemoOptions {
  dir: string;
  sizeBytes: number;
  dataBytes: number;
  log: (line: string) => void;
  onProgress?: (phase: string, done: number, total: number) => void;
}

export interface OnlineDemoResult {
  dir: string;
  volume: string;
  backup: Record<string, unknown>;
  writerOps: number;
  /** File operations the writer completed between arming and the end of the backup. */
  writerOpsDuringBackup: number;
  restoreMs: number;
  verify: { differingBlocks: number; comparedBytes: number };
  fsck: 'clean';
  files: number;
  filesMatching: number;
}

async function checksums(root: string, sub: string): Promise<Map<string, string>> {
  const { stdout } = await run('sh', ['-c', `cd "${root}" && find ${sub} -type f -print0 | sort -z | xargs -0 -r sha256sum`], { maxBuffer: 64 << 20 });
  const m = new Map<string, string>();
  for (const line of stdout.trim().split('\n')) {
    const i = line.indexOf('  ');
    if (i > 0) m.set(line.slice(i + 2), line.slice(0, i));
  }
  return m;
}

async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new UserError(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function runOnlineDemo(o: OnlineDemoOptions): Promise<OnlineDemoResult> {
  if (process.getuid?.() !== 0) {
    throw new UserError('the demo needs root: it creates a loop device, a FUSE mount and an ext4 mount', 'run it as root, e.g. "sudo livesnap demo"');
  }
  for (const [cmd, pkg] of [['nbdfuse', 'libnbd-bin'], ['fusermount3', 'fuse3'], ['mkfs.ext4', 'e2fsprogs'], ['losetup', 'mount']] as const) {
    if (shStatus('sh', ['-c', `command -v ${cmd}`]).status !== 0) throw new UserError(`the demo needs "${cmd}", which is not installed`, `install it: apt-get install ${pkg}`);
  }
  fs.mkdirSync(o.dir, { recursive: true });
  const volume = path.join(o.dir, 'volume.img');
  const backupImg = path.join(o.dir, 'backup.img');
  const restored = path.join(o.dir, 'restored.img');
  const runDir = path.join(o.dir, 'run');
  const fuseDir = path.join(o.dir, 'fuse');
  const mnt = path.join(o.dir, 'mnt');
  const restoredMnt = path.join(o.dir, 'restored-mnt');
  for (const f of [volume, backupImg, restored]) fs.rmSync(f, { force: true });
  for (const d of [runDir, fuseDir, mnt, restoredMnt]) fs.mkdirSync(d, { recursive: true, mode: 0o700 });
  const undo: Array<() => Promise<void> | void> = [];
  let writer: ChildProcess | undefined;
  try {
    o.log(`creating a ${Math.round(o.sizeBytes / 2 ** 20)} MiB ext4 volume in ${volume}`);
    fs.closeSync(fs.openSync(volume, 'w'));
    fs.truncateSync(volume, o.sizeBytes);
    sh('mkfs.ext4', ['-q', '-F', '-L', 'livesnap-demo', volume], 'e2fsprogs');

    const control = path.join(runDir, 'control.sock');
    const daemon = new Daemon(control, () => {});
    await daemon.listen();
    undo.push(() => daemon.shutdown());
    const served = await daemon.serve({ op: 'serve', device: volume, name: 'demo', state: path.join(o.dir, 'state') });
    o.log(`serving it over NBD as "demo" on ${served.socket}`);

    const fuseFile = path.join(fuseDir, 'demo');
    const nbdfuse = spawn('nbdfuse', [fuseFile, '--unix', String(served.socket)], { stdio: 'ignore' });
    undo.push(async () => { await run('fusermount3', ['-u', fuseDir]).catch(() => {}); nbdfuse.kill(); });
    await waitFor(() => { try { return fs.statSync(fuseFile).size > 0; } catch { return false; } }, 10_000, 'nbdfuse');
    const { stdout: loopOut } = await run('losetup', ['-f', '--show', '--direct-io=on', fuseFile]);
    const loop = loopOut.trim();
    undo.push(async () => { await run('losetup', ['-d', loop]).catch(() => {}); });
    await run('mount', [loop, mnt]);
    undo.push(async () => { await run('fsfreeze', ['-u', mnt]).catch(() => {}); await run('umount', [mnt]).catch(() => run('umount', ['-l', mnt]).catch(() => {})); });
    o.log(`mounted it through nbdfuse + ${loop} (direct I/O) at ${mnt}`);

    // Files that stay put during the backup: every one must come back with its checksum.
    const nFiles = Math.max(4, Math.round(o.dataBytes / (2 << 20)));
    await run('sh', ['-c', `mkdir -p "${mnt}/keep" && for i in $(seq 1 ${nFiles}); do head -c $(( (i % 4 + 1) * 512 ))K /dev/urandom > "${mnt}/keep/file$i"; done; sync -f "${mnt}"`]);
    const before = await checksums(mnt, 'keep');
    o.log(`wrote ${before.size} files; starting a writer that keeps creating, overwriting and deleting files`);
    // The writer prints a line per file operation: counted here, never read back through the mount.
    writer = spawn('sh', ['-c', `mkdir -p "${mnt}/churn"; i=0; while :; do i=$((i+1)); head -c 256K /dev/urandom > "${mnt}/churn/f$((i % 50))"; [ $((i % 7)) -eq 0 ] && rm -f "${mnt}/churn/f$((i % 13))"; [ $((i % 10)) -eq 0 ] && sync -f "${mnt}"; echo $i; done`], { stdio: ['ignore', 'pipe', 'ignore'] });
    const w = writer;
    let ops = 0;
    w.stdout!.on('data', (b: Buffer) => { for (const c of b) if (c === 10) ops++; });
    undo.push(() => { w.kill('SIGKILL'); });
    await waitFor(() => ops >= 5, 10_000, 'the writer to start');

    o.log(`online backup of "demo" (frozen only for the instant of arming) to ${backupImg}`);
    let opsAtArm = ops;
    const conn = await request(control, { op: 'backup', export: 'demo', to: backupImg, freeze: mnt, onError: 'abort', container: 'memory:32M' });
    let backup: Record<string, unknown> | undefined;
    for await (const m of conn.replies) {
      if (m.type === 'event' && m.event === 'armed') { opsAtArm = ops; o.log(`armed: freeze window ${Number(m.freezeMs).toFixed(1)} ms, writers keep going`); }
      if (m.type === 'event' && m.event === 'progress') o.onProgress?.('backup', m.bytesDone as number, m.bytesTotal as number);
      if (m.type === 'error') throw new UserError(`online backup failed: ${m.message}`, m.hint);
      if (m.type === 'result') backup = m;
    }
    conn.close();
    if (!backup) throw new UserError('the online backup ended without a result');
    const writerOpsDuringBackup = ops - opsAtArm;
    writer.kill('SIGKILL');
    await new Promise((r) => w.once('exit', r));
    const writerOps = ops;
    for (const u of undo.splice(0).reverse()) await u();

    o.log(`restoring ${backupImg} into ${restored}`);
    const t0 = performance.now();
    await restoreImage({ image: backupImg, target: restored, onProgress: (d, t) => o.onProgress?.('restore', d, t) });
    const restoreMs = performance.now() - t0;
    o.log(`verifying ${restored} against ${backupImg}, block by block`);
    const v = await verifyImage({ image: restored, against: backupImg });
    if (v.differingBlocks) throw new UserError(`verify failed: ${v.differingBlocks} blocks differ (first: ${v.firstDifferingBlock})`);
    const fsck = shStatus('e2fsck', ['-fn', restored]);
    if (fsck.status !== 0) throw new UserError(`e2fsck found problems in the restored image:\n${fsck.out}`);
    const rloop = sh('losetup', ['-f', '--show', '-r', restored]).trim();
    undo.push(() => { shStatus('losetup', ['-d', rloop]); });
    sh('mount', ['-o', 'ro', rloop, restoredMnt]);
    undo.push(() => { shStatus('umount', [restoredMnt]); });
    const after = await checksums(restoredMnt, 'keep');
    let matching = 0;
    for (const [f, h] of before) if (after.get(f) === h) matching++;
    if (matching !== before.size) throw new UserError(`only ${matching} of ${before.size} files have their checksum in the restored volume`);
    return { dir: o.dir, volume, backup, writerOps, writerOpsDuringBackup, restoreMs, verify: { differingBlocks: v.differingBlocks, comparedBytes: v.bytes }, fsck: 'clean', files: before.size, filesMatching: matching };
  } finally {
    writer?.kill('SIGKILL');
    for (const u of undo.reverse()) await Promise.resolve(u()).catch(() => {});
  }
}
