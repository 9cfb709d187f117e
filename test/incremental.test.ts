// Incremental backups of a served export (issue 18): the change map at the export, chains of a full
// and incrementals restored exactly at each instant under concurrent writers, a change map that
// survives kill -9, maps that cannot be trusted (the next backup is full and says why), and the
// protection map on a real ext4 through nbdfuse + loop.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { attachExport, checkSnapshot, cli, lastJsonOf, QemuIo, SelfDescribingWriters, serialIf, serveDevice, servedVolume, sh, sleep, startBackup, type Served } from './helpers/online';
import { loopDevice, mount, rng, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const test = serialIf({ root: true, commands: ['qemu-io'] });
const fsTest = serialIf({ root: true, commands: ['qemu-io', 'nbdfuse', 'losetup', 'mkfs.ext4', 'e2fsck'] });

const sha = (file: string) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

/** One backup through the CLI: its done event (the test fails with the CLI's stderr otherwise). */
async function backup(t: ExecutionContext, served: Served, args: string[]): Promise<Record<string, unknown>> {
  const r = await cli(['backup', served.name, '--control', served.control, '--json', ...args]);
  t.is(r.status, 0, `backup ${args.join(' ')}: ${r.stderr}\n${served.logTail()}`);
  return lastJsonOf(r.stdout);
}

/** Writes `len` bytes of `fill` at `off` through the export (one qemu-io connection). */
async function writeAt(t: ExecutionContext, dir: string, uri: string, off: number, len: number, fill: number): Promise<void> {
  const src = path.join(dir, `fill-${off}-${fill}.bin`);
  fs.writeFileSync(src, Buffer.alloc(len, fill));
  const q = new QemuIo(t, uri);
  await q.write(src, off, len);
  await q.quit();
}

const chainOf = (done: Record<string, unknown>) => done.chain as { id: string; parent: string | null; kind: string; fullBecause?: string; changedBlocks: number; excludedBytes: number; excludedFiles: string[] };

test('a full backup and three incrementals under concurrent writers: every restored chain is its instant, and incrementals hold only what changed', async (t) => {
  const seed = seedFromEnv(t);
  const { dir, size, vol, served } = await servedVolume(t, 'incr-chain-', 'chain', 64);
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, rng(seed), { writers: 2, maxBlocks: 8 });
  const runs: Array<{ file: string; launchedAt: number; armedAt: number; done: Record<string, unknown> }> = [];
  try {
    writers.start();
    for (let k = 0; k < 4; k++) {
      await writers.acked(60, 30_000, runs[k - 1]?.armedAt ?? -Infinity);
      const file = path.join(dir, `b${k}.tar`);
      const b = startBackup(t, [served.name, '--incremental', '--to', file, '--control', served.control]);
      const armed = await b.armed;
      const res = await b.exit;
      t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
      runs.push({ file, launchedAt: b.launchedAt, armedAt: armed.receivedAt, done: res.lines[res.lines.length - 1]! });
    }
    await sleep(100);
  } finally {
    await writers.stop();
  }
  const chains = runs.map((r) => chainOf(r.done));
  t.is(chains[0]!.kind, 'full');
  t.regex(chains[0]!.fullBecause ?? '', /first backup/);
  t.is(runs[0]!.done.bytes, size, 'the first backup holds every block (no file system: all used)');
  for (let k = 1; k < 4; k++) {
    t.is(chains[k]!.kind, 'incremental', `backup ${k} is incremental`);
    t.is(chains[k]!.parent, chains[k - 1]!.id, `backup ${k} follows backup ${k - 1}`);
    t.true(Number(runs[k]!.done.bytes) < size / 2, `incremental ${k} holds ${runs[k]!.done.bytes} bytes`);
    t.true(Number(runs[k]!.done.bytes) > 0);
  }
  for (let k = 0; k < 4; k++) {
    const out = path.join(dir, `r${k}.img`);
    const r = await cli(['restore', ...runs.slice(0, k + 1).map((x) => x.file), '--to', out, '--json']);
    t.is(r.status, 0, r.stderr);
    const check = checkSnapshot(out, size, writers.records, runs[k]!.launchedAt, runs[k]!.armedAt);
    t.deepEqual(check.problems, [], `the chain up to backup ${k} restores the volume at its instant`);
    t.true(check.fromWrites > 0);
    fs.rmSync(out);
  }
  t.log(`seed ${seed}: ${writers.records.length} writes; backups hold ${runs.map((r) => r.done.bytes).join(', ')} bytes`);
  const v = await cli(['verify', ...runs.map((x) => x.file), '--json']);
  t.is(v.status, 0, v.stderr);
  t.is(lastJsonOf(v.stdout).match, true);
  // A gap and a wrong order are refused before anything is written.
  const gap = await cli(['restore', runs[0]!.file, runs[2]!.file, '--to', path.join(dir, 'gap.img')]);
  t.is(gap.status, 1);
  t.regex(gap.stderr, /follows .* not .*b0\.tar/);
  t.false(fs.existsSync(path.join(dir, 'gap.img')) || fs.existsSync(path.join(dir, 'gap.img.partial')));
  const alone = await cli(['restore', runs[1]!.file, '--to', path.join(dir, 'alone.img')]);
  t.is(alone.status, 1);
  t.regex(alone.stderr, /is an incremental backup .*restore the chain/s);
  t.false(fs.existsSync(path.join(dir, 'alone.img')));
  const wrongFirst = await cli(['restore', runs[1]!.file, runs[2]!.file, '--to', path.join(dir, 'w.img')]);
  t.is(wrongFirst.status, 1);
  t.regex(wrongFirst.stderr, /is an incremental backup .*a chain starts with a full backup/);
});

test('kill -9 of the daemon between backups: the change map still holds every acknowledged write, the next incremental stays small and the chain is exact', async (t) => {
  // Intents live 1 s after their region's last write here (30 s by default), so the test need not wait long.
  const shortIntents = { LIVESNAP_CHANGE_INTENT_IDLE_MS: '1000' };
  const v = await servedVolume(t, 'incr-kill-', 'kill', 32, [], shortIntents);
  const { dir, size, vol } = v;
  let served = v.served;
  await writeAt(t, dir, served.uri, 0, 4 * MiB, 0x11);
  const full = await backup(t, served, ['--incremental', '--to', path.join(dir, 'full.tar')]);
  t.is(chainOf(full).kind, 'full');
  // Ten 4 KiB writes in ten separate 64 KiB regions (one crosses a region boundary), then kill -9.
  const offs = [5 * MiB, 7 * MiB + 4096, 9 * MiB, 11 * MiB, 13 * MiB, 15 * MiB, 17 * MiB, 19 * MiB, 21 * MiB, 32 * MiB - 4096];
  for (const [i, o] of offs.entries()) await writeAt(t, dir, served.uri, o, 4096, 0x40 + i);
  await writeAt(t, dir, served.uri, 3 * MiB - 2048, 4096, 0x77);
  await sleep(3000); // the fine map written out (every second), the 4 MiB intents cleared
  process.kill(served.pid, 'SIGKILL');
  await sleep(200);
  served = await serveDevice(t, dir, vol, 'kill', [], shortIntents);
  const inc = await backup(t, served, ['--incremental', '--to', path.join(dir, 'inc.tar')]);
  const c = chainOf(inc);
  t.is(c.kind, 'incremental', `after kill -9 the backup is still incremental (${c.fullBecause ?? ''})`);
  t.is(c.parent, chainOf(full).id);
  // 11 writes, the last across a 64 KiB boundary: 12 regions of 16 blocks at most.
  t.true(Number(inc.bytes) <= 12 * 64 * 1024, `the incremental holds ${inc.bytes} bytes`);
  t.true(Number(inc.bytes) >= 11 * 4096);
  const out = path.join(dir, 'r.img');
  const r = await cli(['restore', path.join(dir, 'full.tar'), path.join(dir, 'inc.tar'), '--to', out, '--json']);
  t.is(r.status, 0, r.stderr);
  t.is(sha(out), sha(vol), 'full + incremental is the volume byte for byte');
  // Killed right after writes: the intents on disk make the next incremental a superset, still exact.
  await writeAt(t, dir, served.uri, 6 * MiB, 4096, 0x78);
  await writeAt(t, dir, served.uri, 30 * MiB, 8192, 0x79);
  process.kill(served.pid, 'SIGKILL');
  await sleep(200);
  served = await serveDevice(t, dir, vol, 'kill', [], shortIntents);
  const inc2 = await backup(t, served, ['--incremental', '--to', path.join(dir, 'inc2.tar')]);
  t.is(chainOf(inc2).kind, 'incremental');
  t.true(Number(inc2.bytes) <= 8 * MiB, `two 4 MiB intent regions at most: ${inc2.bytes} bytes`);
  fs.rmSync(out);
  const r2 = await cli(['restore', ...['full.tar', 'inc.tar', 'inc2.tar'].map((f) => path.join(dir, f)), '--to', out, '--json']);
  t.is(r2.status, 0, r2.stderr);
  t.is(sha(out), sha(vol), 'the chain of three is the volume byte for byte');
});

test('a change map that cannot be trusted is never used: truncated, the device written while not served, another device: the next backup is full and says why', async (t) => {
  const dir = scratchDir(t, 'incr-trust-');
  const size = 16 * MiB;
  const vol = sparseFile(path.join(dir, 'vol.raw'), size);
  const state = path.join(dir, 'state');
  const serve = () => serveDevice(t, dir, vol, 'trust', ['--state', state]);
  const stop = async (s: Served) => { const r = await cli(['stop', '--control', s.control]); t.is(r.status, 0, r.stderr); await sleep(300); };
  let served = await serve();
  await writeAt(t, dir, served.uri, 0, MiB, 0x21);
  t.is(chainOf(await backup(t, served, ['--incremental', '--to', path.join(dir, 'a.tar')])).kind, 'full');
  await writeAt(t, dir, served.uri, 2 * MiB, 4096, 0x22);
  // A clean stop and serve: still incremental (the control case of the three below).
  await stop(served);
  served = await serve();
  const ok = chainOf(await backup(t, served, ['--incremental', '--to', path.join(dir, 'b.tar')]));
  t.is(ok.kind, 'incremental', ok.fullBecause);

  // 1. Truncated.
  await stop(served);
  const map = path.join(state, 'changes.map');
  fs.truncateSync(map, 6000);
  served = await serve();
  let c = chainOf(await backup(t, served, ['--incremental', '--to', path.join(dir, 'c.tar')]));
  t.is(c.kind, 'full');
  t.regex(c.fullBecause ?? '', /truncated/);

  // 2. Written while no daemon served it (a clean stop, then a write straight into the file).
  await stop(served);
  const fd = fs.openSync(vol, 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 8 * MiB);
  fs.closeSync(fd);
  served = await serve();
  c = chainOf(await backup(t, served, ['--incremental', '--to', path.join(dir, 'd.tar')]));
  t.is(c.kind, 'full');
  t.regex(c.fullBecause ?? '', /written while no livesnap daemon served it/);
  const out = path.join(dir, 'd.img');
  t.is((await cli(['restore', path.join(dir, 'd.tar'), '--to', out])).status, 0);
  t.is(sha(out), sha(vol), 'the full backup after it holds that write');

  // 3. Another device: the old volume gone, another one served with its state directory.
  await stop(served);
  const vol2 = sparseFile(path.join(dir, 'vol2.raw'), size);
  fs.rmSync(vol);
  served = await serveDevice(t, dir, vol2, 'trust', ['--state', state]);
  c = chainOf(await backup(t, served, ['--incremental', '--to', path.join(dir, 'e.tar')]));
  t.is(c.kind, 'full');
  t.regex(c.fullBecause ?? '', /belongs to another device/);
  // 4. Torn: both header copies overwritten.
  await stop(served);
  served = await serveDevice(t, dir, vol2, 'trust', ['--state', state]);
  t.is(chainOf(await backup(t, served, ['--incremental', '--to', path.join(dir, 'e2.tar')])).kind, 'incremental');
  await stop(served);
  const f2 = fs.openSync(map, 'r+');
  fs.writeSync(f2, Buffer.alloc(8192, 0x33), 0, 8192, 0);
  fs.closeSync(f2);
  served = await serveDevice(t, dir, vol2, 'trust', ['--state', state]);
  c = chainOf(await backup(t, served, ['--incremental', '--to', path.join(dir, 'f.tar')]));
  t.is(c.kind, 'full');
  t.regex(c.fullBecause ?? '', /torn or overwritten/);
});

test('a failed backup merges its epoch back: nothing it would have held is lost to the next incremental', async (t) => {
  const { dir, size, vol, served } = await servedVolume(t, 'incr-fail-', 'merge', 16);
  const full = await backup(t, served, ['--incremental', '--to', path.join(dir, 'full.tar')]);
  await writeAt(t, dir, served.uri, 4 * MiB, 64 * 1024, 0x61);
  // A backup that fails: its target's directory does not exist.
  const bad = await cli(['backup', served.name, '--incremental', '--to', path.join(dir, 'nowhere', 'x.tar'), '--control', served.control]);
  t.not(bad.status, 0);
  await writeAt(t, dir, served.uri, 9 * MiB, 4096, 0x62);
  const inc = await backup(t, served, ['--incremental', '--to', path.join(dir, 'inc.tar')]);
  t.is(chainOf(inc).parent, chainOf(full).id);
  const out = path.join(dir, 'r.img');
  t.is((await cli(['restore', path.join(dir, 'full.tar'), path.join(dir, 'inc.tar'), '--to', out])).status, 0);
  t.is(sha(out), sha(vol));
});

fsTest('excluded files are zeros after the restore, every other file is exact (ext4 through nbdfuse + loop), full and incremental; an excluded file renamed to a wanted name is exact in the next', async (t) => {
  const { dir, size, vol, served } = await servedVolume(t, 'incr-exclude-', 'excl', 128);
  const stack = await attachExport(t, dir, served, { mount: true, mkfs: ['mkfs.ext4', '-q', '-F', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0'] });
  const mnt = stack.mnt!;
  await sh(`mkdir -p ${mnt}/data ${mnt}/tmp ${mnt}/cache && for i in 1 2 3 4; do head -c 3000000 /dev/urandom > ${mnt}/data/f$i; head -c 2000000 /dev/urandom > ${mnt}/tmp/t$i; done; head -c 1000000 /dev/urandom > ${mnt}/cache/x.cache; dd if=/dev/zero of=${mnt}/swapfile bs=1M count=8 status=none; chmod 600 ${mnt}/swapfile; mkswap ${mnt}/swapfile >/dev/null; sync`);
  const sums = async () => Object.fromEntries((await sh(`cd ${mnt} && find data -type f | sort | xargs sha256sum`)).trim().split('\n').map((l) => l.split(/\s+/).reverse()));
  const full = await backup(t, served, ['--incremental', '--freeze', mnt, '--exclude', 'tmp/**', '--exclude', '*.cache', '--to', path.join(dir, 'full.tar')]);
  const c = chainOf(full);
  t.deepEqual(c.excludedFiles.sort(), ['cache/x.cache', 'swapfile', 'tmp/t1', 'tmp/t2', 'tmp/t3', 'tmp/t4']);
  t.true(c.excludedBytes >= 8 * MiB + 8_000_000 && c.excludedBytes <= 8 * MiB + 9 * MiB, `excluded ${c.excludedBytes} bytes`);
  const want0 = await sums();
  // Change some files, grow an excluded one, then an incremental.
  await sh(`head -c 500000 /dev/urandom > ${mnt}/data/f5 && dd if=/dev/urandom of=${mnt}/data/f2 bs=4096 count=10 seek=20 conv=notrunc status=none && head -c 1000000 /dev/urandom >> ${mnt}/tmp/t1 && mv ${mnt}/tmp/t2 ${mnt}/data/renamed && sync`);
  const inc = await backup(t, served, ['--incremental', '--freeze', mnt, '--exclude', 'tmp/**', '--exclude', '*.cache', '--to', path.join(dir, 'inc.tar')]);
  t.is(chainOf(inc).kind, 'incremental');
  t.true(Number(inc.bytes) < 4 * MiB, `the incremental holds ${inc.bytes} bytes`);
  const want1 = await sums();
  for (const [k, files, want] of [[0, ['full.tar'], want0], [1, ['full.tar', 'inc.tar'], want1]] as const) {
    const img = path.join(dir, `r${k}.img`);
    const r = await cli(['restore', ...files.map((f) => path.join(dir, f)), '--to', img]);
    t.is(r.status, 0, r.stderr);
    t.is(runStatus('e2fsck', ['-fn', img]).status, 0, `e2fsck of restore ${k}`);
    const loop = loopDevice(t, img, { readOnly: true });
    const m = mount(t, loop, path.join(dir, `m${k}`), ['ro']);
    const got = Object.fromEntries((await sh(`cd ${m} && find data -type f | sort | xargs sha256sum`)).trim().split('\n').map((l) => l.split(/\s+/).reverse()));
    t.deepEqual(got, want, `restore ${k}: every wanted file is exact`);
    for (const f of ['tmp/t1', 'tmp/t3', 'cache/x.cache', 'swapfile']) {
      const nonZero = (await sh(`tr -d '\\000' < ${m}/${f} | head -c 1 | wc -c`)).trim();
      t.is(nonZero, '0', `restore ${k}: ${f} reads as zeros`);
    }
    runStatus('umount', [m]);
  }
});

test('--to replica:PATH under concurrent writers: the first run is full, later ones send only the changes, the replica is the volume at each instant and names its snapshot', async (t) => {
  const seed = seedFromEnv(t);
  const { dir, size, vol, served } = await servedVolume(t, 'incr-replica-', 'repl', 32);
  const replica = path.join(dir, 'data.replica');
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, rng(seed), { writers: 2, maxBlocks: 4, region: [4 * MiB, 12 * MiB] });
  writers.start();
  try {
    let after = -Infinity;
    for (let k = 0; k < 3; k++) {
      await writers.acked(40, 30_000, after);
      const b = startBackup(t, [served.name, '--to', `replica:${replica}`, '--control', served.control]);
      const armed = await b.armed;
      const res = await b.exit;
      after = armed.receivedAt;
      t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
      const done = res.lines[res.lines.length - 1]!;
      const c = chainOf(done);
      t.is(c.kind, k === 0 ? 'full' : 'incremental', `run ${k}: ${c.fullBecause ?? ''}`);
      if (k > 0) t.true(Number(done.bytes) <= 8 * MiB, `run ${k} sent ${done.bytes} bytes (the writers write 8 MiB of the 32)`);
      // The writers go on: the replica must be the instant of this run (checked before the next).
      const check = checkSnapshot(replica, size, writers.records, b.launchedAt, armed.receivedAt);
      t.deepEqual(check.problems, [], `the replica is the volume at run ${k}'s instant`);
      const st = await cli(['replica', 'status', replica, '--json']);
      t.is(st.status, 0, st.stderr);
      const j = lastJsonOf(st.stdout);
      t.is(j.state, 'consistent');
      t.is(j.snapshotId, c.id);
      t.false(fs.existsSync(`${replica}.livesnap-journal`), 'the journal is gone once applied');
    }
  } finally {
    await writers.stop();
  }
  // Not a replica target's options.
  const bad = await cli(['backup', served.name, '--to', `replica:${replica}`, '--compress', 'zstd', '--control', served.control]);
  t.is(bad.status, 1);
  t.regex(bad.stderr, /--compress does not go with --to replica:PATH/);
});

test('--method hold --incremental: the chain is exact too (the hold queue is below the change tracking)', async (t) => {
  const { dir, size, vol, served } = await servedVolume(t, 'incr-hold-', 'hinc', 16);
  await writeAt(t, dir, served.uri, 0, 2 * MiB, 0x41);
  const full = await backup(t, served, ['--method', 'hold', '--incremental', '--to', path.join(dir, 'full.tar')]);
  await writeAt(t, dir, served.uri, 6 * MiB, 8192, 0x42);
  const inc = await backup(t, served, ['--method', 'hold', '--incremental', '--to', path.join(dir, 'inc.tar')]);
  t.is(chainOf(inc).kind, 'incremental');
  t.is(chainOf(inc).parent, chainOf(full).id);
  t.true(Number(inc.bytes) <= 64 * 1024, `${inc.bytes} bytes`);
  const out = path.join(dir, 'r.img');
  t.is((await cli(['restore', path.join(dir, 'full.tar'), path.join(dir, 'inc.tar'), '--to', out])).status, 0);
  t.is(sha(out), sha(vol));
});
