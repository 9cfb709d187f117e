// The hold method end to end (seed 004): a daemon serves two raw volumes, real NBD clients write
// self-describing sectors; `backup --method hold` must produce the volume at the instant of arming,
// the live volume must end with every acknowledged write, the other export must never be held,
// overlapping held writes must land in arrival order, reads must see held data, and reaching the
// hold limit must fall back to copy-before-write without failing a write.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { checkFinal, checkSnapshot, fillSectors, now, readRange, SelfDescribingWriters, servedVolume, serveDevice, sleep, startBackup, type WriteRecord } from './helpers/online';
import { serialIf as testIf } from './helpers/online';
import { Pipelined } from './helpers/pipelined';
import { rng, run, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const BS = 4096;
const needs = { root: true, commands: ['qemu-io'] };

interface HoldCase {
  mode: 'all' | 'backup-blocks';
  volumeMiB: number;
  writers: number;
  maxBlocks: number;
  /** --hold-limit */
  limit?: string;
  /** Also this many 64 KiB writes in flight at once on one more connection, right after arming. */
  burst?: number;
  /** --max-rate: a backup long enough that the fallback comes while much is still to copy. */
  maxRate?: string;
}

async function exactness(t: ExecutionContext, c: HoldCase): Promise<Record<string, unknown>> {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const { dir, size, vol, served } = await servedVolume(t, 'hold-exact-', 'held', c.volumeMiB);
  const otherSize = 64 * MiB;
  const otherVol = sparseFile(path.join(dir, 'other.raw'), otherSize);
  const other = await serveDevice(t, dir, otherVol, 'other'); // the same daemon (same control socket)
  t.is(other.pid, served.pid, 'both exports are served by one daemon');
  const target = path.join(dir, 'backup.img');
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, r, { writers: c.writers, maxBlocks: c.maxBlocks });
  const otherWriters = new SelfDescribingWriters(t, path.join(dir, 'src-other'), other.uri, otherSize, r, { writers: 1, maxBlocks: 4 });
  let burst: Pipelined | undefined;
  try {
    writers.start();
    otherWriters.start();
    await writers.acked(100 * c.writers);
    const backup = startBackup(t, [served.name, '--to', target, '--method', 'hold', '--hold', c.mode, '--control', served.control,
      ...(c.limit ? ['--hold-limit', c.limit] : []), ...(c.maxRate ? ['--max-rate', c.maxRate] : [])]);
    const armed = await backup.armed;
    const bursts: Array<Promise<void>> = [];
    if (c.burst) {
      burst = await Pipelined.open(served.socket, served.name);
      for (let i = 0; i < c.burst; i++) {
        const length = 16 * BS;
        const offset = Math.floor(r() * (size / BS - 16)) * BS;
        const rec: WriteRecord = { seq: 1_000_000 + i, writer: 99, offset, length, start: now() };
        writers.records.push(rec);
        bursts.push(burst.write(offset, fillSectors(Buffer.allocUnsafe(length), offset, rec.seq, 99)).then((rep) => {
          if (rep.error === 0) rec.ack = rep.at; else rec.failed = `NBD error ${rep.error}`;
        }));
      }
    }
    const res = await backup.exit;
    const exitedAt = now();
    await Promise.all(bursts);
    // A little more after the end: writes after the release.
    await sleep(150);
    const codes = [...await writers.stop(), ...await otherWriters.stop()];
    t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
    t.deepEqual(codes, codes.map(() => 0), 'every qemu-io writer exits 0');
    const failed = [...writers.records, ...otherWriters.records].filter((w) => w.failed);
    t.deepEqual(failed.map((w) => `#${w.seq}: ${w.failed}`), [], 'no write failed');
    const done = res.lines[res.lines.length - 1]!;
    t.is(done.event, 'done');
    t.is(done.method, 'hold');
    t.is(done.bytes, size);
    const hold = done.hold as Record<string, unknown>;
    t.is(hold.mode, c.mode);
    t.true(Number(done.heldWrites) > 0, 'writes were held');
    t.is(typeof done.releaseMs, 'number');
    t.is(typeof done.maxHoldMs, 'number');
    t.is(hold.fellBack, c.limit !== undefined, c.limit ? 'the limit was reached: copy-before-write took over' : 'no fallback');

    const check = checkSnapshot(target, size, writers.records, backup.launchedAt, armed.receivedAt);
    t.log(`${writers.records.length} writes: ${check.inWrites} before the backup, ${check.outWrites} after arming, ${check.ambiguousWrites} in between; ` +
      `backup ${Number(done.durationMs).toFixed(0)} ms; held ${done.heldWrites} (peak ${hold.peakHeldBytes} bytes), longest ${Number(done.maxHoldMs).toFixed(0)} ms, release ${Number(done.releaseMs).toFixed(1)} ms` +
      (hold.fellBack ? `; fell back after ${Number(hold.fellBackAfterMs).toFixed(0)} ms, ${done.blocksSavedByWriters} originals saved` : ''));
    t.deepEqual(check.problems, [], 'the image is the volume at the instant of arming');
    t.true(check.inWrites > 0, 'writes were acknowledged before the backup');
    if (c.burst) t.true(check.outWrites >= c.burst, 'the burst was written after arming');
    if (c.limit) t.true(Number(done.blocksSavedByWriters) > 0, 'after the fallback writes saved originals');

    const live = checkFinal(vol, writers.records);
    t.deepEqual(live.problems, [], 'the live volume holds every acknowledged write');

    // The other export of the daemon was never held: its writer went on during the whole backup.
    const otherDuring = otherWriters.records.filter((w) => w.start > armed.receivedAt && w.ack !== undefined && w.ack < exitedAt - Number(done.releaseMs) - 50);
    t.log(`other export: ${otherDuring.length} writes acknowledged while the backup of "held" ran`);
    t.true(otherDuring.length >= 5, 'writes to the other export were acknowledged during the backup');
    t.deepEqual(checkFinal(otherVol, otherWriters.records).problems, [], 'the other volume holds every acknowledged write');
    return done;
  } finally {
    writers.abandon();
    otherWriters.abandon();
    await burst?.close();
    if (t.passed === false) t.log(served.logTail());
  }
}

testIf(needs)('hold all: exact instant under 4 writing connections; other export of the daemon never held', async (t) => {
  await exactness(t, { mode: 'all', volumeMiB: 512, writers: 4, maxBlocks: 16 });
});

testIf(needs)('hold backup-blocks: exact instant under 4 writing connections; other export never held', async (t) => {
  await exactness(t, { mode: 'backup-blocks', volumeMiB: 512, writers: 4, maxBlocks: 16 });
});

testIf(needs)('hold limit reached: the queue is released in order, the rest is copy-before-write, exact, no write failed', async (t) => {
  // 96 x 64 KiB in flight at once = 6 MiB held > 1 MiB.
  await exactness(t, { mode: 'all', volumeMiB: 512, writers: 3, maxBlocks: 16, limit: '1M', burst: 96, maxRate: '200M' });
});

testIf(needs)('hold backup-blocks with the limit reached: falls back, exact, no write failed', async (t) => {
  await exactness(t, { mode: 'backup-blocks', volumeMiB: 512, writers: 3, maxBlocks: 16, limit: '256K', burst: 96, maxRate: '200M' });
});

function pattern(len: number, byte: number): Buffer {
  return Buffer.alloc(len, byte);
}

testIf(needs)('hold: overlapping held writes land in arrival order, reads see the newest held data, held write-zeroes too; the image keeps the originals', async (t) => {
  const { dir, vol, served } = await servedVolume(t, 'hold-fifo-', 'fifo', 64);
  const target = path.join(dir, 'backup.img');
  const p = await Pipelined.open(served.socket, served.name);
  t.teardown(() => p.close());
  // The originals: 0x11 over blocks 10..11 and 20.
  t.is((await p.write(10 * BS, pattern(2 * BS, 0x11))).error, 0);
  t.is((await p.write(20 * BS, pattern(BS, 0x11))).error, 0);
  // Slow enough (64 MiB at 8 MiB/s) that everything below happens while the hold is armed.
  const backup = startBackup(t, [served.name, '--to', target, '--method', 'hold', '--max-rate', '8M', '--control', served.control]);
  await backup.armed;
  const wA = p.write(10 * BS, pattern(2 * BS, 0xa1));
  const wB = p.write(10 * BS, pattern(BS, 0xb2));
  const wC = p.write(11 * BS + 512, pattern(512, 0xc3));
  const wZ = p.writeZeroes(20 * BS, BS);
  let acked = 0;
  for (const w of [wA, wB, wC, wZ]) void w.then(() => acked++);
  const rd = await p.read(10 * BS, 2 * BS);
  const rz = await p.read(20 * BS, BS);
  t.is(acked, 0, 'the reads were answered while every write was still held');
  const want = Buffer.concat([pattern(BS, 0xb2), pattern(512, 0xa1), pattern(512, 0xc3), pattern(BS - 1024, 0xa1)]);
  t.true(rd.data!.equals(want), 'a read of held blocks returns the newest held data of each byte');
  t.true(rz.data!.equals(Buffer.alloc(BS)), 'a read of a block with a held write-zeroes returns zeros');
  const st = await served.status();
  const row = (st.exports as unknown as Array<{ name: string; held: { count: number; bytes: number; oldestMs: number } }>).find((e) => e.name === 'fifo')!;
  t.is(row.held.count, 4, 'status shows the 4 held changes');
  t.is(row.held.bytes, 2 * BS + BS + 512, 'and their payload bytes');
  t.true(row.held.oldestMs >= 0);
  const job = (st.jobs as unknown as Array<Record<string, unknown>>).find((j) => j.export === 'fifo')!;
  t.is(job.method, 'hold');
  t.is((job.held as { count: number }).count, 4);
  t.is(fs.readFileSync(vol).subarray(10 * BS, 10 * BS + 2 * BS).equals(pattern(2 * BS, 0x11)), true, 'the device does not have them yet');
  const res = await backup.exit;
  t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
  const replies = await Promise.all([wA, wB, wC, wZ]);
  t.deepEqual(replies.map((x) => x.error), [0, 0, 0, 0], 'every held write succeeded once released');
  const done = res.lines[res.lines.length - 1]!;
  t.true(Number(done.heldWrites) >= 4);
  t.true(Number(done.maxHoldMs) > 1000, `held for the backup (${Number(done.maxHoldMs).toFixed(0)} ms)`);
  t.true(readRange(vol, 10 * BS, 2 * BS).equals(want), 'released in arrival order: overlapping writes end with the last one');
  t.true(readRange(vol, 20 * BS, BS).equals(Buffer.alloc(BS)), 'the held write-zeroes landed');
  t.true(readRange(target, 10 * BS, 2 * BS).equals(pattern(2 * BS, 0x11)), 'the image has the originals of blocks 10-11');
  t.true(readRange(target, 20 * BS, BS).equals(pattern(BS, 0x11)), 'and of block 20');
  // The export can be held again: a second backup at once, and one with nothing to release.
  for (const n of [2, 3]) {
    const again = startBackup(t, [served.name, '--to', path.join(dir, `again-${n}.img`), '--method', 'hold', '--control', served.control]);
    const r2 = await again.exit;
    t.is(r2.status, 0, `hold backup #${n} of the same export: ${r2.stderr}`);
  }
  t.true(readRange(path.join(dir, 'again-3.img'), 10 * BS, 2 * BS).equals(want), 'the next instant has the released writes');
});

testIf(needs)('hold backup-blocks: a write to a block not yet copied is held only until the copier, urged, has copied it; a copied block is written at once', async (t) => {
  const { dir, size, vol, served } = await servedVolume(t, 'hold-blocks-', 'blocks', 64);
  const target = path.join(dir, 'backup.img');
  const p = await Pipelined.open(served.socket, served.name);
  t.teardown(() => p.close());
  const last = size / BS - 1;
  t.is((await p.write(last * BS, pattern(BS, 0x11))).error, 0);
  t.is((await p.write(0, pattern(BS, 0x11))).error, 0);
  const backup = startBackup(t, [served.name, '--to', target, '--method', 'hold', '--hold', 'backup-blocks', '--max-rate', '8M', '--control', served.control]);
  const armed = await backup.armed;
  // The walk is ascending: wait until block 0 is surely copied, the last block surely not.
  await sleep(1500);
  const t0 = now();
  const w0 = await p.write(0, pattern(BS, 0xa1));
  const wl = await p.write(last * BS, pattern(BS, 0xb2));
  const res = await backup.exit;
  t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
  const done = res.lines[res.lines.length - 1]!;
  t.log(`copied block: ${(w0.at - t0).toFixed(1)} ms; last block: ${(wl.at - t0).toFixed(1)} ms; backup ${Number(done.durationMs).toFixed(0)} ms after arming at ${(armed.receivedAt - t0).toFixed(0)}`);
  t.is(w0.error, 0);
  t.is(wl.error, 0);
  t.true(w0.at - t0 < 200, 'the write to a copied block went at once');
  t.true(Number(done.durationMs) > 5000, 'the backup took the rate limit\'s time');
  t.true(wl.at - t0 < 2000, 'the write to the last block waited only for the urged copy, not for the backup');
  t.true(Number(done.blocksCopiedForWaitingWriters) >= 1, 'the copier took the held block next');
  t.true(readRange(target, last * BS, BS).equals(pattern(BS, 0x11)), 'the image has the original of the last block');
  t.true(readRange(target, 0, BS).equals(pattern(BS, 0x11)), 'and of block 0');
  t.true(readRange(vol, last * BS, BS).equals(pattern(BS, 0xb2)), 'the device has the new data');
});

testIf({ ...needs, commands: ['qemu-io', 'mkfs.xfs'] })('backup --method hold: options are checked with a clear message', async (t) => {
  const dir = scratchDir(t, 'hold-cli-');
  const vol = sparseFile(path.join(dir, 'vol.raw'), 16 * MiB);
  const { cli } = await import('./helpers/online');
  const a = await cli(['backup', vol, '--to', path.join(dir, 'x.img'), '--method', 'hold']);
  t.is(a.status, 1);
  t.regex(a.stderr, /--method hold is for online backups of a served export/);
  const b = await cli(['backup', 'data', '--to', path.join(dir, 'x.img'), '--hold', 'all', '--control', path.join(dir, 'none.sock')]);
  t.is(b.status, 1);
  t.regex(b.stderr, /--hold goes with --method hold/);
  const c = await cli(['backup', 'data', '--to', path.join(dir, 'x.img'), '--method', 'hold', '--hold-limit', 'lots', '--control', path.join(dir, 'none.sock')]);
  t.not(c.status, 0);
  t.regex(c.stderr, /--hold-limit/);
  // --hold metadata of a volume with no file system livesnap can name: refused before the instant.
  const served = await serveDevice(t, dir, vol, 'blank');
  const d = await cli(['backup', served.name, '--to', path.join(dir, 'y.img'), '--method', 'hold', '--hold', 'metadata', '--control', served.control]);
  t.is(d.status, 1, d.stderr);
  t.regex(d.stderr, /--hold metadata knows the metadata blocks of ext2\/3\/4 or XFS file systems only, and this volume holds no file system livesnap recognises/);
  t.regex(d.stderr, /hint: use --hold all or --hold backup-blocks/);
  t.false(fs.existsSync(path.join(dir, 'y.img')), 'nothing was written');
  const e = await cli(['snapshot', served.name, '--method', 'hold', '--hold', 'backup-blocks', '--control', served.control]);
  t.is(e.status, 1);
  t.regex(e.stderr, /--hold backup-blocks does not go with a snapshot view/);
  const f = await cli(['snapshot', served.name, '--method', 'hold', '--hold', 'metadata', '--control', served.control]);
  t.is(f.status, 1, f.stderr);
  t.regex(f.stderr, /--hold metadata knows the metadata blocks/);
  t.deepEqual((await served.status()).jobs?.filter((j) => j.state === 'running') ?? [], [], 'no job left running');
  // XFS only with --freeze (its log holds partial buffers).
  const xvol = sparseFile(path.join(dir, 'xfs.raw'), 320 * MiB);
  run('mkfs.xfs', ['-q', '-f', xvol]);
  const xs = await serveDevice(t, dir, xvol, 'xfsvol');
  const g = await cli(['backup', xs.name, '--to', path.join(dir, 'z.img'), '--method', 'hold', '--hold', 'metadata', '--control', xs.control]);
  t.is(g.status, 1, g.stderr);
  t.regex(g.stderr, /--hold metadata of an XFS file system needs --freeze MOUNTPOINT/);
});

testIf({ ...needs, commands: ['qemu-io', 'mke2fs', 'debugfs'] })('hold metadata: writes to metadata blocks (the journal) are held and the image has them as of the instant; writes to file data go on during the backup; the live volume has every acknowledged write', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const dir = scratchDir(t, 'hold-meta-');
  const size = 256 * MiB;
  const vol = sparseFile(path.join(dir, 'vol.raw'), size);
  // An ext4 with a 32 MiB journal and one 64 MiB file: the journal's blocks are metadata (and the
  // used-block and metadata readers never parse them), the file's blocks are data.
  const src = path.join(dir, 'src');
  fs.mkdirSync(src);
  fs.writeFileSync(path.join(src, 'big'), Buffer.alloc(64 * MiB, 0x5a));
  run('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-J', 'size=32', '-E', 'lazy_itable_init=0,lazy_journal_init=0', '-d', src, vol]);
  const extentOf = (spec: string, bytes: number): [number, number] => {
    const first = Number(run('debugfs', ['-R', `bmap ${spec} 0`, vol]).trim());
    const last = Number(run('debugfs', ['-R', `bmap ${spec} ${bytes / BS - 1}`, vol]).trim());
    t.is(last - first + 1, bytes / BS, `${spec} is contiguous`);
    return [first * BS, (last + 1) * BS];
  };
  const journal = extentOf('<8>', 32 * MiB);
  const data = extentOf('/big', 64 * MiB);
  // The journal starts as zeros (its superblock too: nothing here parses it), as the checker expects.
  const fd = fs.openSync(vol, 'r+');
  fs.writeSync(fd, Buffer.alloc(journal[1] - journal[0]), 0, journal[1] - journal[0], journal[0]);
  fs.closeSync(fd);
  const served = await serveDevice(t, dir, vol, 'meta');
  const target = path.join(dir, 'backup.img');
  const jw = new SelfDescribingWriters(t, path.join(dir, 'src-j'), served.uri, size, r, { writers: 2, maxBlocks: 8, region: journal });
  const dw = new SelfDescribingWriters(t, path.join(dir, 'src-d'), served.uri, size, r, { writers: 2, maxBlocks: 8, region: data, firstSeq: 50_000_000 });
  try {
    jw.start();
    dw.start();
    await jw.acked(100);
    await dw.acked(100);
    // Slow enough that the data writers have seconds of backup to write through.
    const backup = startBackup(t, [served.name, '--to', target, '--method', 'hold', '--hold', 'metadata', '--max-rate', '40M', '--control', served.control]);
    const armed = await backup.armed;
    const res = await backup.exit;
    const exitedAt = now();
    await sleep(150);
    const codes = [...await jw.stop(), ...await dw.stop()];
    t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
    t.deepEqual(codes, codes.map(() => 0), 'every qemu-io writer exits 0');
    const all = [...jw.records, ...dw.records];
    t.deepEqual(all.filter((w) => w.failed).map((w) => `#${w.seq}: ${w.failed}`), [], 'no write failed');
    const done = res.lines[res.lines.length - 1]!;
    const hold = done.hold as Record<string, unknown>;
    t.is(hold.mode, 'metadata');
    t.false(hold.fellBack as boolean);
    t.true(Number(hold.metadataBlocks) >= journal[1] / BS - journal[0] / BS, `the journal's blocks are held (${hold.metadataBlocks} metadata blocks)`);
    const releaseStart = exitedAt - Number(done.releaseMs) - 100;
    const dataDuring = dw.records.filter((w) => w.start > armed.receivedAt + 200 && w.ack !== undefined && w.ack < releaseStart);
    const journalDuring = jw.records.filter((w) => w.start > armed.receivedAt && w.ack !== undefined && w.ack < releaseStart);
    t.log(`seed ${seed}: backup ${Number(done.durationMs).toFixed(0)} ms, metadata map ${Number(hold.metadataMs).toFixed(0)} ms (${hold.metadataBlocks} blocks); ${done.heldWrites} held, longest ${Number(done.maxHoldMs).toFixed(0)} ms; during the backup ${dataDuring.length} data writes and ${journalDuring.length} journal writes acknowledged`);
    t.true(dataDuring.length >= 50, 'writes to file data went on during the backup');
    t.is(journalDuring.length, 0, 'writes to metadata blocks were held until the end');

    // The journal region of the image is the instant: checked alone (everything else zeroed).
    const only = path.join(dir, 'journal-only.img');
    const img = fs.readFileSync(target);
    const copy = Buffer.alloc(size);
    img.copy(copy, journal[0], journal[0], journal[1]);
    fs.writeFileSync(only, copy);
    const check = checkSnapshot(only, size, jw.records, backup.launchedAt, armed.receivedAt);
    t.deepEqual(check.problems, [], 'the journal in the image is as of the instant');
    t.true(check.inWrites > 0 && check.outWrites > 0);
    t.deepEqual(checkFinal(vol, all).problems, [], 'the live volume holds every acknowledged write');
  } finally {
    jw.abandon();
    dw.abandon();
    if (t.passed === false) t.log(served.logTail());
  }
});
