// `livesnap snapshot`: one instant of a live export served read-only over NBD, read by unmodified
// programs (nbdcopy, qemu-img convert, nbdfuse + loop + mount + tar) while writers keep writing.
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { encodeRequest } from '../src/nbd/transmission';
import * as P from '../src/nbd/protocol';
import { BIN } from './helpers/cli';
import { attach } from './helpers/nbd-raw';
import { attachExport, checkFinal, checkSnapshot, cli, now, SelfDescribingWriters, serialIf, serveDevice, sh, sleep, waitUntil } from './helpers/online';
import { rng, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const test = serialIf({ root: true, commands: ['qemu-io', 'nbdcopy', 'qemu-img', 'nbdinfo', 'nbdfuse', 'losetup', 'mkfs.ext4'] });

interface SnapshotRun {
  launchedAt: number;
  armed: Promise<{ event: Record<string, unknown>; receivedAt: number }>;
  end(): Promise<{ status: number | null; stdout: string; stderr: string }>;
}

/** `livesnap snapshot ... --json` as a child; end() is Ctrl-C (SIGINT), the normal way to end it. */
function startSnapshot(t: ExecutionContext, args: string[]): SnapshotRun {
  const launchedAt = now();
  const proc = spawn(process.execPath, [BIN, 'snapshot', ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => { if (proc.exitCode === null) proc.kill('SIGKILL'); });
  let stdout = '', stderr = '';
  let resolveArmed!: (v: { event: Record<string, unknown>; receivedAt: number }) => void;
  const armed = new Promise<{ event: Record<string, unknown>; receivedAt: number }>((res) => (resolveArmed = res));
  proc.stdout.on('data', (d: Buffer) => {
    const at = now();
    stdout += d;
    for (const line of stdout.split('\n')) {
      if (!line.startsWith('{')) continue;
      const j = JSON.parse(line) as Record<string, unknown>;
      if (j.event === 'armed') resolveArmed({ event: j, receivedAt: at });
    }
  });
  proc.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<{ status: number | null; stdout: string; stderr: string }>((res) => proc.once('close', (status) => res({ status, stdout, stderr })));
  return { launchedAt, armed, end: () => { proc.kill('SIGINT'); return exited; } };
}

/** A 64 MiB export "live" with 4 seeded writers going, `acked` writes acknowledged already. */
async function liveUnderWriters(t: ExecutionContext, prefix: string, acked: number) {
  const r = rng(seedFromEnv(t));
  const dir = scratchDir(t, prefix);
  const size = 64 * MiB;
  const vol = sparseFile(path.join(dir, 'vol.raw'), size);
  const served = await serveDevice(t, dir, vol, 'live');
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, r, { writers: 4, maxBlocks: 16 });
  writers.start();
  await writers.acked(acked);
  return { dir, size, vol, served, writers };
}

test('the view is the instant: nbdcopy and qemu-img convert read it exactly while 4 connections keep writing; writes to it are refused', async (t) => {
  const { dir, size, vol, served, writers } = await liveUnderWriters(t, 'snapx-exact-', 400);
  const snap = startSnapshot(t, ['live', '--container', 'memory:32M', '--control', served.control]);
  const armed = await snap.armed;
  const uri = String(armed.event.uri);
  t.regex(uri, /^nbd\+unix:\/\/\/live\.snapshot-\d+\?socket=/);
  await writers.acked(writers.records.filter((w) => w.ack !== undefined).length + 300); // writes after the instant
  const copy = path.join(dir, 'nbdcopy.raw');
  const conv = path.join(dir, 'qemu-img.raw');
  const c1 = runStatus('nbdcopy', [uri, copy]);
  t.is(c1.status, 0, c1.stderr);
  const c2 = runStatus('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, conv]);
  t.is(c2.status, 0, c2.stderr);
  // Writes to the view: refused with EPERM, and the view says it is read-only.
  const info = runStatus('nbdinfo', ['--json', uri]);
  t.true((JSON.parse(info.stdout) as { exports: Array<{ is_read_only: boolean }> }).exports[0]!.is_read_only);
  const socket = String(armed.event.socket);
  const { c } = await attach(socket, { name: String(armed.event.export) });
  c.write(Buffer.concat([encodeRequest(P.NBD_CMD_WRITE, 0, 7, 0, 4096), Buffer.alloc(4096, 0xee)]));
  t.is((await c.simpleReply()).error, P.NBD_EPERM, 'a WRITE to the view gets EPERM');
  c.destroy();
  const st = await served.status();
  const job = st.jobs.find((j) => j.id === armed.event.job) as unknown as { kind: string; view: string; livedMs: number; containerUsedBytes: number };
  t.is(job.kind, 'snapshot');
  t.is(job.view, String(armed.event.export));
  t.true(job.containerUsedBytes > 0, 'writers saved originals into the container');
  const ended = await snap.end();
  t.is(ended.status, 0, ended.stderr);
  const codes = await writers.stop();
  t.deepEqual(codes, codes.map(() => 0));
  t.deepEqual(writers.records.filter((w) => w.failed).map((w) => w.failed), [], 'no write failed');
  for (const img of [copy, conv]) {
    const check = checkSnapshot(img, size, writers.records, snap.launchedAt, armed.receivedAt);
    t.deepEqual(check.problems.slice(0, 10), [], `${path.basename(img)} is the instant`);
    t.true(check.inWrites > 0 && check.outWrites > 0, `${path.basename(img)}: writes on both sides of the instant (${check.inWrites} in, ${check.outWrites} out)`);
  }
  t.true(fs.readFileSync(copy).equals(fs.readFileSync(conv)), 'both readers saw the same instant');
  // Ended: the view is gone, the container freed.
  await waitUntil(() => !fs.existsSync(socket), 5000, 'the view socket to go');
  const after = (await served.status()).jobs.find((j) => j.id === armed.event.job);
  t.is(after?.state, 'done');
  t.is((await served.status()).exports[0]!.job, null);
});

test('a real ext4 with churn: the view mounted read-only through nbdfuse + loop holds every file of the instant; holes are skipped; cancel ends a detached one and removes its container file', async (t) => {
  const dir = scratchDir(t, 'snapx-fs-');
  const vol = sparseFile(path.join(dir, 'vol.raw'), 512 * MiB);
  const served = await serveDevice(t, dir, vol, 'fs');
  const stack = await attachExport(t, dir, served, { mkfs: ['mkfs.ext4', '-q', '-F'], mount: true });
  const mnt = stack.mnt!;
  // Files fsync'd before the instant, then churn during it.
  const stable = new Map<string, string>();
  fs.mkdirSync(path.join(mnt, 'stable'));
  for (let i = 0; i < 40; i++) {
    const data = crypto.randomBytes(64 * 1024 + i * 4096);
    fs.writeFileSync(path.join(mnt, 'stable', `f${i}`), data);
    stable.set(`stable/f${i}`, crypto.createHash('sha256').update(data).digest('hex'));
  }
  // Churn all along: files overwritten and deleted, synced.
  const churn = spawn('sh', ['-c', `i=0; while true; do i=$((i+1)); head -c 300000 /dev/urandom > ${mnt}/c$((i % 30)); rm -f ${mnt}/c$(((i * 7) % 30)); sync -f ${mnt}; done`], { stdio: 'ignore' });
  t.teardown(() => { if (churn.exitCode === null) churn.kill('SIGKILL'); });
  // sync, so the instant holds the stable files (the freeze does the same for a consistent fs).
  await sh(`sync -f ${mnt}`);
  const cow = path.join(dir, 'cow.bin');
  const r = await cli(['snapshot', 'fs', '--freeze', mnt, '--container', `file:${cow}:64M`, '--detach', '--json', '--control', served.control]);
  t.is(r.status, 0, r.stderr);
  const res = JSON.parse(r.stdout.trim().split('\n').pop()!) as { job: string; uri: string };
  t.true(fs.existsSync(cow));
  // After the instant: the stable files are deleted and overwritten on the live volume.
  for (let i = 0; i < 40; i += 2) fs.rmSync(path.join(mnt, 'stable', `f${i}`));
  for (let i = 1; i < 40; i += 2) fs.writeFileSync(path.join(mnt, 'stable', `f${i}`), crypto.randomBytes(8192));
  await sh(`sync -f ${mnt}`);
  await sleep(1000);
  churn.kill('SIGKILL');
  // Block status: the free blocks of the instant are holes, and nbdcopy leaves them out.
  const map = runStatus('nbdinfo', ['--map', res.uri]);
  t.regex(map.stdout, /hole/);
  const copy = path.join(dir, 'view.raw');
  t.is(runStatus('nbdcopy', [res.uri, copy]).status, 0);
  const allocated = fs.statSync(copy).blocks * 512;
  t.true(allocated < 200 * MiB, `nbdcopy skipped the holes (${(allocated / MiB).toFixed(0)} MiB allocated of 512)`);
  t.is(runStatus('e2fsck', ['-fn', copy]).status, 0, 'the instant is a clean file system');
  // Mount the VIEW itself through nbdfuse + a read-only loop device, as a file backup program would.
  const vdir = path.join(dir, 'view');
  fs.mkdirSync(vdir);
  const fuse = spawn('nbdfuse', ['-r', path.join(vdir, 'img'), res.uri], { stdio: 'ignore' });
  t.teardown(async () => { runStatus('fusermount3', ['-uz', vdir]); if (fuse.exitCode === null) fuse.kill('SIGKILL'); });
  await waitUntil(() => runStatus('stat', ['-c', '%s', path.join(vdir, 'img')]).stdout.trim() === String(512 * MiB), 10_000, 'nbdfuse of the view');
  const loop = runStatus('losetup', ['-f', '--show', '-r', path.join(vdir, 'img')]).stdout.trim();
  t.teardown(() => { runStatus('losetup', ['-d', loop]); });
  const vmnt = path.join(dir, 'vmnt');
  fs.mkdirSync(vmnt);
  t.is(runStatus('mount', ['-o', 'ro,noload', loop, vmnt]).status, 0);
  t.teardown(() => { runStatus('umount', [vmnt]); });
  const tarOut = path.join(dir, 'files.tar');
  t.is(runStatus('tar', ['-C', vmnt, '-cf', tarOut, 'stable']).status, 0);
  const ex = path.join(dir, 'extracted');
  fs.mkdirSync(ex);
  t.is(runStatus('tar', ['-C', ex, '-xf', tarOut]).status, 0);
  for (const [name, sum] of stable) {
    const got = crypto.createHash('sha256').update(fs.readFileSync(path.join(ex, name))).digest('hex');
    t.is(got, sum, `${name} of the instant`);
  }
  runStatus('umount', [vmnt]);
  runStatus('losetup', ['-d', loop]);
  // cancel ends the detached snapshot: the view goes, the container file is removed.
  const cancel = await cli(['cancel', res.job, '--control', served.control]);
  t.is(cancel.status, 0, cancel.stderr);
  await waitUntil(() => !fs.existsSync(cow), 5000, 'the container file to be removed');
  const st = await served.status();
  t.is(st.exports[0]!.job, null);
});

test('snapshot --method hold --hold-log: writes go to the log (acknowledged at once), the view reads the device as the instant, the log is replayed in order when the view ends', async (t) => {
  const { dir, size, vol, served, writers } = await liveUnderWriters(t, 'snapx-hold-', 300);
  const bad = await cli(['snapshot', 'live', '--method', 'hold', '--hold', 'backup-blocks', '--control', served.control]);
  t.is(bad.status, 1);
  t.regex(bad.stderr, /--hold backup-blocks does not go with a snapshot view/);
  const snap = startSnapshot(t, ['live', '--method', 'hold', '--hold-log', `${path.join(dir, 'hold.log')}:64M`, '--control', served.control]);
  const armed = await snap.armed;
  const uri = String(armed.event.uri);
  const before = writers.records.filter((w) => w.ack !== undefined).length;
  await writers.acked(before + 300, 30_000); // acknowledged while held: the log takes them
  const copy = path.join(dir, 'view.raw');
  const c1 = runStatus('nbdcopy', [uri, copy]);
  t.is(c1.status, 0, c1.stderr);
  const ended = await snap.end();
  t.is(ended.status, 0, ended.stderr);
  const done = JSON.parse(ended.stdout.trim().split('\n').filter((l) => l.startsWith('{')).pop()!) as { method?: string; hold?: { heldWrites: number; loggedWrites: number; releaseMs: number } };
  t.is(done.method, 'hold', ended.stdout);
  t.true((done.hold?.heldWrites ?? 0) > 0 && (done.hold?.loggedWrites ?? 0) > 0, JSON.stringify(done.hold));
  await sleep(100);
  const codes = await writers.stop();
  t.deepEqual(codes, codes.map(() => 0));
  t.deepEqual(writers.records.filter((w) => w.failed).map((w) => w.failed), [], 'no write failed');
  const check = checkSnapshot(copy, size, writers.records, snap.launchedAt, armed.receivedAt);
  t.deepEqual(check.problems.slice(0, 10), [], 'the view was the instant');
  t.true(check.inWrites > 0 && check.outWrites > 0, `writes on both sides of the instant (${check.inWrites} in, ${check.outWrites} out)`);
  t.deepEqual(checkFinal(vol, writers.records).problems.slice(0, 10), [], 'every acknowledged write is on the volume after the replay');
  t.is((await served.status()).exports[0]!.job, null);
});
