// Many at once (issue 20, part 4). (a) One daemon serving 100 exports, a client writing on every one,
// 10 of them backed up at once by 10 `livesnap backup NAME --to FILE.img` started together while
// everything keeps writing. (b) One appliance, in a network namespace, fed by 10 hosts at once (10
// daemons, each serving its own volume, backing up to appliance:// at the same moment). Every image
// and archive is exactly its volume at its instant (self-describing sectors), every acknowledged
// write is on its volume, no write fails; the daemons' and the appliance's RSS and CPU are logged.
//
// The clients: on each backed-up export (and each appliance host) one qemu-io process writing
// back to back (SelfDescribingWriters, the client of the other online tests). On the other 90
// exports of (a) a lighter client in this process, one NBD connection each (helpers/nbd-raw.ts's
// negotiation), writing 1-4 self-describing blocks at QD1 with a pause between writes, its writes
// recorded the same way so checkFinal judges them too. 100 qemu-io processes at once would measure
// qemu-io more than the daemon on this 2-core machine: beside the rest, the 10 here get ~30 writes/s each.
//
// (b) runs the 10 host daemons on this side of one veth pair: the appliance tells hosts apart by
// their unit (the export name) and each has its own TLS connection, unit and LUN, so 10 network
// namespaces would add 10 network stacks and no code path of livesnap's.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { keyFile, outputOf, startAppliance, twoHosts } from './helpers/appliance';
import { attach, type RawClient } from './helpers/nbd-raw';
import {
  type BackupRun, checkFinal, checkSnapshot, cli, fillSectors, lastJsonOf, now, SelfDescribingWriters, type Served, serialIf as testIf,
  serveDevice, sh, sleep, startBackup, waitUntil, type WriteRecord,
} from './helpers/online';
import { loopDevice, rng, scratchDir, seedFromEnv, sparseFile } from './helpers/system';
import { call } from '../src/control/client';
import * as P from '../src/nbd/protocol';
import { encodeRequest } from '../src/nbd/transmission';

const MiB = 1 << 20;
const EXPORTS = 100;
const BACKED_UP = 10;
const HOSTS = 10;

// ---------------------------------------------------------------------------------------------
// What a process costs, from /proc

interface Usage { rssKiB: number; hwmKiB: number; cpuS: number; threads: number; fds: number }

function usage(pid: number): Usage {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? NaN);
  // utime and stime are fields 14 and 15; the command name (field 2) may hold spaces: count after ')'.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(rest[11]) + Number(rest[12]);
  return { rssKiB: field('VmRSS'), hwmKiB: field('VmHWM'), cpuS: ticks / 100, threads: field('Threads'), fds: fs.readdirSync(`/proc/${pid}/fd`).length };
}

const mib = (kib: number) => `${(kib / 1024).toFixed(1)} MiB`;

/** Samples a process's RSS every 100 ms until stopped: the highest seen. */
function sampleRss(pid: number): { stop(): number } {
  let peak = 0;
  const tick = () => { try { peak = Math.max(peak, usage(pid).rssKiB); } catch { /* gone */ } };
  tick();
  const timer = setInterval(tick, 100);
  return { stop: () => { clearInterval(timer); tick(); return peak; } };
}

// ---------------------------------------------------------------------------------------------
// The light client: one NBD connection at QD1, 1-4 self-describing 4 KiB blocks per write, a pause
// between writes. Its records have the SelfDescribingWriters form (checkFinal reads them).

class LightWriter {
  readonly records: WriteRecord[] = [];
  private seq = 0;
  private stopping = false;
  private loop?: Promise<void>;
  private c?: RawClient;
  error?: string;

  constructor(private readonly socket: string, private readonly name: string, private readonly size: number, private readonly r: () => number, private readonly writer: number, private readonly pauseMs: number) {}

  async start(): Promise<void> {
    this.c = (await attach(this.socket, { name: this.name })).c;
    this.loop = this.run(this.c);
  }

  private async run(c: RawClient): Promise<void> {
    const bs = 4096;
    let cookie = 0;
    while (!this.stopping) {
      const length = (1 + Math.floor(this.r() * 4)) * bs;
      const offset = Math.floor(this.r() * ((this.size - length) / bs + 1)) * bs;
      const seq = ++this.seq;
      const data = fillSectors(Buffer.allocUnsafe(length), offset, seq, this.writer);
      const rec: WriteRecord = { seq, writer: this.writer, offset, length, start: now() };
      this.records.push(rec);
      c.write(Buffer.concat([encodeRequest(P.NBD_CMD_WRITE, 0, ++cookie, offset, length), data]));
      try {
        // A write may wait for the snapshot (up to --write-wait-limit, 30 s): give it longer.
        const reply = await c.read(16, 60_000);
        if (reply.readUInt32BE(0) !== P.NBD_SIMPLE_REPLY_MAGIC) throw new Error(`bad reply magic 0x${reply.readUInt32BE(0).toString(16)}`);
        if (reply.readUInt32BE(12) !== cookie) throw new Error(`reply for cookie ${reply.readUInt32BE(12)}, sent ${cookie}`);
        const err = reply.readUInt32BE(4);
        if (err !== 0) throw new Error(`NBD error ${err}`);
        rec.ack = now();
      } catch (e) {
        rec.failed = (e as Error).message;
        this.error = rec.failed;
        return;
      }
      await sleep(this.pauseMs);
    }
  }

  get acked(): number { return this.records.filter((w) => w.ack !== undefined).length; }

  /** Stops after the write in flight, then disconnects (NBD_CMD_DISC). */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.loop;
    if (this.c && !this.c.closed) {
      this.c.write(encodeRequest(P.NBD_CMD_DISC, 0, 0, 0, 0));
      await this.c.untilClosed(5000);
    }
    this.c?.destroy();
  }

  abandon(): void { this.stopping = true; this.c?.destroy(); }
}

// ---------------------------------------------------------------------------------------------

interface Export { name: string; vol: string; socket: string; uri: string }

/** Runs `fn` over `items`, at most `n` at a time. */
async function pool<T, R>(items: T[], n: number, fn: (x: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, async () => {
    while (next < items.length) { const i = next++; out[i] = await fn(items[i]!, i); }
  }));
  return out;
}

function failedWrites(records: WriteRecord[]): string[] {
  return records.filter((w) => w.failed).map((w) => `#${w.seq}: ${w.failed}`);
}

testIf({ root: true, commands: ['qemu-io'] })(`one daemon, ${EXPORTS} exports each with a client writing, ${BACKED_UP} backed up at once: every image is its export's instant, every acknowledged write on its volume, no write failed; RSS and CPU logged`, async (t) => {
  const r = rng(seedFromEnv(t));
  const dir = scratchDir(t, 'many-exports-');
  const size = 16 * MiB;
  const names = Array.from({ length: EXPORTS }, (_, i) => `e${String(i).padStart(2, '0')}`);
  for (const n of names) sparseFile(path.join(dir, `${n}.raw`), size);

  // The first serve starts the daemon; every further serve with the same --control adds an export
  // to it. The 10 backed-up exports are served with the CLI; the other 90 with the very request the
  // CLI sends (its "serve" on the control socket), to save 90 CLI start-ups (~0.2 s of CPU each here).
  const t0 = now();
  const first: Served = await serveDevice(t, dir, path.join(dir, `${names[0]}.raw`), names[0]!);
  const exports: Export[] = [{ name: first.name, vol: path.join(dir, `${first.name}.raw`), socket: first.socket, uri: first.uri }];
  const viaCli = await pool(names.slice(1, BACKED_UP), 3, async (n) => {
    const res = await cli(['serve', path.join(dir, `${n}.raw`), '--name', n, '--control', first.control, '--state', path.join(first.runDir, `state-${n}`), '--json']);
    if (res.status !== 0) throw new Error(`livesnap serve ${n} failed (${res.status}): ${res.stderr}\n${first.logTail()}`);
    return lastJsonOf(res.stdout);
  });
  const viaControl = await pool(names.slice(BACKED_UP), 4, (n) => call(first.control, { op: 'serve', device: path.join(dir, `${n}.raw`), name: n, state: path.join(first.runDir, `state-${n}`) }));
  for (const [i, res] of [...viaCli, ...viaControl].entries()) exports.push({ name: names[i + 1]!, vol: path.join(dir, `${names[i + 1]}.raw`), socket: String(res.socket), uri: String(res.uri) });
  const servedMs = now() - t0;
  const st = await first.status();
  t.is(st.pid, first.pid, 'one daemon');
  t.deepEqual(st.exports.map((e) => e.name).sort(), names, `the daemon serves all ${EXPORTS} exports`);
  const pid = first.pid;
  const idle0 = usage(pid);
  await sleep(3000);
  const idle1 = usage(pid);
  t.log(`${EXPORTS} exports of ${size / MiB} MiB served in ${(servedMs / 1000).toFixed(1)} s; idle, no client: RSS ${mib(idle1.rssKiB)}, ${idle1.threads} threads, ${idle1.fds} fds; CPU ${(idle1.cpuS - idle0.cpuS).toFixed(2)} s in 3 s (${((idle1.cpuS - idle0.cpuS) / 3 / EXPORTS * 1000).toFixed(2)} ms per export per second)`);

  // The clients.
  const heavy = exports.slice(0, BACKED_UP).map((e) => new SelfDescribingWriters(t, path.join(dir, 'src', e.name), e.uri, size, r, { writers: 1, maxBlocks: 8 }));
  const light = exports.slice(BACKED_UP).map((e, i) => new LightWriter(e.socket, e.name, size, r, 1000 + i, 20));
  try {
    for (const w of heavy) w.start();
    await pool(light, 10, (w) => w.start());
    await Promise.all(heavy.map((w) => w.acked(200, 60_000)));
    await waitUntil(() => light.every((w) => w.acked >= 20 || w.error !== undefined), 60_000, 'every light client to have 20 writes acknowledged');
    const acks = () => heavy.reduce((s, w) => s + w.records.filter((x) => x.ack !== undefined).length, 0) + light.reduce((s, w) => s + w.acked, 0);
    const load0 = usage(pid), loadAcks0 = acks(), loadT0 = now();
    await sleep(3000);
    const load1 = usage(pid), loadAcks1 = acks(), loadS = (now() - loadT0) / 1000;
    const loadCpuRate = (load1.cpuS - load0.cpuS) / loadS;
    t.log(`all ${EXPORTS} clients writing (${BACKED_UP} qemu-io back to back, ${EXPORTS - BACKED_UP} light at QD1 with 20 ms pauses): ${((loadAcks1 - loadAcks0) / loadS).toFixed(0)} writes/s acknowledged; daemon RSS ${mib(load1.rssKiB)} (HWM ${mib(load1.hwmKiB)}), CPU ${(loadCpuRate * 100).toFixed(0)} % of a core (${(loadCpuRate / EXPORTS * 1000).toFixed(2)} ms per export per second)`);

    // 10 backups at once, the writers going on. A 16 MiB volume copies in ~0.1 s: --max-rate 8M makes
    // each last ~2 s, so writers meet blocks not yet copied (copy-before-write saves originals).
    const rss = sampleRss(pid);
    const b0 = usage(pid), bT0 = now();
    const backups: BackupRun[] = exports.slice(0, BACKED_UP).map((e) => startBackup(t, [e.name, '--to', path.join(dir, `${e.name}.img`), '--control', first.control, '--max-rate', '8M']));
    const armed = await Promise.all(backups.map((b) => b.armed));
    const results = await Promise.all(backups.map((b) => b.exit));
    const b1 = usage(pid), bS = (now() - bT0) / 1000;
    const peak = rss.stop();
    await sleep(150);
    const after = usage(pid);
    await Promise.all(light.map((w) => w.stop()));
    const codes = await Promise.all(heavy.map((w) => w.stop()));
    const stopped = usage(pid);

    for (const [i, res] of results.entries()) t.is(res.status, 0, `backup of ${exports[i]!.name}: ${res.stderr}\n${first.logTail()}`);
    t.deepEqual(codes.flat(), codes.flat().map(() => 0), 'every qemu-io exited 0');
    t.deepEqual([...heavy, ...light].flatMap((w) => failedWrites(w.records)), [], 'no write failed');
    const dones = results.map((res) => res.lines[res.lines.length - 1] ?? {});
    const backupCpu = b1.cpuS - b0.cpuS;
    const saved = dones.map((d) => Number(d.blocksSavedByWriters ?? 0));
    t.true(saved.reduce((a, x) => a + x, 0) > 0, 'writers hit blocks not yet copied: copy-before-write saved originals');
    t.log(`${BACKED_UP} backups at once: all done in ${bS.toFixed(1)} s (each ${dones.map((d) => (Number(d.durationMs) / 1000).toFixed(1)).join(', ')} s; worst write delay ${Math.max(...dones.map((d) => Number(d.worstWriteDelayMs))).toFixed(0)} ms; originals saved by writers ${saved.join(', ')})`);
    t.log(`daemon during the backups: RSS peak ${mib(peak)} (VmHWM ${mib(b1.hwmKiB)}), CPU ${backupCpu.toFixed(2)} s in ${bS.toFixed(1)} s = ${(backupCpu / bS * 100).toFixed(0)} % of a core; above the writers' own rate ${((backupCpu - loadCpuRate * bS) / BACKED_UP).toFixed(2)} s per backup; after them RSS ${mib(after.rssKiB)}; clients gone: RSS ${mib(stopped.rssKiB)}, ${stopped.fds} fds`);

    // Exactness: each image is its export at its instant; every acknowledged write on every volume.
    for (const [i, e] of exports.slice(0, BACKED_UP).entries()) {
      const check = checkSnapshot(path.join(dir, `${e.name}.img`), size, heavy[i]!.records, backups[i]!.launchedAt, armed[i]!.receivedAt);
      t.deepEqual(check.problems, [], `${e.name}.img is ${e.name} at the instant of arming`);
      t.true(check.fromWrites > 0 && check.inWrites > 0, `${e.name}: the image holds writes from before the backup`);
      t.true(heavy[i]!.records.some((w) => w.ack !== undefined && w.start > armed[i]!.receivedAt), `${e.name}: writes went on during its backup`);
    }
    for (const [i, e] of exports.entries()) {
      const records = i < BACKED_UP ? heavy[i]!.records : light[i - BACKED_UP]!.records;
      t.deepEqual(checkFinal(e.vol, records).problems, [], `${e.name} holds every acknowledged write`);
    }
    t.log(`writes acknowledged: ${heavy.reduce((s, w) => s + w.records.length, 0)} by the ${BACKED_UP} qemu-io clients, ${light.reduce((s, w) => s + w.acked, 0)} by the ${EXPORTS - BACKED_UP} light ones`);
  } finally {
    for (const w of heavy) w.abandon();
    for (const w of light) w.abandon();
    if (t.passed === false) t.log(first.logTail());
  }
});

testIf({ root: true, commands: ['qemu-io', 'ip', 'tar'] })(`one appliance fed by ${HOSTS} hosts at once: every archive is its volume's instant, every acknowledged write on its volume, no write failed; the appliance's RSS and CPU logged`, async (t) => {
  const r = rng(seedFromEnv(t));
  const dir = scratchDir(t, 'many-appliance-');
  const size = 32 * MiB;
  // Ten hosts: ten daemons, each its own control socket and export, all on this side of the one
  // veth pair (the appliance tells hosts apart by their unit, the export name, not by address).
  const hosts = await Promise.all(Array.from({ length: HOSTS }, async (_, i) => {
    const hdir = path.join(dir, `h${i}`);
    fs.mkdirSync(hdir, { recursive: true });
    const vol = sparseFile(path.join(hdir, 'vol.raw'), size);
    return { name: `h${i}`, dir: hdir, vol, served: await serveDevice(t, hdir, vol, `h${i}`) };
  }));
  const ns = twoHosts(t);
  const key = await keyFile(dir);
  const luns = Object.fromEntries(hosts.map((h) => [h.name, loopDevice(t, h.vol, { readOnly: true, directIo: true })]));
  const apControl = path.join(dir, 'ap.sock');
  const ap = await startAppliance(t, ns, { key, luns, store: path.join(dir, 'store'), args: ['--control', apControl] });
  const apStatus = await cli(['status', '--control', apControl, '--json']);
  t.is(apStatus.status, 0, apStatus.stderr);
  const apPid = Number(lastJsonOf(apStatus.stdout).pid);
  const writers = hosts.map((h) => new SelfDescribingWriters(t, path.join(h.dir, 'src'), h.served.uri, size, r, { writers: 1, maxBlocks: 8 }));
  try {
    for (const w of writers) w.start();
    await Promise.all(writers.map((w) => w.acked(150, 60_000)));
    const ap0 = usage(apPid);
    const hosts0 = hosts.map((h) => usage(h.served.pid));
    const rss = sampleRss(apPid);
    const t0 = now();
    const backups = hosts.map((h) => startBackup(t, [h.name, '--to', `appliance://${ap.address}`, '--key', key, '--control', h.served.control]));
    const armed = await Promise.all(backups.map((b) => b.armed));
    const results = await Promise.all(backups.map((b) => b.exit));
    const s = (now() - t0) / 1000;
    const peak = rss.stop();
    const ap1 = usage(apPid);
    const hosts1 = hosts.map((h) => usage(h.served.pid));
    await sleep(150);
    const codes = await Promise.all(writers.map((w) => w.stop()));

    for (const [i, res] of results.entries()) t.is(res.status, 0, `backup of ${hosts[i]!.name}: ${res.stderr}\n${hosts[i]!.served.logTail()}\n${ap.log()}`);
    t.deepEqual(codes.flat(), codes.flat().map(() => 0), 'every qemu-io exited 0');
    t.deepEqual(writers.flatMap((w) => failedWrites(w.records)), [], 'no write failed');
    const dones = results.map((res) => res.lines[res.lines.length - 1] ?? {});
    const hostCpu = hosts1.reduce((a, u, i) => a + u.cpuS - hosts0[i]!.cpuS, 0);
    t.log(`${HOSTS} appliance backups of ${size / MiB} MiB at once: all done in ${s.toFixed(1)} s (each ${dones.map((d) => (Number(d.durationMs) / 1000).toFixed(1)).join(', ')} s); originals sent ${dones.reduce((a, d) => a + Number(d.blocksSavedByWriters ?? 0), 0)}; worst write delay ${Math.max(...dones.map((d) => Number(d.worstWriteDelayMs))).toFixed(0)} ms`);
    t.log(`appliance: RSS ${mib(ap0.rssKiB)} before, peak ${mib(peak)} (VmHWM ${mib(ap1.hwmKiB)}), ${mib(ap1.rssKiB)} after; CPU ${(ap1.cpuS - ap0.cpuS).toFixed(2)} s in ${s.toFixed(1)} s (${((ap1.cpuS - ap0.cpuS) / HOSTS).toFixed(2)} s per host); the ${HOSTS} host daemons: RSS ${mib(Math.max(...hosts1.map((u) => u.hwmKiB)))} peak each at most, CPU ${hostCpu.toFixed(2)} s together`);

    for (const [i, h] of hosts.entries()) {
      const x = path.join(h.dir, 'x');
      fs.mkdirSync(x);
      await sh(`tar -xSf '${outputOf(dones[i]!)}' -C '${x}'`);
      const check = checkSnapshot(path.join(x, 'disk.img'), size, writers[i]!.records, backups[i]!.launchedAt, armed[i]!.receivedAt);
      t.deepEqual(check.problems, [], `the appliance's archive of ${h.name} is its volume at the instant of arming`);
      t.true(check.fromWrites > 0 && check.inWrites > 0, `${h.name}: the archive holds writes from before the backup`);
      t.deepEqual(checkFinal(h.vol, writers[i]!.records).problems, [], `${h.name} holds every acknowledged write`);
      fs.rmSync(x, { recursive: true, force: true });
    }
    t.log(`appliance after the checks (${((now() - t0) / 1000 - s).toFixed(1)} s later): RSS ${mib(usage(apPid).rssKiB)}`);
  } finally {
    for (const w of writers) w.abandon();
    if (t.passed === false) t.log(ap.log());
  }
});
