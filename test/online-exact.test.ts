// Online backup, end to end, checked sector by sector: a daemon serves a raw volume, several real
// NBD clients (one qemu-io process = one connection each) write self-describing data before, while
// and after the snapshot is armed, and the image must be the volume at the instant of arming.
// Also: a tiny container under heavy writes, "--to /dev/other", and kill -9 of the daemon mid-backup.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { checkFinal, checkSnapshot, SelfDescribingWriters, serveDevice, sleep, startBackup } from './helpers/online';
import { serialIf as testIf } from './helpers/online';
import { AUTO_LADDER } from '../src/snapshot/auto-pace';
import { loopDevice, rng, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const needs = { root: true, commands: ['qemu-io'] };

interface ExactnessCase {
  volumeMiB: number;
  container: string;
  writers: number;
  maxBlocks: number;
  /** Write to a loop device instead of an image file (restore on the fly, claim 43). */
  toDevice?: boolean;
  /** serve --cache (default none: O_DIRECT). */
  cache?: 'none' | 'writeback';
  /** The daemon's I/O without the io_uring ring: libuv's pool and batches (LIVESNAP_IO_ENGINE=threadpool). */
  threadpool?: boolean;
  /** backup --writer-priority (default: not given, i.e. auto). */
  writerPriority?: 'auto' | 'high' | 'normal' | 'low';
}

async function exactness(t: ExecutionContext, c: ExactnessCase): Promise<Record<string, unknown>> {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const dir = scratchDir(t, 'online-exact-');
  const size = c.volumeMiB * MiB;
  const vol = sparseFile(path.join(dir, 'vol.raw'), size);
  const served = await serveDevice(t, dir, vol, 'exact', c.cache ? ['--cache', c.cache] : [], c.threadpool ? { LIVESNAP_IO_ENGINE: 'threadpool' } : undefined);
  if (c.cache) t.is((await served.status()).exports[0]?.cache, c.cache);
  t.is((await served.status()).io, c.threadpool ? 'threadpool' : 'io_uring ring');
  const target = c.toDevice ? loopDevice(t, sparseFile(path.join(dir, 'target.raw'), size)) : path.join(dir, 'backup.img');
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, r, { writers: c.writers, maxBlocks: c.maxBlocks });
  try {
    writers.start();
    await writers.acked(200 * c.writers);
    const backup = startBackup(t, [served.name, '--to', target, '--container', c.container, '--control', served.control,
      ...(c.writerPriority ? ['--writer-priority', c.writerPriority] : [])]);
    const armed = await backup.armed;
    const res = await backup.exit;
    // A little more after the end: writes to copied blocks and after disarm.
    await sleep(150);
    const codes = await writers.stop();
    t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
    t.deepEqual(codes, codes.map(() => 0), 'every qemu-io writer exits 0');
    const failed = writers.records.filter((w) => w.failed);
    t.deepEqual(failed.map((w) => `#${w.seq}: ${w.failed}`), [], 'no write failed');
    const done = res.lines[res.lines.length - 1]!;
    t.is(done.event, 'done');
    t.is(done.bytes, size);
    t.is(done.badBlockCount, 0);
    t.is(done.writerPriority, c.writerPriority ?? 'auto');
    if ((c.writerPriority ?? 'auto') === 'auto') {
      const ap = done.autoPace as { level: number; stepsUp: number; stepsDown: number } | undefined;
      t.truthy(ap, 'the done event says how auto paced the copier');
      t.true(ap!.level >= 0 && ap!.level < AUTO_LADDER.length);
    } else {
      t.is(done.autoPace, undefined);
    }
    t.is((await served.status()).jobs.find((j) => j.id === armed.event.job)?.writerPriority, c.writerPriority ?? 'auto', 'status shows the job\'s writer priority');

    const check = checkSnapshot(target, size, writers.records, backup.launchedAt, armed.receivedAt);
    const during = writers.records.filter((w) => w.start > armed.receivedAt && w.ack !== undefined && w.ack < armed.receivedAt + Number(done.durationMs)).length;
    t.log(`${writers.records.length} writes from ${c.writers} connections: ${check.inWrites} before the backup, ${check.outWrites} after arming (${during} while copying), ${check.ambiguousWrites} in between; ` +
      `image: ${check.fromWrites} blocks from writes, ${check.zeros} zero blocks; backup ${Number(done.durationMs).toFixed(0)} ms, freeze ${Number(armed.event.freezeMs).toFixed(2)} ms, ` +
      `worst write delay ${Number(done.worstWriteDelayMs).toFixed(1)} ms, ${done.writesDelayed} writes delayed, ${done.blocksSavedByWriters} originals saved, container peak ${done.containerPeakBytes} of ${done.containerCapacityBytes} bytes`);
    t.deepEqual(check.problems, [], 'the image is the volume at the instant of arming');
    t.true(check.inWrites > 0 && check.outWrites > 0, 'writes happened both before and after arming');
    t.true(Number(done.writesDelayed) > 0, 'some writes went through copy-before-write');

    // The live volume lost nothing either: every block holds its last acknowledged write.
    const live = checkFinal(vol, writers.records);
    t.deepEqual(live.problems, [], 'the live volume holds every acknowledged write');
    return done;
  } finally {
    writers.abandon();
    if (t.passed === false) t.log(served.logTail());
  }
}

testIf(needs)('snapshot exactness under concurrency: 4 NBD connections writing self-describing sectors before, during and after arming', async (t) => {
  await exactness(t, { volumeMiB: 1024, container: 'memory:4M', writers: 4, maxBlocks: 16 });
});

testIf(needs)('snapshot exactness with serve --cache writeback: writes through the page cache, the backup reads with O_DIRECT, still the instant', async (t) => {
  await exactness(t, { volumeMiB: 1024, container: 'memory:4M', writers: 4, maxBlocks: 16, cache: 'writeback' });
});

testIf(needs)('snapshot exactness with the thread-pool I/O engine (no io_uring ring): the fallback path serves and backs up the instant', async (t) => {
  await exactness(t, { volumeMiB: 512, container: 'memory:2M', writers: 3, maxBlocks: 16, threadpool: true });
});

// The copier's pace while clients write changes how the work is cut up and ordered (one 64 KiB
// batch at a time, or four of 4 MiB), never what the image holds.
testIf(needs)('snapshot exactness with --writer-priority high and low: the copier\'s pace under writers does not change the instant', async (t) => {
  await exactness(t, { volumeMiB: 512, container: 'memory:2M', writers: 3, maxBlocks: 16, writerPriority: 'high' });
  await exactness(t, { volumeMiB: 512, container: 'memory:2M', writers: 3, maxBlocks: 16, writerPriority: 'low' });
});

testIf(needs)('container full: a 256 KiB container under heavy writes from 6 connections; the backup completes exact, no write fails', async (t) => {
  const done = await exactness(t, { volumeMiB: 512, container: 'memory:256K', writers: 6, maxBlocks: 64 });
  t.is(done.containerCapacityBytes, 256 * 1024);
  t.true(Number(done.containerPeakBytes) <= 256 * 1024);
  t.is(typeof done.worstWriteDelayMs, 'number');
  t.log(`worstWriteDelayMs ${Number(done.worstWriteDelayMs).toFixed(1)}`);
});

testIf({ ...needs, commands: ['qemu-io', 'losetup'] })('online --to /dev/other restores on the fly while the source stays live; the device holds the instant', async (t) => {
  await exactness(t, { volumeMiB: 512, container: 'memory:2M', writers: 3, maxBlocks: 16, toDevice: true });
});

for (const cache of ['none', 'writeback'] as const) testIf(needs)(`kill -9 of the daemon mid-backup (cache ${cache}): every acknowledged write is on the backing device`, async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const dir = scratchDir(t, 'online-kill-');
  const size = 4096 * MiB; // sparse; long enough to copy that the kill lands mid-backup
  const vol = sparseFile(path.join(dir, 'vol.raw'), size);
  const served = await serveDevice(t, dir, vol, 'victim', ['--cache', cache]);
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, r, { writers: 3, maxBlocks: 32 });
  writers.start();
  await writers.acked(300);
  // A tiny container: writers wait on the copier, so writes are held in the daemon when it dies.
  const backup = startBackup(t, [served.name, '--to', path.join(dir, 'backup.img'), '--container', 'memory:128K', '--control', served.control]);
  await backup.armed;
  await sleep(300);
  process.kill(served.pid, 'SIGKILL');
  const killedAt = performance.now();
  writers.abandon();
  const res = await backup.exit;
  await Promise.all(writers.clients.map((c) => c.quit()));
  t.not(res.status, 0, 'the backup CLI reports the daemon gone');
  t.false(fs.existsSync(path.join(dir, 'backup.img')), 'no image claims to be complete');
  const acked = writers.records.filter((w) => w.ack !== undefined);
  const inflight = writers.records.filter((w) => w.ack === undefined && w.start < killedAt);
  t.log(`${acked.length} writes acknowledged (${acked.filter((w) => w.start > backup.launchedAt).length} during the backup), ${inflight.length} in flight at the kill; CLI said: ${res.stderr.trim()}`);
  t.true(acked.filter((w) => w.start > backup.launchedAt).length > 0, 'writes were acknowledged during the backup');
  const check = checkFinal(vol, writers.records, { allowUnacked: true });
  t.deepEqual(check.problems, [], 'the backing file holds every acknowledged write');
  t.log(`${check.checked} written blocks checked on the backing file`);
});
