// The backup appliance as two hosts (helpers/appliance.ts): the host's daemon serves the volume and
// ships originals; the appliance, in its own network namespace, reads the same LUN through a second
// loop device and writes the instant. Exactness under concurrent writers (self-describing sectors)
// for the archive and for an unmodified nbdcopy (--run), a tiny ODC under heavy writes, the link
// cut mid-backup, the host daemon killed mid-backup, wrong keys and a plaintext client, and a LUN
// that is another volume.
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { keyFile, outputOf, startAppliance, twoHosts, type RunningAppliance } from './helpers/appliance';
import { checkFinal, checkSnapshot, cli, lastJsonOf, now, SelfDescribingWriters, servedVolume, sh, sleep, startBackup, waitUntil } from './helpers/online';
import { serialIf as testIf } from './helpers/online';
import { loopDevice, rng, seedFromEnv } from './helpers/system';

const needs = { root: true, commands: ['qemu-io', 'ip', 'tar', 'nbdcopy'] };

/** The appliance's archive extracted by GNU tar: the image inside. */
async function extracted(archive: string, dir: string): Promise<string> {
  const x = path.join(dir, 'x');
  fs.mkdirSync(x, { recursive: true });
  await sh(`tar -xSf '${archive}' -C '${x}'`);
  return path.join(x, 'disk.img');
}

function noCompleteOutput(store: string): string[] {
  return fs.existsSync(store) ? fs.readdirSync(store).filter((f) => f.endsWith('.tar')) : [];
}

async function exactUnderWriters(t: ExecutionContext, o: { prefix: string; applianceArgs: (dir: string) => string[]; image: (done: Record<string, unknown>, dir: string) => Promise<string>; maxBlocks?: number }) {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const { dir, size, vol, served, ap } = await setUpWith(t, o.prefix, 256, o.applianceArgs);
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, r, { writers: 4, maxBlocks: o.maxBlocks ?? 16 });
  try {
    writers.start();
    await writers.acked(300);
    const backup = startBackup(t, ['lun0', '--to', `appliance://${ap.address}`, '--key', path.join(dir, 'k.psk'), '--control', served.control]);
    const armed = await backup.armed;
    const res = await backup.exit;
    await sleep(150);
    const codes = await writers.stop();
    t.is(res.status, 0, `${res.stderr}\n${served.logTail()}\n${ap.log()}`);
    t.deepEqual(codes, codes.map(() => 0));
    t.deepEqual(writers.records.filter((w) => w.failed).map((w) => `#${w.seq}: ${w.failed}`), [], 'no write failed');
    const done = res.lines[res.lines.length - 1]!;
    const during = writers.records.filter((w) => w.start > armed.receivedAt && w.ack !== undefined).length;
    t.log(`${during} writes after arming; ${done.blocksSavedByWriters} originals sent (${done.originalsSentBytes} bytes), ${done.originalsUsed} substituted; ODC peak ${done.odcPeakBytes}; worst write delay ${Number(done.worstWriteDelayMs).toFixed(1)} ms; ${Number(done.durationMs).toFixed(0)} ms`);
    t.true(Number(done.blocksSavedByWriters) > 0, 'writers sent originals');
    // Only originals travel, once each: no more originals than distinct blocks written after the
    // backup was launched, and the link carried little besides them (frames, hello, pings).
    const written = new Set<number>();
    for (const w of writers.records) if (w.ack === undefined || w.ack > backup.launchedAt) for (let b = w.offset / 4096; b < (w.offset + w.length) / 4096; b++) written.add(b);
    t.true(Number(done.blocksSavedByWriters) <= written.size, `${done.blocksSavedByWriters} originals sent for ${written.size} blocks written after the launch`);
    t.true(Number(done.linkBytesSent) <= Number(done.originalsSentBytes) * 1.05 + (64 << 10), `link bytes ${done.linkBytesSent} for ${done.originalsSentBytes} bytes of originals`);
    const image = await o.image(done, dir);
    const check = checkSnapshot(image, size, writers.records, backup.launchedAt, armed.receivedAt);
    t.deepEqual(check.problems, [], 'the appliance\'s output is the volume at the instant of arming');
    t.log(`image: ${check.fromWrites} blocks from writes, ${check.zeros} zero; writes in ${check.inWrites}, out ${check.outWrites}, either ${check.ambiguousWrites}`);
    t.deepEqual(checkFinal(vol, writers.records).problems, [], 'the live volume holds every acknowledged write');
    return done;
  } finally {
    writers.abandon();
    if (t.passed === false) t.log(`${served.logTail()}\n${ap.log()}`);
  }
}

// setUp, with appliance options that may name files in the test's directory.
async function setUpWith(t: ExecutionContext, prefix: string, sizeMiB: number, args: (dir: string) => string[]) {
  const { dir, size, vol, served } = await servedVolume(t, prefix, 'lun0', sizeMiB);
  const ns = twoHosts(t);
  const key = await keyFile(dir);
  const lun = loopDevice(t, vol, { readOnly: true, directIo: true });
  const store = path.join(dir, 'store');
  const ap: RunningAppliance = await startAppliance(t, ns, { key, luns: { lun0: lun }, store, args: ['--control', path.join(dir, 'ap.sock'), ...args(dir)] });
  return { dir, size, vol, served, ns, key, lun, store, ap };
}

testIf(needs)('appliance archive under 4 writing connections: GNU tar extracts the exact instant; every acknowledged write on the volume; only first originals travel', async (t) => {
  const done = await exactUnderWriters(t, {
    prefix: 'appliance-tar-',
    applianceArgs: () => ['--max-rate', '96M'],
    image: (d, dir) => extracted(outputOf(d), dir),
  });
  t.regex(String(done.output), /lun0-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{3}Z\.tar$/);
  t.is((done.checksums as { chunks: number }).chunks > 0, true);
});

testIf(needs)('appliance --run nbdcopy {uri}: an unmodified program reads the exact instant; its exit status reaches the host', async (t) => {
  const done = await exactUnderWriters(t, {
    prefix: 'appliance-run-',
    applianceArgs: (dir) => ['--run', `sleep 1 && nbdcopy {uri} ${path.join(dir, 'copied.img')}`],
    image: async (_d, dir) => path.join(dir, 'copied.img'),
  });
  t.is(done.runStatus, 0);
  t.regex(String(done.output), /^run: /);
});

testIf(needs)('appliance with a 128 KiB ODC (64 KiB memory + 64 KiB spill file) under heavy writes: acknowledgements wait for room, the output is exact, no write fails', async (t) => {
  const done = await exactUnderWriters(t, {
    prefix: 'appliance-odc-',
    applianceArgs: (dir) => ['--odc', `memory:64K+file:${path.join(dir, 'odc.spill')}:64K`, '--max-rate', '128M'],
    image: (d, dir) => extracted(outputOf(d), dir),
    maxBlocks: 32,
  });
  t.true(Number(done.odcPeakBytes) <= 128 * 1024, `the ODC never held more than its 128 KiB (peak ${done.odcPeakBytes})`);
});

testIf(needs)('link cut mid-backup: the host breaks the snapshot within --appliance-timeout, writers go on, no write fails; the appliance leaves no complete output', async (t) => {
  const seed = seedFromEnv(t);
  const { dir, size, served, ns, key, store, ap } = await setUpWith(t, 'appliance-cut-', 256, () => ['--max-rate', '8M']);
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, rng(seed), { writers: 3, maxBlocks: 16 });
  try {
    writers.start();
    await writers.acked(200);
    const backup = startBackup(t, ['lun0', '--to', `appliance://${ap.address}`, '--key', key, '--appliance-timeout', '3s', '--control', served.control]);
    await backup.armed;
    await sleep(1000);
    ns.cut();
    const cutAt = now();
    const res = await backup.exit;
    const failedAfter = now() - cutAt;
    t.not(res.status, 0);
    t.regex(res.stderr, /stopped answering|held .* waiting for|link .* (cut|failed)/, res.stderr);
    t.true(failedAfter < 8000, `the job failed ${failedAfter.toFixed(0)} ms after the cut (timeout 3 s)`);
    const ackedAtFail = writers.records.filter((w) => w.ack !== undefined).length;
    await writers.acked(ackedAtFail + 200);
    const codes = await writers.stop();
    t.deepEqual(codes, codes.map(() => 0));
    t.deepEqual(writers.records.filter((w) => w.failed).map((w) => `#${w.seq}: ${w.failed}`), [], 'no write failed');
    const worst = Math.max(...writers.records.filter((w) => w.ack !== undefined).map((w) => w.ack! - w.start));
    t.log(`failed ${failedAfter.toFixed(0)} ms after the cut: ${res.stderr.trim().split('\n').pop()}; longest write ${worst.toFixed(0)} ms`);
    t.true(worst < 8000, 'no writer waited much longer than the timeout');
    await waitUntil(() => /unit lun0 .*failed/.test(ap.log()), 15_000, 'the appliance to abandon the unit');
    t.deepEqual(noCompleteOutput(store), [], 'no complete-looking archive');
    t.log(ap.log().split('\n').filter((l) => /failed/.test(l)).join('\n'));
    t.deepEqual(checkFinal(path.join(dir, 'vol.raw'), writers.records).problems, []);
  } finally {
    writers.abandon();
  }
});

testIf(needs)('the host daemon killed mid-backup: the appliance notices, abandons the output, and its status says so', async (t) => {
  const { dir, served, key, store, ap } = await setUpWith(t, 'appliance-kill-', 256, () => ['--max-rate', '8M']);
  const backup = startBackup(t, ['lun0', '--to', `appliance://${ap.address}`, '--key', key, '--control', served.control]);
  await backup.armed;
  await sleep(800);
  process.kill(served.pid, 'SIGKILL');
  const res = await backup.exit;
  t.not(res.status, 0);
  await waitUntil(() => /unit lun0 .*failed/.test(ap.log()), 15_000, 'the appliance to abandon the unit');
  t.deepEqual(noCompleteOutput(store), []);
  t.log(ap.log().split('\n').filter((l) => /lun0.*failed/.test(l)).join('\n'));
  const st = await cli(['status', '--control', path.join(dir, 'ap.sock'), '--json']);
  t.is(st.status, 0, st.stderr);
  const s = lastJsonOf(st.stdout) as { appliance: boolean; units: unknown[]; recent: Array<{ unit: string; state: string; error: string }> };
  t.true(s.appliance);
  t.deepEqual(s.units, [], 'no unit running');
  t.is(s.recent[0]?.state, 'failed');
  t.log(`appliance status: ${JSON.stringify(s.recent[0])}`);
});

testIf(needs)('wrong key, stale key, unknown identity, plaintext: refused with a clear message on both sides; the export is untouched', async (t) => {
  const { dir, served, ap } = await setUpWith(t, 'appliance-key-', 64, () => []);
  const stale = await keyFile(dir, 'stale.psk');
  const other = await keyFile(dir, 'other.psk', 'someone');
  const a = startBackup(t, ['lun0', '--to', `appliance://${ap.address}`, '--key', stale, '--control', served.control]);
  const ra = await a.exit;
  t.not(ra.status, 0);
  t.regex(ra.stderr, /refused the TLS handshake with PSK identity "livesnap"/);
  await waitUntil(() => /wrong key for PSK identity "livesnap"/.test(ap.log()), 5000, 'the appliance to log the wrong key');
  const b = startBackup(t, ['lun0', '--to', `appliance://${ap.address}`, '--key', other, '--control', served.control]);
  const rb = await b.exit;
  t.not(rb.status, 0);
  t.regex(rb.stderr, /refused the TLS handshake with PSK identity "someone"/);
  await waitUntil(() => /unknown PSK identity "someone"/.test(ap.log()), 5000, 'the appliance to log the unknown identity');
  // A plaintext client (anything that does not start TLS) from the host's side of the pair.
  const [host, port] = ap.address.split(':');
  await new Promise<void>((resolve) => {
    const s = net.connect(Number(port), host!, () => s.write('{"t":"hello"}\n'));
    s.on('error', () => resolve());
    s.on('close', () => resolve());
  });
  await waitUntil(() => /did not start TLS/.test(ap.log()), 5000, 'the appliance to log the plaintext client');
  t.log(ap.log().split('\n').filter((l) => /refused/.test(l)).join('\n'));
  const st = await served.status();
  t.is(st.exports[0]?.job ?? null, null, 'no job left on the export');
});

testIf(needs)('the LUN is another volume (same size, other data; other size): refused on both sides before any original is taken', async (t) => {
  const { dir, served, ns, key, vol } = await setUpWith(t, 'appliance-lun-', 64, () => []);
  fs.writeFileSync(vol, Buffer.alloc(1 << 20, 7), { flag: 'r+' });
  const other = path.join(dir, 'other.raw');
  fs.writeFileSync(other, Buffer.alloc(64 << 20));
  const small = path.join(dir, 'small.raw');
  fs.writeFileSync(small, Buffer.alloc(32 << 20));
  const ap2 = await startAppliance(t, ns, { key, luns: { lun0: other }, store: path.join(dir, 'store2'), port: 10811 });
  const r = await startBackup(t, ['lun0', '--to', `appliance://${ap2.address}`, '--key', key, '--control', served.control]).exit;
  t.not(r.status, 0);
  t.regex(r.stderr, /is not the host's volume: \d+ of \d+ fingerprint blocks differ/);
  t.regex(ap2.log(), /is not the host's volume/);
  const ap3 = await startAppliance(t, ns, { key, luns: { lun0: small }, store: path.join(dir, 'store3'), port: 10812 });
  const r3 = await startBackup(t, ['lun0', '--to', `appliance://${ap3.address}`, '--key', key, '--control', served.control]).exit;
  t.not(r3.status, 0);
  t.regex(r3.stderr, /is 33554432 bytes, the host's volume 67108864: it is another volume/);
  // And a unit the appliance has no LUN for.
  const ap4 = await startAppliance(t, ns, { key, luns: { other: other }, store: path.join(dir, 'store4'), port: 10813 });
  const r4 = await startBackup(t, ['lun0', '--to', `appliance://${ap4.address}`, '--key', key, '--control', served.control]).exit;
  t.regex(r4.stderr, /has no LUN for "lun0"/);
  t.log([r.stderr, r3.stderr, r4.stderr].map((s) => s.trim()).join('\n'));
});

testIf(needs)('two exports of one daemon backed up to one appliance at once, writers on both: both archives exact, each from its own LUN', async (t) => {
  const seed = seedFromEnv(t);
  const { dir, size, vol, served } = await servedVolume(t, 'appliance-two-', 'lun0', 128);
  const vol1 = path.join(dir, 'vol1.raw');
  fs.writeFileSync(vol1, Buffer.alloc(0));
  fs.truncateSync(vol1, size);
  const s1 = await cli(['serve', vol1, '--name', 'lun1', '--control', served.control, '--state', path.join(served.runDir, 'state-lun1'), '--json']);
  t.is(s1.status, 0, s1.stderr);
  const uri1 = String(lastJsonOf(s1.stdout).uri);
  const ns = twoHosts(t);
  const key = await keyFile(dir);
  const luns = { lun0: loopDevice(t, vol, { readOnly: true, directIo: true }), lun1: loopDevice(t, vol1, { readOnly: true, directIo: true }) };
  const ap = await startAppliance(t, ns, { key, luns, store: path.join(dir, 'store'), args: ['--max-rate', '48M'] });
  const w0 = new SelfDescribingWriters(t, path.join(dir, 'src0'), served.uri, size, rng(seed), { writers: 2, maxBlocks: 16 });
  const w1 = new SelfDescribingWriters(t, path.join(dir, 'src1'), uri1, size, rng(seed + 1), { writers: 2, maxBlocks: 16 });
  try {
    w0.start(); w1.start();
    await Promise.all([w0.acked(150), w1.acked(150)]);
    const b0 = startBackup(t, ['lun0', '--to', `appliance://${ap.address}`, '--key', key, '--control', served.control]);
    const b1 = startBackup(t, ['lun1', '--to', `appliance://${ap.address}`, '--key', key, '--control', served.control]);
    const [a0, a1] = await Promise.all([b0.armed, b1.armed]);
    const [r0, r1] = await Promise.all([b0.exit, b1.exit]);
    await sleep(150);
    await Promise.all([w0.stop(), w1.stop()]);
    t.is(r0.status, 0, `${r0.stderr}\n${ap.log()}`);
    t.is(r1.status, 0, `${r1.stderr}\n${ap.log()}`);
    const cases: Array<[typeof r0, typeof w0, typeof b0, typeof a0, string, string]> = [[r0, w0, b0, a0, vol, 'lun0'], [r1, w1, b1, a1, vol1, 'lun1']];
    for (const [r, w, b, a, v, name] of cases) {
      const done = r.lines[r.lines.length - 1]!;
      t.regex(String(done.output), new RegExp(`/${name}-[^/]+\\.tar$`));
      t.deepEqual(w.records.filter((x) => x.failed).map((x) => `#${x.seq}: ${x.failed}`), [], `${name}: no write failed`);
      const x = path.join(dir, `x-${name}`);
      fs.mkdirSync(x);
      await sh(`tar -xSf '${String(done.output)}' -C '${x}'`);
      const check = checkSnapshot(path.join(x, 'disk.img'), size, w.records, b.launchedAt, a.receivedAt);
      t.deepEqual(check.problems, [], `${name}: the archive is its own volume at its instant`);
      t.deepEqual(checkFinal(v, w.records).problems, [], `${name}: every acknowledged write on the volume`);
      t.log(`${name}: ${done.blocksSavedByWriters} originals sent, ${check.fromWrites} blocks from writes in the image; ${Number(done.durationMs).toFixed(0)} ms`);
    }
  } finally {
    w0.abandon(); w1.abandon();
  }
});

testIf(needs)('--run whose program fails: the host job fails with its exit status, the export keeps serving', async (t) => {
  const { dir, served, key, ap } = await setUpWith(t, 'appliance-runfail-', 64, (d) => ['--run', `nbdcopy {uri} ${path.join(d, 'no-such-dir', 'x.img')}`]);
  const r = await startBackup(t, ['lun0', '--to', `appliance://${ap.address}`, '--key', key, '--control', served.control]).exit;
  t.not(r.status, 0);
  t.regex(r.stderr, /--run program exited with status [1-9]\d*: the instant was not backed up/);
  const st = await served.status();
  t.is(st.exports[0]?.name, 'lun0');
  t.is(st.exports[0]?.job ?? null, null);
  t.log(r.stderr.trim().split('\n')[0]);
  t.false(fs.existsSync(path.join(dir, 'no-such-dir')));
});
