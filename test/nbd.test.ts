// The NBD server with real clients on the data path: nbdinfo, qemu-io, nbdcopy. Every byte written
// through the export is checked in the backing file itself.
import test, { type ExecutionContext } from 'ava';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { Device } from '../src/device/device';
import { DeviceBackend } from '../src/nbd/device-backend';
import { createNbdServer, type NbdServer } from '../src/nbd/server';
import { testIf } from './helpers/skip';
import { scratchDir, sparseFile } from './helpers/system';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
const withClients = testIf({ commands: ['qemu-io', 'nbdinfo', 'nbdcopy'] });

interface Served { server: NbdServer; sock: string; file: string; dir: string; logs: string[]; uri: (name?: string) => string }

async function serve(t: ExecutionContext, size = 64 * MiB, extra: Record<string, number> = {}): Promise<Served> {
  const dir = scratchDir(t, 'nbd-');
  const file = sparseFile(path.join(dir, 'disk.img'), size);
  const logs: string[] = [];
  const server = createNbdServer({ log: (l, m) => logs.push(`${l} ${m}`) });
  const devs: Device[] = [];
  t.teardown(async () => { await server.close(); for (const d of devs) d.close(); });
  const dev = Device.open(file, { write: true });
  devs.push(dev);
  server.addExport('disk', new DeviceBackend(dev, { description: 'test disk' }));
  for (const [name, sz] of Object.entries(extra)) {
    const d = Device.open(sparseFile(path.join(dir, `${name}.img`), sz), { write: true });
    devs.push(d);
    server.addExport(name, new DeviceBackend(d));
  }
  const sock = path.join(dir, 'nbd.sock');
  await server.listenUnix(sock);
  return { server, sock, file, dir, logs, uri: (name = 'disk') => `nbd+unix:///${name}?socket=${sock}` };
}

async function qemuIo(uri: string, cmds: string[]): Promise<string> {
  const args = ['-f', 'raw'];
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  const r = await exec('qemu-io', args, { maxBuffer: 64 * MiB });
  const out = r.stdout + r.stderr;
  if (/Pattern verification failed|error|failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')}:\n${out}`);
  return out;
}

withClients('nbdinfo lists the exports with their sizes and block sizes; the socket is owner-only', async (t) => {
  const s = await serve(t, 64 * MiB, { second: 8 * MiB });
  t.is(fs.statSync(s.sock).mode & 0o777, 0o600);
  const list = JSON.parse((await exec('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${s.sock}`])).stdout);
  const byName = new Map<string, { 'export-size': number; description?: string }>(list.exports.map((e: { 'export-name': string }) => [e['export-name'], e]));
  t.deepEqual([...byName.keys()].sort(), ['disk', 'second']);
  t.is(byName.get('disk')!['export-size'], 64 * MiB);
  t.is(byName.get('second')!['export-size'], 8 * MiB);
  const info = JSON.parse((await exec('nbdinfo', ['--json', s.uri()])).stdout);
  const e = info.exports[0];
  t.is(e['export-size'], 64 * MiB);
  t.is(e['block_size_preferred'], 4096);
  t.is(e['block_size_maximum'], 32 * MiB);
  t.true(e['can_multi_conn']);
  t.true(e['can_fua']);
  t.true(e['can_trim']);
  t.true(e['can_zero']);
  t.false(e['is_read_only']);
  // Unknown export: a clean refusal.
  await t.throwsAsync(exec('nbdinfo', [s.uri('nope')]));
  // TCP on loopback, on request only.
  const port = await s.server.listenTcp('127.0.0.1', 0);
  const tcp = JSON.parse((await exec('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/second`])).stdout);
  t.is(tcp.exports[0]['export-size'], 8 * MiB);
});

withClients('qemu-io writes, unaligned writes, trim, write-zeroes, FUA and flush land byte-exact in the backing file', async (t) => {
  const s = await serve(t, 16 * MiB);
  const model = Buffer.alloc(16 * MiB);
  const uri = s.uri();
  await qemuIo(uri, ['write -P 0xab 0 1M', 'read -P 0xab 0 1M']);
  model.fill(0xab, 0, MiB);
  await qemuIo(uri, ['write -P 0xcd 100 1000', 'read -P 0xcd 100 1000', 'read -P 0xab 0 100', 'read -P 0xab 1100 1000']);
  model.fill(0xcd, 100, 1100);
  // Unaligned write straddling a sector boundary at both ends, and a tiny one inside one sector.
  await qemuIo(uri, ['write -P 0x5a 4000 9000', 'write -P 0x77 20001 3']);
  model.fill(0x5a, 4000, 13000);
  model.fill(0x77, 20001, 20004);
  await qemuIo(uri, ['write -P 0x11 2M 2M', 'discard 2M 1M', 'write -z 3M 64k', 'write -z 3200000 1234']);
  model.fill(0x11, 2 * MiB, 4 * MiB);
  model.fill(0, 2 * MiB, 3 * MiB); // a discarded range of a file reads back as zeroes (hole punched)
  model.fill(0, 3 * MiB, 3 * MiB + 65536);
  model.fill(0, 3200000, 3200000 + 1234);
  await qemuIo(uri, ['read -P 0 3M 64k', 'read -P 0x11 3211264 100']);
  await qemuIo(uri, ['write -f -P 0x42 5M 128k', 'flush', 'write -P 0x43 6M 4k', 'flush']);
  model.fill(0x42, 5 * MiB, 5 * MiB + 128 * 1024);
  model.fill(0x43, 6 * MiB, 6 * MiB + 4096);
  const onDisk = fs.readFileSync(s.file);
  t.is(onDisk.length, model.length);
  t.true(onDisk.equals(model), `first difference at byte ${onDisk.findIndex((b, i) => b !== model[i])}`);
  // Reading past the end is refused, and the connection stays usable.
  const r = await exec('qemu-io', ['-f', 'raw', '-c', 'read 16M 4k', '-c', 'read -P 0xab 0 4k', uri]).then((x) => x.stdout + x.stderr, (e) => String(e.stdout) + String(e.stderr));
  t.regex(r, /read 4096\/4096 bytes at offset 0/);
  const st = s.server.stats();
  t.true(st.exports.disk!.writes >= 8);
  t.true(st.bytesWritten > 3 * MiB);
});

withClients('nbdcopy of the whole export equals the backing file; concurrent clients write disjoint regions', async (t) => {
  const s = await serve(t, 32 * MiB);
  const uri = s.uri();
  const clients = 6;
  const region = 4 * MiB;
  await Promise.all(Array.from({ length: clients }, (_, i) => {
    const pat = (0x21 + i * 7) & 0xff;
    const base = i * region;
    // Each client: a big write, unaligned pieces, then verifies its own region.
    return qemuIo(uri, [`write -P ${pat} ${base} ${region}`, `write -P ${pat ^ 0xff} ${base + 777} 5000`, `aio_write -P ${pat} ${base + 1 * MiB} 64k`, 'aio_flush',
      `read -P ${pat} ${base} 777`, `read -P ${pat ^ 0xff} ${base + 777} 5000`]);
  }));
  const onDisk = fs.readFileSync(s.file);
  for (let i = 0; i < clients; i++) {
    const pat = (0x21 + i * 7) & 0xff;
    const exp = Buffer.alloc(region, pat);
    exp.fill(pat ^ 0xff, 777, 5777);
    t.true(onDisk.subarray(i * region, (i + 1) * region).equals(exp), `client ${i}'s region`);
  }
  const out = path.join(s.dir, 'copy.img');
  await exec('nbdcopy', ['--connections=4', '--requests=16', uri, out]);
  const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  t.is(sha(fs.readFileSync(out)), sha(fs.readFileSync(s.file)));
  // The client has exited; its hang-up reaches the server a moment later.
  for (let i = 0; i < 40 && s.server.stats().connections > 0; i++) await new Promise((r) => setTimeout(r, 50));
  t.is(s.server.stats().connections, 0);
});
