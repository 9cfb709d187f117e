// An online backup of a real ext4 mounted through the whole stack (ext4 on a direct-I/O loop device
// on nbdfuse on the daemon's NBD socket), with a writer process creating, overwriting and deleting
// files all along. The backup freezes the file system for the instant of arming only; the image,
// restored with "livesnap restore", must pass e2fsck -fn and hold exactly the files of that instant.
// One scenario for every snapshot method: a test names the backup's options and what its done
// event must say.
import type { ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { attachExport, cli, serialIf as testIf, serveDevice, sh, sleep, startBackup, waitUntil } from './online';
import { loopDevice, mount, runStatus, scratchDir, seedFromEnv, sparseFile } from './system';

const MiB = 1 << 20;

// The writer, a child process: "stable" files (written in 3 pieces, fsync'd, then never touched;
// it reports "fsynced NAME" once fsync returned), "churn" files overwritten whole in one write()
// (O_TRUNC) or deleted. After a line "late" on its stdin, new stable files are named late-N.
const WRITER = String.raw`
const fs = require('fs'), path = require('path');
const [mnt, seed] = [process.argv[1], Number(process.argv[2])];
const stable = (name) => { const n = 24 * 1024 + ((seed + name.length * 7919 + Number(name.split('-')[1])) % 97) * 1024; return Buffer.alloc(n, 'stable ' + name + ' '); };
const churn = (g) => Buffer.alloc(64 * 1024, 'churn ' + g + ' ');
fs.mkdirSync(path.join(mnt, 'stable'), { recursive: true });
fs.mkdirSync(path.join(mnt, 'churn'), { recursive: true });
let phase = 'early';
process.stdin.on('data', (d) => { if (String(d).includes('late')) phase = 'late'; });
let i = 0;
(async function loop() {
  for (;;) {
    i++;
    const name = phase + '-' + i;
    const data = stable(name);
    const fd = fs.openSync(path.join(mnt, 'stable', name), 'w');
    const third = Math.floor(data.length / 3);
    fs.writeSync(fd, data, 0, third, 0);
    fs.writeSync(fd, data, third, third, third);
    fs.writeSync(fd, data, 2 * third, data.length - 2 * third, 2 * third);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    process.stdout.write('fsynced ' + name + '\n');
    fs.writeFileSync(path.join(mnt, 'churn', 'f' + (i % 20)), churn(i));
    if (i % 3 === 0) fs.rmSync(path.join(mnt, 'churn', 'f' + ((i * 7) % 20)), { force: true });
    await new Promise((r) => setImmediate(r));
  }
})();
`;

function expectedStable(seed: number, name: string): Buffer {
  const n = 24 * 1024 + ((seed + name.length * 7919 + Number(name.split('-')[1])) % 97) * 1024;
  return Buffer.alloc(n, 'stable ' + name + ' ');
}

export interface FsInstantOptions {
  /** Scratch directory prefix. */
  prefix: string;
  /** The backup's options besides --to, --freeze and --control. */
  backupArgs: (dir: string) => string[];
  /** Method-specific checks of the done event. */
  checkDone?: (t: ExecutionContext, done: Record<string, unknown>) => void;
  /** The file system (default ext4, checked with e2fsck -fn; xfs: xfs_repair -n). */
  fs?: 'ext4' | 'xfs';
  /** --hold metadata: the structure is the instant's, file data may be newer (files rewritten during the backup are not compared). */
  dataMayBeNewer?: boolean;
  /** A target other than an image file in the scratch directory (the appliance): --to, and where the backup is once done. */
  target?: (t: ExecutionContext, ctx: { dir: string; vol: string }) => Promise<{ to: string; args: string[]; backupOf: (done: Record<string, unknown>) => string }>;
}

export function fsInstantTest(name: string, o: FsInstantOptions): void {
  const xfs = o.fs === 'xfs';
  testIf({ root: true, commands: ['nbdfuse', 'fusermount3', 'losetup', 'sha256sum', ...(xfs ? ['mkfs.xfs', 'xfs_repair'] : ['mkfs.ext4', 'e2fsck'])] })(name, async (t) => {
    const seed = seedFromEnv(t) % 100_000;
    const dir = scratchDir(t, o.prefix);
    const vol = sparseFile(path.join(dir, 'vol.raw'), 512 * MiB);
    const served = await serveDevice(t, dir, vol, 'fsvol');
    t.teardown(() => { if (!t.passed) t.log(served.logTail()); });
    const stack = await attachExport(t, dir, served, { mkfs: xfs ? ['mkfs.xfs', '-q', '-f'] : ['mkfs.ext4', '-q', '-F', '-b', '4096'], mount: true });
    const mnt = stack.mnt!;

    // Files written and synced before the backup and never touched during it.
    await sh(`mkdir -p ${mnt}/keep && for i in $(seq 1 40); do head -c $(( (i % 6 + 1) * 997 ))K /dev/urandom > ${mnt}/keep/k$i; done; sync -f ${mnt}`);
    const keep = await sh(`cd ${mnt} && sha256sum keep/*`);

    const fsynced = new Map<string, number>(); // name -> when this process learnt it was fsync'd
    const writer = spawn(process.execPath, ['-e', WRITER, mnt, String(seed)], { stdio: ['pipe', 'pipe', 'pipe'] });
    let werr = '', wbuf = '';
    writer.stderr!.on('data', (d) => (werr += d));
    writer.stdout!.on('data', (d: Buffer) => {
      const at = performance.now();
      wbuf += d.toString();
      let nl: number;
      while ((nl = wbuf.indexOf('\n')) >= 0) {
        const m = /^fsynced (\S+)/.exec(wbuf.slice(0, nl));
        wbuf = wbuf.slice(nl + 1);
        if (m) fsynced.set(m[1]!, at);
      }
    });
    const writerExit = new Promise<void>((r) => writer.once('close', () => r()));
    t.teardown(async () => { if (writer.exitCode === null && writer.signalCode === null) { writer.kill('SIGKILL'); await writerExit; } });
    await waitUntil(() => fsynced.size >= 30, 30_000, `the writer to get going (${werr})`);

    const target = o.target ? await o.target(t, { dir, vol }) : { to: path.join(dir, 'backup.img'), args: [], backupOf: () => path.join(dir, 'backup.img') };
    const backup = startBackup(t, [served.name, '--to', target.to, '--freeze', mnt, ...target.args, ...o.backupArgs(dir), '--control', served.control]);
    const armed = await backup.armed;
    writer.stdin!.write('late\n');
    const res = await backup.exit;
    await sleep(200);
    writer.kill('SIGKILL');
    await writerExit;
    t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
    const done = res.lines[res.lines.length - 1]!;
    t.is(done.filesystem, o.fs ?? 'ext4');
    o.checkDone?.(t, done);
    // --freeze writes back with syncfs first (writers still going), then freezes: both are reported.
    t.is(typeof armed.event.presyncMs, 'number');
    t.true(Number(armed.event.presyncMs) >= 0 && Number(armed.event.freezeMs) > 0);
    const lateFsynced = [...fsynced.keys()].filter((n) => n.startsWith('late-')).length;
    t.log(`freeze window ${Number(armed.event.freezeMs).toFixed(2)} ms; backup ${Number(done.durationMs).toFixed(0)} ms, ${done.usedBlocks} used blocks of ${done.totalBlocks}; ` +
      `writer fsync'd ${fsynced.size} files (${lateFsynced} after arming); worst write delay ${Number(done.worstWriteDelayMs).toFixed(1)} ms`);
    t.true(werr === '', `the writer never failed: ${werr}`);

    // Restore with livesnap, check the file system, then look at every file.
    const restored = path.join(dir, 'restored.raw');
    const rr = await cli(['restore', target.backupOf(done), '--to', restored]);
    t.is(rr.status, 0, rr.stderr);
    if (xfs) {
      // A frozen XFS leaves its superblock counters in the log: replay it (as any mount would) before the check.
      const rw = mount(t, loopDevice(t, restored), path.join(dir, 'replay-mnt'), ['nouuid']); // the live one is still mounted
      t.is(runStatus('umount', [rw]).status, 0);
    }
    const fsck = xfs ? runStatus('xfs_repair', ['-n', '-f', restored]) : runStatus('e2fsck', ['-fn', restored]);
    t.is(fsck.status, 0, `${xfs ? 'xfs_repair -n' : 'e2fsck -fn'} of the restored volume:\n${fsck.stdout}${fsck.stderr}`);
    const rmnt = mount(t, loopDevice(t, restored, { readOnly: true }), path.join(dir, 'restored-mnt'), xfs ? ['ro', 'norecovery', 'nouuid'] : ['ro']);
    t.is(await sh(`cd ${rmnt} && sha256sum keep/*`), keep, 'every file written before the backup has its checksum');

    const present = new Set(fs.readdirSync(path.join(rmnt, 'stable')));
    const mustBeIn = [...fsynced].filter(([, at]) => at < backup.launchedAt).map(([n]) => n);
    t.true(mustBeIn.length >= 30);
    for (const n of mustBeIn) {
      if (!present.has(n)) { t.fail(`${n} was fsync'd before the backup started but is not in the image`); continue; }
      t.true(fs.readFileSync(path.join(rmnt, 'stable', n)).equals(expectedStable(seed, n)), `${n}: fsync'd before the backup, content intact`);
    }
    let partial = 0;
    for (const n of present) {
      t.false(n.startsWith('late-'), `${n} was created after arming, yet it is in the image`);
      const got = fs.readFileSync(path.join(rmnt, 'stable', n));
      const want = expectedStable(seed, n);
      // A file being written at the instant holds a prefix of its content (each write() is atomic
      // against the freeze); never anything else.
      t.true(got.length <= want.length && got.equals(want.subarray(0, got.length)), `${n}: a prefix of its content`);
      if (got.length < want.length) partial++;
    }
    // Churn files: each one empty (truncated at the instant) or exactly one generation, whole.
    const churn = fs.readdirSync(path.join(rmnt, 'churn'));
    for (const f of o.dataMayBeNewer ? [] : churn) {
      const got = fs.readFileSync(path.join(rmnt, 'churn', f));
      if (got.length === 0) continue;
      const g = /^churn (\d+) /.exec(got.toString('latin1', 0, 32));
      t.truthy(g, `churn/${f}: starts with its generation`);
      if (g) t.true(got.equals(Buffer.alloc(64 * 1024, `churn ${g[1]} `)), `churn/${f}: generation ${g[1]} whole`);
    }
    const digest = crypto.createHash('sha256').update([...present].sort().join(',')).digest('hex').slice(0, 12);
    t.log(`restored image: ${present.size} stable files (${mustBeIn.length} required, ${partial} partial), ${churn.length} churn files; names digest ${digest}`);
  });
}
