// Offline and freeze backups through the real CLI, on real loop devices and real file systems.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, lastJson, livesnap } from './helpers/cli';
import test from 'ava';
import { testIf } from './helpers/skip';
import { loopDevice, mount, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';
import { checksumsOfImage, makeVolume } from './helpers/volumes';

const rootTest = testIf({ root: true, commands: ['mkfs.ext4', 'e2fsck', 'losetup'] });
const serialRoot = testIf({ root: true, commands: ['mkfs.ext4', 'losetup', 'fsfreeze'] }, { serial: true });

rootTest('backup of an unmounted ext4 volume: sparse image, fsck clean, every file intact, verify and restore agree', async (t) => {
  const dir = scratchDir(t);
  const seed = seedFromEnv(t);
  const vol = makeVolume(t, dir, { sizeMiB: 96, mkfs: ['mkfs.ext4', '-q', '-F'], seed, dataMiB: 40 });
  const img = path.join(dir, 'backup.img');

  const b = livesnap(['backup', vol.loop, '--to', img, '--json']);
  t.is(b.status, 0, b.stderr);
  const done = lastJson(b.stdout);
  t.is(done.event, 'done');
  t.is(done.filesystem, 'ext4');
  t.is(done.badBlockCount, 0);
  t.is(fs.statSync(img).size, 96 << 20);
  t.false(fs.existsSync(`${img}.partial`));
  // Sparse: allocated space is about the used blocks, far below the volume size.
  const allocated = fs.statSync(img).blocks * 512;
  t.true(allocated < (96 << 20) * 0.75, `image allocates ${allocated} bytes`);
  // (Used blocks that hold only zeros, e.g. unused inode tables, stay holes too: no lower bound here;
  // the content is proven below by e2fsck, the checksums and verify.)

  t.is(runStatus('e2fsck', ['-fn', img]).status, 0);
  t.deepEqual(checksumsOfImage(t, img, path.join(dir, 'check')), vol.checksums);

  const v = livesnap(['verify', img, '--against', vol.loop, '--json']);
  t.is(v.status, 0, v.stdout + v.stderr);
  t.is(lastJson(v.stdout).differingBlocks, 0);

  // Restore onto another device of the same size, then the restored device verifies and mounts.
  const other = loopDevice(t, sparseFile(path.join(dir, 'other.img'), 96 << 20));
  const r = livesnap(['restore', img, '--to', other, '--json']);
  t.is(r.status, 0, r.stderr);
  t.is(livesnap(['verify', img, '--against', other]).status, 0);
  t.is(runStatus('e2fsck', ['-fn', other]).status, 0);
  t.deepEqual(checksumsOfImage(t, path.join(dir, 'other.img'), path.join(dir, 'check2')), vol.checksums);
});

rootTest('verify reports the first differing block and the count', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 64, mkfs: ['mkfs.ext4', '-q', '-F', '-b', '4096'], seed: 7, dataMiB: 8 });
  const img = path.join(dir, 'b.img');
  t.is(livesnap(['backup', vol.loop, '--to', img]).status, 0);
  // Change two used blocks of the image (inside the inode table region, which is always used).
  const insp = lastJson(livesnap(['inspect', img, '--json']).stdout);
  t.is(insp.filesystem, 'ext4');
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, Buffer.alloc(16, 0xee), 0, 16, 1 * 4096 + 100); // block 1: group descriptors
  fs.writeSync(fd, Buffer.alloc(16, 0xee), 0, 16, 3 * 4096 + 7);
  fs.closeSync(fd);
  const v = livesnap(['verify', img, '--against', vol.loop, '--json']);
  t.is(v.status, 1);
  const res = lastJson(v.stdout);
  t.is(res.match, false);
  t.is(res.firstDifferingBlock, 1);
  t.true((res.differingBlocks as number) >= 2);
});

rootTest('--method freeze backs up a mounted file system while a writer keeps writing, and reports the freeze window', async (t) => {
  const dir = scratchDir(t);
  const seed = seedFromEnv(t);
  const vol = makeVolume(t, dir, { sizeMiB: 128, mkfs: ['mkfs.ext4', '-q', '-F'], seed, dataMiB: 30, keepMounted: true });
  const img = path.join(dir, 'frozen.img');
  // A writer in another process appends to a file the whole time; it waits while frozen.
  const writer = require('node:child_process').spawn('sh', ['-c', `i=0; while [ $i -lt 100000 ]; do echo "line $i" >> ${vol.mnt}/log.txt; i=$((i+1)); done`]);
  t.teardown(() => writer.kill('SIGKILL'));
  await new Promise((r) => setTimeout(r, 200));
  const b = livesnap(['backup', vol.loop, '--method', 'freeze', '--mount', vol.mnt!, '--to', img, '--json']);
  t.is(b.status, 0, b.stderr);
  const done = lastJson(b.stdout);
  t.is(typeof done.freezeMs, 'number');
  t.true((done.freezeMs as number) > 0);
  // Thawed afterwards: writes go through again.
  fs.writeFileSync(path.join(vol.mnt!, 'after.txt'), 'thawed');
  writer.kill('SIGKILL');
  t.is(runStatus('e2fsck', ['-fn', img]).status, 0);
  const sums = checksumsOfImage(t, img, path.join(dir, 'check'));
  for (const [f, h] of vol.checksums) t.is(sums.get(f), h, f);
  // The log file in the image is a prefix of whole lines (one instant, never a torn write).
  const log = run('debugfs', ['-R', 'cat /log.txt', img]);
  const lines = log.split('\n');
  t.is(lines.pop(), '', 'the log ends with a whole line');
  t.true(lines.length >= 1, 'the writer had appended before the backup');
  const bad = lines.findIndex((l, i) => l !== `line ${i}`);
  t.is(bad, -1, `line ${bad} of the frozen log is ${JSON.stringify(lines[bad])}`);
});

serialRoot('--method freeze: SIGTERM or SIGINT during the frozen copy thaws at once (the CLI owns the signals) and ends with 143 / 130', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 128, mkfs: ['mkfs.ext4', '-q', '-F'], seed: seedFromEnv(t), dataMiB: 60, keepMounted: true });
  for (const [sig, code] of [['SIGTERM', 143], ['SIGINT', 130]] as const) {
    const img = path.join(dir, `${sig}.img`);
    const cp = require('node:child_process') as typeof import('node:child_process');
    // --max-rate keeps the copy (and the freeze) going long enough to be interrupted in it.
    const p = cp.spawn(process.execPath, [BIN, 'backup', vol.loop, '--method', 'freeze', '--mount', vol.mnt!, '--to', img, '--max-rate', '2M', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const closed = new Promise<number | null>((r) => p.once('close', r));
    t.teardown(() => { p.kill('SIGKILL'); });
    let out = '', err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    const deadline = Date.now() + 20_000;
    while (!/"event":"progress"/.test(out) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    t.regex(out, /"event":"progress"/, 'the copy started');
    p.kill(sig);
    const status = await closed;
    t.is(status, code, err);
    // Should the CLI have died frozen, thaw by hand so the test fails instead of hanging.
    if (status !== code) runStatus('fsfreeze', ['-u', vol.mnt!]);
    t.true(err.includes(`${sig}: ${vol.mnt} thawed, backup cancelled`), err);
    // Thawed: a write and its fsync return at once.
    const t0 = Date.now();
    const fd = fs.openSync(path.join(vol.mnt!, `after-${sig}.txt`), 'w');
    fs.writeSync(fd, 'thawed');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    t.true(Date.now() - t0 < 5000, 'the file system is not frozen');
    t.false(fs.existsSync(img), 'no image under the final name');
  }
});

rootTest('offline backup refuses a volume mounted read-write and names the freeze method', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 32, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 3, dataMiB: 2, keepMounted: true });
  const r = livesnap(['backup', vol.loop, '--to', path.join(dir, 'x.img')]);
  t.is(r.status, 1);
  t.regex(r.stderr, /is mounted read-write at .*--method freeze/s);
  t.false(fs.existsSync(path.join(dir, 'x.img')));
  t.false(fs.existsSync(path.join(dir, 'x.img.partial')));
});

rootTest('freeze needs a real mount point of the source', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 32, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 4, dataMiB: 1, keepMounted: true });
  const notMp = path.join(dir, 'plain-dir');
  fs.mkdirSync(notMp);
  const r = livesnap(['backup', vol.loop, '--method', 'freeze', '--mount', notMp, '--to', path.join(dir, 'y.img')]);
  t.is(r.status, 1);
  t.regex(r.stderr, /is not a mount point/);
  const r2 = livesnap(['backup', vol.loop, '--method', 'freeze', '--to', path.join(dir, 'y.img')]);
  t.is(r2.status, 1);
  t.regex(r2.stderr, /--method freeze needs --mount/);
  // The file system was never frozen: a write succeeds at once.
  fs.writeFileSync(path.join(vol.mnt!, 'ok'), 'ok');
});

rootTest('bad input: missing path, directory, tiny device, target on source, existing target', async (t) => {
  const dir = scratchDir(t);
  let r = livesnap(['backup', '/dev/does-not-exist', '--to', path.join(dir, 'a.img')]);
  t.is(r.status, 1);
  t.regex(r.stderr, /no such file or device/);
  r = livesnap(['backup', dir, '--to', path.join(dir, 'a.img')]);
  t.is(r.status, 1);
  t.regex(r.stderr, /is a directory/);
  const tiny = sparseFile(path.join(dir, 'tiny.img'), 1024);
  r = livesnap(['backup', tiny, '--to', path.join(dir, 'a.img')]);
  t.is(r.status, 1);
  t.regex(r.stderr, /too small/);

  const vol = makeVolume(t, dir, { sizeMiB: 32, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 5, dataMiB: 1 });
  r = livesnap(['backup', vol.loop, '--to', vol.loop]);
  t.is(r.status, 1);
  t.regex(r.stderr, /is the source device itself/);
  r = livesnap(['backup', vol.file, '--to', vol.file, '--force']);
  t.is(r.status, 1);
  t.regex(r.stderr, /is the source file itself/);
  // A target inside the source's own (read-only mounted) file system.
  const ro = mount(t, vol.loop, path.join(dir, 'ro'), ['ro']);
  r = livesnap(['backup', vol.loop, '--to', path.join(ro, 'inside.img')]);
  t.is(r.status, 1);
  t.regex(r.stderr, /lives on the source/);
  run('umount', [ro]);

  const existing = path.join(dir, 'exists.img');
  fs.writeFileSync(existing, 'precious');
  r = livesnap(['backup', vol.loop, '--to', existing]);
  t.is(r.status, 1);
  t.regex(r.stderr, /already exists.*--force/s);
  t.is(fs.readFileSync(existing, 'utf8'), 'precious');
  t.is(livesnap(['backup', vol.loop, '--to', existing, '--force']).status, 0);
});

rootTest('no space left on the target: clear error, the partial image removed, the source untouched', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 96, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 6, dataMiB: 40 });
  const before = require('node:crypto').createHash('sha256').update(fs.readFileSync(vol.file)).digest('hex');
  // A small real file system as the target: 16 MiB cannot hold ~40 MiB of used blocks.
  const small = loopDevice(t, sparseFile(path.join(dir, 'small.img'), 16 << 20));
  run('mkfs.ext4', ['-q', '-F', small]);
  const mnt = mount(t, small, path.join(dir, 'small'));
  const r = livesnap(['backup', vol.loop, '--to', path.join(mnt, 'b.img')]);
  t.is(r.status, 1);
  t.regex(r.stderr, /no space left/);
  t.deepEqual(fs.readdirSync(mnt).filter((f) => f !== 'lost+found'), []);
  const after = require('node:crypto').createHash('sha256').update(fs.readFileSync(vol.file)).digest('hex');
  t.is(after, before);
});

rootTest('corrupt superblock: falls back to every block and says why', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 32, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 8, dataMiB: 2 });
  // s_log_block_size (superblock offset 24) = 40: an impossible block size.
  const fd = fs.openSync(vol.file, 'r+');
  const b = Buffer.alloc(4);
  b.writeUInt32LE(40);
  fs.writeSync(fd, b, 0, 4, 1024 + 24);
  fs.closeSync(fd);
  const i = livesnap(['inspect', vol.loop, '--json']);
  t.is(i.status, 0, i.stderr);
  const res = lastJson(i.stdout);
  t.is(res.allBlocks, true);
  t.is(res.usedBlocks, res.totalBlocks);
  t.regex(String(res.notes), /cannot be trusted.*every block/);
  const img = path.join(dir, 'all.img');
  const bk = livesnap(['backup', vol.loop, '--to', img]);
  t.is(bk.status, 0);
  t.regex(bk.stderr, /every block is copied/);
  t.true(fs.readFileSync(img).equals(fs.readFileSync(vol.file)));
});

rootTest('restore refuses a mounted target, a too-small device, and an image that lives on the target', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 48, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 9, dataMiB: 2 });
  const img = path.join(dir, 'b.img');
  t.is(livesnap(['backup', vol.loop, '--to', img]).status, 0);
  const small = loopDevice(t, sparseFile(path.join(dir, 'small.img'), 16 << 20));
  let r = livesnap(['restore', img, '--to', small]);
  t.is(r.status, 1);
  t.regex(r.stderr, /too small/);
  mount(t, vol.loop, path.join(dir, 'm'));
  r = livesnap(['restore', img, '--to', vol.loop]);
  t.is(r.status, 1);
  t.regex(r.stderr, /in use|mounted/);
  const inside = path.join(dir, 'm', 'b.img');
  run('cp', ['--sparse=always', img, inside]);
  r = livesnap(['restore', inside, '--to', vol.loop]);
  t.is(r.status, 1);
  t.regex(r.stderr, /lives on the target/);
});

rootTest('an unknown file system is copied whole, and said so', async (t) => {
  const dir = scratchDir(t);
  const file = path.join(dir, 'raw.img');
  const data = Buffer.alloc(8 << 20);
  for (let i = 0; i < data.length; i += 512) data.writeUInt32LE(i + 1, i);
  data.fill(0, 1 << 20, 7 << 20); // 6 MiB never written: stays a hole in the image
  fs.writeFileSync(file, data);
  const img = path.join(dir, 'copy.img');
  const r = livesnap(['backup', file, '--to', img, '--json']);
  t.is(r.status, 0, r.stderr);
  t.is(lastJson(r.stdout).filesystem, 'unknown');
  t.true(fs.readFileSync(img).equals(data));
  t.true(fs.statSync(img).blocks * 512 <= (2 << 20) + 65536, `zeros stay holes (${fs.statSync(img).blocks * 512} bytes allocated)`);
});


test('--max-rate paces the copy', async (t) => {
  const dir = scratchDir(t);
  const file = path.join(dir, 'raw.img');
  const data = Buffer.alloc(24 << 20, 0x5a);
  fs.writeFileSync(file, data);
  const t0 = Date.now();
  const r = livesnap(['backup', file, '--to', path.join(dir, 'c.img'), '--max-rate', '16M']);
  const ms = Date.now() - t0;
  t.is(r.status, 0, r.stderr);
  // 24 MiB at 16 MiB/s cannot take less than 1.5 s (a lower bound only: a slow machine passes).
  t.true(ms >= 1400, `took ${ms} ms`);
  t.true(fs.readFileSync(path.join(dir, 'c.img')).equals(data));
});
