// The daemon must never wait on the file system it serves, and a freeze must freeze the export's own
// file system: real ext4 through nbdfuse + a direct-I/O loop device + mount, as a client would use it.
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { attachExport, cli, serialIf, serveDevice, sh, sleep, startBackup } from './helpers/online';
import { loopDevice, mount, run, runStatus, scratchDir, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const test = serialIf({ root: true, commands: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'fio'] });

/** An ext4 export mounted through the whole stack. */
async function mountedExport(t: Parameters<typeof scratchDir>[0], prefix: string, sizeMiB = 512) {
  const dir = scratchDir(t, prefix);
  const vol = sparseFile(path.join(dir, 'vol.raw'), sizeMiB * MiB);
  const served = await serveDevice(t, dir, vol, 'fsx');
  const stack = await attachExport(t, dir, served, { mkfs: ['mkfs.ext4', '-q', '-F'], mount: true });
  return { dir, vol, served, mnt: stack.mnt! };
}

/** True when a write + fsync to the mounted file system returns within `ms` (it is not frozen or hung). */
async function fsResponds(mnt: string, ms: number): Promise<boolean> {
  const p = sh(`dd if=/dev/zero of=${mnt}/probe bs=4k count=1 conv=fsync 2>/dev/null && echo ok`).catch(() => '');
  const r = await Promise.race([p, sleep(ms).then(() => 'timeout')]);
  return r.trim() === 'ok';
}

test('--freeze is checked against the export: another file system, or a directory on the export, is refused', async (t) => {
  const { dir, served, mnt } = await mountedExport(t, 'sacredfs-freeze-');
  const other = sparseFile(path.join(dir, 'other.img'), 64 * MiB);
  run('mkfs.ext4', ['-q', '-F', other]);
  const omnt = mount(t, loopDevice(t, other), path.join(dir, 'other-mnt'));
  fs.mkdirSync(path.join(mnt, 'sub'));
  const ctl = ['--control', served.control, '--to', path.join(dir, 'b.img')];
  const r1 = await cli(['backup', 'fsx', '--freeze', omnt, ...ctl]);
  t.is(r1.status, 1);
  t.regex(r1.stderr, /other-mnt is not where .*vol\.raw is mounted \(it holds \/dev\/loop\d+, ext4\)/);
  const r2 = await cli(['backup', 'fsx', '--freeze', path.join(mnt, 'sub'), ...ctl]);
  t.is(r2.status, 1);
  t.regex(r2.stderr, /sub is not a mount point/);
  t.true(await fsResponds(omnt, 5000), 'the other file system was not frozen');
  // The export's own mount point is accepted.
  const ok = await cli(['backup', 'fsx', '--freeze', mnt, ...ctl, '--json']);
  t.is(ok.status, 0, ok.stderr);
});

test('a target inside the served file system is refused; the container file inside it works under a fsync-heavy load', async (t) => {
  const { dir, served, mnt } = await mountedExport(t, 'sacredfs-inside-');
  for (const name of ['self.img', 'self.tar']) {
    const r = await cli(['backup', 'fsx', '--to', path.join(mnt, name), '--control', served.control]);
    t.is(r.status, 1, name);
    t.regex(r.stderr, /is inside the file system served as "fsx" \(\/dev\/loop\d+ holds it\)/, name);
    t.false(fs.existsSync(path.join(mnt, name)) || fs.existsSync(path.join(mnt, `${name}.partial`)));
  }
  const fio = spawn('fio', ['--name=load', `--directory=${mnt}`, '--rw=randwrite', '--bs=4k', '--size=64M', '--fsync=16', '--time_based', '--runtime=60', '--ioengine=psync'], { stdio: 'ignore' });
  t.teardown(() => { if (fio.exitCode === null) fio.kill('SIGKILL'); });
  await sleep(1500);
  const out = path.join(dir, 'backup.img');
  const b = startBackup(t, ['fsx', '--to', out, '--container', `file:${path.join(mnt, 'cow.bin')}:32M`, '--freeze', mnt, '--control', served.control]);
  const res = await Promise.race([b.exit, sleep(90_000).then(() => undefined)]);
  fio.kill('SIGTERM');
  t.truthy(res, 'the backup did not hang');
  t.is(res!.status, 0, res!.stderr);
  const done = res!.lines.find((l) => l.event === 'done') as { container: string; blocks: number; usedBlocks: number };
  t.regex(done.container, /inside the protected file system/);
  t.is(done.blocks, done.usedBlocks);
  t.false(fs.existsSync(path.join(mnt, 'cow.bin')), 'the container file is removed');
  const fsck = runStatus('e2fsck', ['-fn', out]);
  t.is(fsck.status, 0, fsck.stdout);
});

test('the backup CLI killed during a --freeze with a lot of dirty data: the file system is thawed and the daemon keeps serving', async (t) => {
  const { dir, served, mnt } = await mountedExport(t, 'sacredfs-kill-', 1024);
  for (const delay of [50, 150, 400]) {
    // ~300 MB of dirty pages: FIFREEZE (and the syncfs before it) must write them through the export.
    await sh(`dd if=/dev/urandom of=${mnt}/dirty-${delay} bs=1M count=300 status=none`);
    const b = startBackup(t, ['fsx', '--to', path.join(dir, `k${delay}.img`), '--freeze', mnt, '--control', served.control]);
    await sleep(delay);
    b.proc.kill('SIGKILL');
    await b.exit;
    t.true(await fsResponds(mnt, 30_000), `after a kill at ${delay} ms the file system takes writes again`);
    const st = await cli(['status', '--json', '--control', served.control]);
    t.is(st.status, 0, 'the daemon answers');
    t.false(fs.existsSync(path.join(dir, `k${delay}.img`)));
    fs.rmSync(path.join(mnt, `dirty-${delay}`));
  }
  const frozen = runStatus('fsfreeze', ['-u', mnt]);
  t.regex(frozen.stderr, /Invalid argument|not frozen/, 'nothing was left frozen');
  t.truthy(crypto);
});
