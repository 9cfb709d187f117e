// The archive through the real CLI: backup of a real ext4 volume to a tar file and to a pipe,
// extraction by GNU tar and bsdtar, restore from a file and from standard input, verify, damage.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, lastJson, livesnap } from './helpers/cli';
import { testIf } from './helpers/skip';
import { run, scratchDir, seedFromEnv } from './helpers/system';
import { makeVolume } from './helpers/volumes';

const needs = testIf({ root: true, commands: ['mkfs.ext4', 'tar', 'bsdtar', 'zstd', 'losetup'] });

needs('tar backup of a live-format volume: GNU tar and bsdtar give back the exact image; restore and verify agree', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 64, mkfs: ['mkfs.ext4', '-q', '-F'], seed: seedFromEnv(t), dataMiB: 16 });
  const tarFile = path.join(dir, 'b.tar');
  const b = livesnap(['backup', vol.loop, '--to', tarFile, '--json']);
  t.is(b.status, 0, b.stderr);
  t.is(lastJson(b.stdout).filesystem, 'ext4');
  t.is(fs.statSync(tarFile).size % 10240, 0);
  // What the backup read is what the raw image path gives: compare extraction with a raw backup.
  const raw = path.join(dir, 'raw.img');
  { const rb = livesnap(['backup', vol.loop, '--to', raw]); t.is(rb.status, 0, rb.stderr); }
  for (const tool of ['tar', 'bsdtar']) {
    const out = path.join(dir, `x-${tool}`);
    fs.mkdirSync(out);
    run(tool, ['-xf', tarFile, '-C', out]);
    const img = path.join(out, 'disk.img');
    t.is(fs.statSync(img).size, 64 << 20, tool);
    t.true(fs.readFileSync(img).equals(fs.readFileSync(raw)), `${tool} extracts the exact image`);
    t.true(fs.statSync(img).blocks * 512 < (64 << 20) / 2, `${tool} keeps the holes`);
  }
  t.regex(run('tar', ['-tvf', tarFile]), /manifest\.json[\s\S]*disk\.img[\s\S]*trailer\.json/);

  const v = livesnap(['verify', tarFile, '--against', vol.loop, '--json']);
  t.is(v.status, 0, v.stderr + v.stdout);
  t.is(lastJson(v.stdout).match, true);

  const r = spawnSync(process.execPath, [BIN, 'restore', '-', '--to', path.join(dir, 'from-stdin.img')], { input: fs.readFileSync(tarFile) });
  t.is(r.status, 0, String(r.stderr));
  t.true(fs.readFileSync(path.join(dir, 'from-stdin.img')).equals(fs.readFileSync(raw)));
});

needs('archive on a pipe: exact records, zstd, and --json events on stderr', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 48, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 11, dataMiB: 8 });
  // dd with iflag=fullblock counts whole and partial records: every record must be whole.
  const out = execFileSync('sh', ['-c', `node ${BIN} backup ${vol.loop} --to - --record-size 64K --json 2>${dir}/events | dd bs=64K iflag=fullblock of=${dir}/p.tar 2>&1`], { encoding: 'utf8' });
  t.regex(out, /^(\d+)\+0 records in/m);
  t.is(JSON.parse(fs.readFileSync(path.join(dir, 'events'), 'utf8').trim().split('\n').pop()!).event, 'done');
  t.is(fs.statSync(path.join(dir, 'p.tar')).size % 65536, 0);
  const z = path.join(dir, 'b.tar.zst');
  t.is(livesnap(['backup', vol.loop, '--to', z, '--compress', 'zstd']).status, 0);
  fs.mkdirSync(path.join(dir, 'z'));
  run('tar', ['--zstd', '-xf', z, '-C', path.join(dir, 'z')]);
  fs.mkdirSync(path.join(dir, 'p'));
  run('tar', ['-xf', path.join(dir, 'p.tar'), '-C', path.join(dir, 'p')]);
  t.true(fs.readFileSync(path.join(dir, 'z/disk.img')).equals(fs.readFileSync(path.join(dir, 'p/disk.img'))));
});

needs('a damaged archive: restore names the chunk and offset and leaves nothing that looks complete', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 48, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 12, dataMiB: 8 });
  const tarFile = path.join(dir, 'b.tar');
  t.is(livesnap(['backup', vol.loop, '--to', tarFile]).status, 0);
  const buf = fs.readFileSync(tarFile);
  buf[Math.floor(buf.length / 2)] ^= 0x40; // inside disk.img's data
  fs.writeFileSync(tarFile, buf);
  const target = path.join(dir, 'r.img');
  const r = livesnap(['restore', tarFile, '--to', target]);
  t.is(r.status, 1);
  t.regex(r.stderr, /chunk \d+.*offset \d+|offset \d+.*chunk \d+/i);
  t.false(fs.existsSync(target));
  t.false(fs.existsSync(`${target}.partial`));
  const v = livesnap(['verify', tarFile]);
  t.is(v.status, 1);
  // Another tool's archive is refused with a clear message.
  fs.writeFileSync(path.join(dir, 'foo.txt'), 'hello');
  run('tar', ['-cf', path.join(dir, 'other.tar'), '-C', dir, 'foo.txt']);
  const o = livesnap(['restore', path.join(dir, 'other.tar'), '--to', path.join(dir, 'o.img')]);
  t.is(o.status, 1);
  t.regex(o.stderr, /not a livesnap archive/);
});

needs('multi-volume on one path, like a tape changer: the command moves each full volume away; restore reads them back in order', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 48, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 13, dataMiB: 12 });
  const tape = path.join(dir, 'tape.tar');
  const b = livesnap(['backup', vol.loop, '--to', tape, '--tape-size', '4M', '--next-volume-command', `mv ${tape} ${tape}.$((LIVESNAP_VOLUME-1))`]);
  t.is(b.status, 0, b.stderr);
  const vols = fs.readdirSync(dir).filter((f) => /^tape\.tar\.\d+$/.test(f)).length + 1;
  t.true(vols >= 3, `${vols} volumes`);
  fs.renameSync(tape, `${tape}.${vols}`);
  for (let i = 1; i <= vols; i++) {
    const size = fs.statSync(`${tape}.${i}`).size;
    t.is(size % 10240, 0);
    t.true(size <= 4 << 20);
  }
  // The volumes concatenated are the archive; restore asks for each next one through the command.
  const raw = path.join(dir, 'raw.img');
  { const rb = livesnap(['backup', vol.loop, '--to', raw]); t.is(rb.status, 0, rb.stderr); }
  fs.copyFileSync(`${tape}.1`, tape);
  const r = livesnap(['restore', tape, '--to', path.join(dir, 'r.img'), '--next-volume-command', `cp ${tape}.$LIVESNAP_VOLUME ${tape}`]);
  t.is(r.status, 0, r.stderr);
  t.true(fs.readFileSync(path.join(dir, 'r.img')).equals(fs.readFileSync(raw)));
});
