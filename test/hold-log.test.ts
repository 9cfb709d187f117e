// The durable hold log end to end: with --hold-log, held writes are acknowledged once they are in
// the log, so writers keep going during the backup while the source device is untouched; the image
// is the instant, the live volume ends with every acknowledged write. kill -9 of the daemon with
// writes only in the log: `serve` again replays every complete record before serving, a torn tail
// (a record cut short) is dropped.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import type { ExecutionContext } from 'ava';
import { checkFinal, checkSnapshot, fillSectors, now, readRange, SelfDescribingWriters, servedVolume, serveDevice, sleep, startBackup, type WriteRecord } from './helpers/online';
import { serialIf as testIf } from './helpers/online';
import { rng, seedFromEnv } from './helpers/system';

const BS = 4096;
const needs = { root: true, commands: ['qemu-io'] };

async function logged(t: ExecutionContext, mode: 'all' | 'backup-blocks'): Promise<void> {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const { dir, size, vol, served } = await servedVolume(t, 'hold-log-', 'logged', 512);
  const target = path.join(dir, 'backup.img');
  const logFile = path.join(dir, 'hold.log');
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, r, { writers: 4, maxBlocks: 16 });
  try {
    writers.start();
    await writers.acked(400);
    // 512 MiB at 128 MiB/s: about 4 s of backup for the writers to keep writing through.
    const backup = startBackup(t, [served.name, '--to', target, '--method', 'hold', '--hold', mode, '--hold-log', `${logFile}:256M`, '--max-rate', '128M', '--control', served.control]);
    const armed = await backup.armed;
    await sleep(1000);
    const st = await served.status();
    const job = (st.jobs as unknown as Array<Record<string, unknown>>).find((j) => j.export === 'logged')!;
    const held = job.held as { count: number; loggedWrites: number; log: { records: number; bytes: number; capacity: number } };
    t.log(`status 1 s into the backup: ${JSON.stringify(held)}`);
    t.true(held.log.records > 0 && held.log.bytes > 0, 'status shows the log filling');
    t.true(fs.existsSync(path.join(served.runDir, 'state-logged', 'hold-log.json')), 'the state directory names the log while it holds writes');
    const res = await backup.exit;
    const exitedAt = now();
    await sleep(150);
    const codes = await writers.stop();
    t.is(res.status, 0, `${res.stderr}\n${served.logTail()}`);
    t.deepEqual(codes, codes.map(() => 0));
    t.deepEqual(writers.records.filter((w) => w.failed).map((w) => `#${w.seq}: ${w.failed}`), [], 'no write failed');
    const done = res.lines[res.lines.length - 1]!;
    const hold = done.hold as { loggedWrites: number; log: { records: number; syncs: number }; fellBack: boolean };
    t.false(hold.fellBack);
    t.true(hold.loggedWrites > 0, 'held writes were acknowledged from the log');
    const during = writers.records.filter((w) => w.start > armed.receivedAt && w.ack !== undefined && w.ack < exitedAt - Number(done.releaseMs) - 100).length;
    t.log(`${during} writes acknowledged during the backup (${Number(done.durationMs).toFixed(0)} ms); ${hold.loggedWrites} logged in ${hold.log.syncs} syncs; release/replay ${Number(done.releaseMs).toFixed(0)} ms; longest hold ${Number(done.maxHoldMs).toFixed(0)} ms`);
    t.true(during > 100, 'writers kept going during the backup');
    t.true(Number(done.maxHoldMs) < Number(done.durationMs) / 2, 'no writer waited for the backup: the longest acknowledgement wait is a fraction of it');
    const check = checkSnapshot(target, size, writers.records, backup.launchedAt, armed.receivedAt);
    t.deepEqual(check.problems, [], 'the image is the volume at the instant of arming');
    t.deepEqual(checkFinal(vol, writers.records).problems, [], 'the live volume holds every acknowledged write');
    t.false(fs.existsSync(path.join(served.runDir, 'state-logged', 'hold-log.json')), 'the log is retired after the replay');
  } finally {
    writers.abandon();
    if (t.passed === false) t.log(served.logTail());
  }
}

testIf(needs)('hold log, --hold all: writers are acknowledged from the log during the backup; exact instant; every acknowledged write on the volume after the replay', async (t) => {
  await logged(t, 'all');
});

testIf(needs)('hold log, --hold backup-blocks: exact instant; every acknowledged write on the volume', async (t) => {
  await logged(t, 'backup-blocks');
});

/** The log's records as the format says (hold-log.ts): [position, seq, offset, length] of each complete one, and the epoch. */
function walkLog(file: string): { epoch: number; records: Array<{ pos: number; seq: number; offset: number; length: number }>; end: number } {
  const b = fs.readFileSync(file);
  const jl = b.readUInt32LE(16);
  const hdr = JSON.parse(b.subarray(24, 24 + jl).toString()) as { epoch: number };
  const records = [];
  let at = 4096;
  for (let seq = 1; at + 40 <= b.length; seq++) {
    if (b.readUInt32LE(0 + at) !== 0x52484c53 || Number(b.readBigUInt64LE(at + 8)) !== seq) break;
    const length = b.readUInt32LE(at + 24);
    const kind = b.readUInt8(at + 4);
    // Complete only with its whole payload and both checksums: the kill may cut a write short.
    const payload = kind === 1 ? length : 0;
    if (at + 40 + payload > b.length || zlib.crc32(b.subarray(at, at + 36)) !== b.readUInt32LE(at + 36)) break;
    if (payload && zlib.crc32(b.subarray(at + 40, at + 40 + payload)) !== b.readUInt32LE(at + 28)) break;
    records.push({ pos: at, seq, offset: Number(b.readBigUInt64LE(at + 16)), length });
    at += 40 + (kind === 1 ? length : 0);
  }
  return { epoch: hdr.epoch, records, end: at };
}

testIf(needs)('kill -9 with writes only in the hold log: serve again replays every complete record before serving; a torn tail is dropped', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const { dir, size, vol, served } = await servedVolume(t, 'hold-log-kill-', 'victim', 512);
  const logFile = path.join(dir, 'hold.log');
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, r, { writers: 3, maxBlocks: 16 });
  writers.start();
  await writers.acked(300);
  // Slow (about 50 s): the kill lands mid-backup, with many writes only in the log.
  const backup = startBackup(t, [served.name, '--to', path.join(dir, 'backup.img'), '--method', 'hold', '--hold-log', logFile, '--max-rate', '10M', '--control', served.control]);
  const armed = await backup.armed;
  // Count only writes issued after arming: one in flight at the arming is acknowledged after it, not from the log.
  await writers.acked(300, 30_000, armed.receivedAt);
  process.kill(served.pid, 'SIGKILL');
  const killedAt = now();
  writers.abandon();
  const res = await backup.exit;
  await Promise.all(writers.clients.map((c) => c.quit()));
  t.not(res.status, 0, 'the backup CLI reports the daemon gone');
  const ackedInLog = writers.records.filter((w) => w.ack !== undefined && w.start > armed.receivedAt);
  t.log(`${ackedInLog.length} writes acknowledged after arming (from the log), ${writers.records.filter((w) => w.ack === undefined && w.start < killedAt).length} in flight at the kill`);
  t.true(ackedInLog.length >= 300, 'writes were acknowledged from the log');
  // Not on the device yet: the device is still the instant for them.
  const before = checkFinal(vol, writers.records, { allowUnacked: true });
  t.true(before.problems.length > 0, 'before the replay the device lacks acknowledged writes (they are only in the log)');

  // A torn tail: the next record, valid header, its payload cut short (the daemon died mid-append).
  const log = walkLog(logFile);
  t.true(log.records.length >= ackedInLog.length, `the log holds ${log.records.length} complete records`);
  fs.truncateSync(logFile, log.end);
  const tornOffset = 7 * BS;
  const h = Buffer.alloc(40);
  h.writeUInt32LE(0x52484c53, 0);
  h.writeUInt8(1, 4);
  h.writeBigUInt64LE(BigInt(log.records.length + 1), 8);
  h.writeBigUInt64LE(BigInt(tornOffset), 16);
  h.writeUInt32LE(BS, 24);
  const torn = fillSectors(Buffer.alloc(BS), tornOffset, 9_999_999, 77);
  h.writeUInt32LE(zlib.crc32(torn), 28);
  h.writeUInt32LE(log.epoch, 32);
  h.writeUInt32LE(zlib.crc32(h.subarray(0, 36)), 36);
  fs.appendFileSync(logFile, Buffer.concat([h, torn.subarray(0, 1000)]));
  const beforeTorn = readRange(vol, tornOffset, BS);

  const again = await serveDevice(t, dir, vol, 'victim');
  const logText = again.logTail();
  t.log(logText.split('\n').filter((l) => /replayed/.test(l)).join('\n'));
  t.regex(logText, new RegExp(`replayed ${log.records.length} held writes .* from the hold log ${logFile.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} before serving; dropped a torn tail of 1040 bytes`));
  const after = checkFinal(vol, writers.records, { allowUnacked: true });
  t.deepEqual(after.problems, [], 'after serve every acknowledged write is on the device');
  t.log(`${after.checked} written blocks checked`);
  t.true(readRange(vol, tornOffset, BS).equals(beforeTorn), 'the torn record was not applied');
  t.false(fs.existsSync(path.join(again.runDir, 'state-victim', 'hold-log.json')), 'the replayed log is no longer named');
  const st = await again.status();
  t.is(st.exports[0]?.name, 'victim', 'and the export is served again');
});

testIf(needs)('hold log replay: a write to a block the log holds is logged and acknowledged at once while the log is replayed, not held until it is retired; the newest write wins', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const { dir, size, vol, served } = await servedVolume(t, 'hold-replay-', 'replay', 256);
  const target = path.join(dir, 'backup.img');
  const { Pipelined } = await import('./helpers/pipelined');
  const burst = await Pipelined.open(served.socket, served.name);
  const loop = await Pipelined.open(served.socket, served.name);
  t.teardown(async () => { await burst.close(); await loop.close(); });
  const records: WriteRecord[] = [];
  let seq = 0;
  const write = async (p: typeof burst, block: number, writer: number): Promise<WriteRecord> => {
    const rec: WriteRecord = { seq: ++seq, writer, offset: block * BS, length: BS, start: now() };
    records.push(rec);
    const rep = await p.write(rec.offset, fillSectors(Buffer.allocUnsafe(BS), rec.offset, rec.seq, writer));
    if (rep.error === 0) rec.ack = now(); else rec.failed = `NBD error ${rep.error}`;
    return rec;
  };
  const backup = startBackup(t, [served.name, '--to', target, '--method', 'hold', '--hold-log', `${path.join(dir, 'hold.log')}:256M`, '--max-rate', '64M', '--control', served.control]);
  const armed = await backup.armed;
  // Thousands of logged writes to random blocks: a replay long enough to write into.
  const blocks = [...new Set(Array.from({ length: 12000 }, () => Math.floor(r() * (size / BS))))];
  for (let i = 0; i < blocks.length; i += 64) await Promise.all(blocks.slice(i, i + 64).map((b) => write(burst, b, 1)));
  let exited = false;
  const res = backup.exit.then((x) => { exited = true; return x; });
  // One writer at a time on blocks the log holds, until the backup is done (its replay included).
  const hot: WriteRecord[] = [];
  while (!exited) hot.push(await write(loop, blocks[Math.floor(r() * blocks.length)]!, 2));
  const exitedAt = now();
  const out = await res;
  t.is(out.status, 0, `${out.stderr}\n${served.logTail()}`);
  t.deepEqual(records.filter((w) => w.failed).map((w) => `#${w.seq}: ${w.failed}`), [], 'no write failed');
  const done = out.lines[out.lines.length - 1]!;
  const releaseMs = Number(done.releaseMs);
  const replayStart = exitedAt - releaseMs - 50;
  // Writes started in the first half of the replay (held until the retire, each would wait out the rest of it).
  const during = hot.filter((w) => w.start >= replayStart + 20 && w.start <= replayStart + releaseMs / 2);
  const worst = Math.max(0, ...during.map((w) => w.ack! - w.start));
  t.log(`seed ${seed}: ${blocks.length} logged writes, replay ${releaseMs.toFixed(0)} ms; ${during.length} writes to logged blocks during it, the slowest acknowledged in ${worst.toFixed(1)} ms`);
  t.true(releaseMs >= 100, 'the replay lasted long enough to write into');
  t.true(during.length >= 3, 'writes to logged blocks were issued during the replay');
  t.true(worst < releaseMs / 3, `a write to a logged block waited ${worst.toFixed(0)} ms of a ${releaseMs.toFixed(0)} ms replay`);
  const check = checkSnapshot(target, size, records, backup.launchedAt, armed.receivedAt);
  t.deepEqual(check.problems, [], 'the image is the volume at the instant (every write came after arming)');
  t.deepEqual(checkFinal(vol, records).problems, [], 'the live volume holds the newest acknowledged write of every block');
});
