// The NBD server to the letter of doc/proto.md, checked with a raw client of our own and with
// libnbd (python3-libnbd), nbdinfo, nbdcopy and qemu-img: replies after NBD_CMD_DISC and a half-close,
// deep pipelines, structured replies, metadata contexts and block status.
import test, { type ExecutionContext } from 'ava';
import { execFile, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { Device } from '../src/device/device';
import { usedBlockExtents } from '../src/nbd/allocation';
import { heapBuffer, type NbdBackend } from '../src/nbd/backend';
import { DeviceBackend } from '../src/nbd/device-backend';
import * as P from '../src/nbd/protocol';
import { createNbdServer, type NbdServer } from '../src/nbd/server';
import { encodeRequest } from '../src/nbd/transmission';
import { Bitset } from '../src/util/bitset';
import { attach, countReplies, LIBNBD_DISC, metaData, option, RawClient } from './helpers/nbd-raw';
import { testIf } from './helpers/skip';
import { scratchDir, sparseFile, which } from './helpers/system';

const exec = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;
const PY = fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const hasLibnbdPython = spawnSync(PY, ['-c', 'import nbd'], { stdio: 'ignore' }).status === 0;

interface Served { server: NbdServer; sock: string; file: string; dir: string; logs: string[]; tcp?: { host: string; port: number }; device: Device }

async function serveFile(t: ExecutionContext, opts: { size?: number; direct?: boolean; tcp?: boolean; file?: string } = {}): Promise<Served> {
  const dir = scratchDir(t, 'nbdp-');
  const file = opts.file ?? sparseFile(path.join(dir, 'disk.img'), opts.size ?? 64 * MiB);
  const logs: string[] = [];
  const server = createNbdServer({ log: (l, m) => logs.push(`${l} ${m}`) });
  const device = Device.open(file, { write: true, direct: opts.direct ?? true });
  t.teardown(async () => { await server.close(); device.close(); });
  server.addExport('disk', new DeviceBackend(device));
  const sock = path.join(dir, 'nbd.sock');
  await server.listenUnix(sock);
  const tcp = opts.tcp ? { host: '127.0.0.1', port: await server.listenTcp('127.0.0.1', 0) } : undefined;
  return { server, sock, file, dir, logs, tcp, device };
}

function pattern(round: number, i: number, len: number): Buffer {
  const b = Buffer.alloc(len, ((round * 64 + i) % 255) + 1);
  b.writeUInt32BE(round * 1000 + i, 0);
  return b;
}

/** 64 pipelined 64 KiB writes, NBD_CMD_DISC, then shutdown(SHUT_WR): what libnbd's nbd_shutdown does. */
async function discRound(t: ExecutionContext, target: string | { host: string; port: number }, file: string, round: number): Promise<void> {
  const { c } = await attach(target);
  const parts: Buffer[] = [];
  for (let i = 0; i < 64; i++) parts.push(encodeRequest(P.NBD_CMD_WRITE, 0, i, i * 64 * KiB, 64 * KiB), pattern(round, i, 64 * KiB));
  parts.push(encodeRequest(P.NBD_CMD_DISC, 0, 99, 0, 0));
  const counted = countReplies(c.s, 64);
  c.s.end(Buffer.concat(parts)); // write everything, then half-close
  const got = await counted;
  t.true(await c.untilClosed(5000), `round ${round}: the server closed the connection after DISC`);
  t.is(got.replies, 64, `round ${round}: every reply arrived before the close`);
  t.is(got.errors, 0);
  // Right after the close, every write is in the file.
  const data = fs.readFileSync(file);
  let bad = 0;
  for (let i = 0; i < 64; i++) if (!data.subarray(i * 64 * KiB, (i + 1) * 64 * KiB).equals(pattern(round, i, 64 * KiB))) bad++;
  t.is(bad, 0, `round ${round}: ${bad} of 64 writes not on the device right after the close`);
  c.destroy();
}

test('DISC with 64 writes in flight and a half-close: all 64 replies, all data on the device (unix, 10 rounds)', async (t) => {
  const s = await serveFile(t, { size: 8 * MiB });
  for (let r = 0; r < 10; r++) await discRound(t, s.sock, s.file, r);
  t.is(s.server.stats().inflight, 0);
});

test('DISC with 64 writes in flight and a half-close: all 64 replies, all data on the device (TCP, 10 rounds)', async (t) => {
  const s = await serveFile(t, { size: 8 * MiB, tcp: true });
  for (let r = 0; r < 10; r++) await discRound(t, s.tcp!, s.file, r);
});


const withLibnbdPython: (title: string, fn: (t: ExecutionContext) => Promise<void>) => void = hasLibnbdPython ? test : (title: string, _fn: (t: ExecutionContext) => Promise<void>) => {
  console.log(`# SKIP ${title}: needs python3-libnbd (see .ci/run)`);
  test.skip(`${title} (skipped: needs python3-libnbd)`, () => {});
};

withLibnbdPython('libnbd: 64 aio writes then nbd_shutdown, 10 rounds: every write completes without ENOTCONN and is on the device', async (t) => {
  const s = await serveFile(t, { size: 8 * MiB });
  for (let r = 0; r < 10; r++) {
    const out = JSON.parse((await exec(PY, ['-c', LIBNBD_DISC, `nbd+unix:///disk?socket=${s.sock}`, String(r)])).stdout) as { ok: number; failed: string[] };
    t.deepEqual(out, { ok: 64, failed: [] }, `round ${r}`);
    const data = fs.readFileSync(s.file);
    let bad = 0;
    for (let i = 0; i < 64; i++) if (!data.subarray(i * 64 * KiB, (i + 1) * 64 * KiB).equals(pattern(r, i, 64 * KiB))) bad++;
    t.is(bad, 0, `round ${r}: writes missing right after nbd_shutdown returned`);
  }
});

/** 65,536 pipelined 1 KiB writes on one connection; resolves with the seconds until the last reply. */
async function pipeline(target: string | { host: string; port: number }, n: number): Promise<number> {
  const { c } = await attach(target);
  const reqs = Buffer.alloc(n * (P.REQUEST_HEADER_SIZE + KiB));
  for (let i = 0; i < n; i++) {
    const at = i * (P.REQUEST_HEADER_SIZE + KiB);
    encodeRequest(P.NBD_CMD_WRITE, 0, i, i * KiB, KiB).copy(reqs, at);
    reqs.fill((i % 251) + 1, at + P.REQUEST_HEADER_SIZE, at + P.REQUEST_HEADER_SIZE + KiB);
    reqs.writeUInt32BE(i, at + P.REQUEST_HEADER_SIZE);
  }
  const started = process.hrtime.bigint();
  const counted = countReplies(c.s, n);
  c.s.write(reqs);
  const got = await Promise.race([counted, new Promise<never>((_, rej) => setTimeout(() => rej(new Error('no answer within 120 s')), 120_000))]);
  const secs = Number(process.hrtime.bigint() - started) / 1e9;
  if (got.replies !== n || got.errors) throw new Error(`${got.replies}/${n} replies, ${got.errors} errors`);
  c.s.write(encodeRequest(P.NBD_CMD_DISC, 0, 0, 0, 0));
  c.s.end();
  await c.untilClosed();
  return secs;
}

function checkPipelined(file: string, n: number): number {
  const data = fs.readFileSync(file);
  let bad = 0;
  for (let i = 0; i < n; i++) {
    const b = data.subarray(i * KiB, (i + 1) * KiB);
    if (b.readUInt32BE(0) !== i || b[4] !== (i % 251) + 1 || b[KiB - 1] !== (i % 251) + 1) bad++;
  }
  return bad;
}

async function nbdkit(t: ExecutionContext, file: string, where: { sock?: string; port?: number }): Promise<void> {
  const args = ['--foreground', '--exit-with-parent', ...(where.sock ? ['-U', where.sock] : ['-i', '127.0.0.1', '-p', String(where.port)]), '-e', 'disk', 'file', file];
  const p = spawn('nbdkit', args, { stdio: 'ignore' });
  t.teardown(() => { p.kill('SIGTERM'); });
  for (let i = 0; i < 100; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const s = where.sock ? net.connect(where.sock) : net.connect(where.port!, '127.0.0.1');
      s.once('connect', () => { s.destroy(); resolve(true); });
      s.once('error', () => resolve(false));
    });
    if (up) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('nbdkit did not start');
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => { const p = (s.address() as net.AddressInfo).port; s.close(() => resolve(p)); });
  });
}

testIf({ commands: ['nbdkit'] }, { serial: true })('65,536 pipelined 1 KiB writes on one connection (unix and TCP): within 5x nbdkit + 2 s, every byte lands', async (t) => {
  const n = 65536;
  for (const kind of ['unix', 'tcp'] as const) {
    // livesnap through the page cache, as nbdkit's file plugin writes.
    const s = await serveFile(t, { size: 64 * MiB, direct: false, tcp: kind === 'tcp' });
    const ls = await pipeline(kind === 'tcp' ? s.tcp! : s.sock, n);
    t.is(checkPipelined(s.file, n), 0, `${kind}: livesnap: every write at its place`);
    const kfile = sparseFile(path.join(s.dir, 'nbdkit.img'), 64 * MiB);
    const ksock = path.join(s.dir, 'nbdkit.sock');
    const port = kind === 'tcp' ? await freePort() : 0;
    await nbdkit(t, kfile, kind === 'tcp' ? { port } : { sock: ksock });
    const nk = await pipeline(kind === 'tcp' ? { host: '127.0.0.1', port } : ksock, n);
    t.is(checkPipelined(kfile, n), 0, `${kind}: nbdkit: every write at its place`);
    t.log(`${kind}: livesnap ${ls.toFixed(2)} s, nbdkit ${nk.toFixed(2)} s for ${n} pipelined 1 KiB writes`);
    t.true(ls <= 5 * nk + 2, `${kind}: livesnap took ${ls.toFixed(2)} s, nbdkit ${nk.toFixed(2)} s`);
  }
});

/** An export whose allocation comes from a used-block map: used blocks are data, free blocks holes that read as zeroes. */
function mappedBackend(size: number, blockSize: number, used: Bitset): NbdBackend {
  return {
    size, minBlockSize: 512, preferredBlockSize: 4096, maxBlockSize: 1 * MiB, readOnly: true,
    async read(o, l) {
      const b = Buffer.alloc(l);
      // Used blocks read as 0xdd, free ones as zeroes (so the zero flag tells the truth).
      for (let p = o; p < o + l;) {
        const blk = Math.floor(p / blockSize);
        const end = Math.min(o + l, (blk + 1) * blockSize);
        if (used.get(blk)) b.fill(0xdd, p - o, end - o);
        p = end;
      }
      return heapBuffer(b);
    },
    async write() { throw new Error('read-only'); },
    async flush() {},
    async trim() {},
    async writeZeroes() {},
    async extents(o, l) { return usedBlockExtents(used, { blockSize, exportSize: size, freeReadsAsZero: true }, o, l); },
  };
}

test('negotiation: structured replies, LIST/SET_META_CONTEXT base:allocation, and what is refused', async (t) => {
  const s = await serveFile(t, { size: 4 * MiB });
  const c = await RawClient.connect(s.sock);
  await c.read(18);
  c.write(Buffer.from([0, 0, 0, 3]));
  // Meta contexts before structured replies: ERR_INVALID.
  c.write(option(P.NBD_OPT_LIST_META_CONTEXT, metaData('disk', [])));
  t.is((await c.optionReply()).type, P.NBD_REP_ERR_INVALID);
  c.write(option(P.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x')));
  t.is((await c.optionReply()).type, P.NBD_REP_ERR_INVALID, 'STRUCTURED_REPLY with data');
  c.write(option(P.NBD_OPT_STRUCTURED_REPLY));
  t.is((await c.optionReply()).type, P.NBD_REP_ACK);
  const list = async (queries: string[], name = 'disk'): Promise<Array<{ type: number; text: string }>> => {
    c.write(option(P.NBD_OPT_LIST_META_CONTEXT, metaData(name, queries)));
    const out: Array<{ type: number; text: string }> = [];
    for (;;) {
      const r = await c.optionReply();
      out.push({ type: r.type, text: r.type === P.NBD_REP_META_CONTEXT ? r.data.toString('utf8', 4) : '' });
      if (r.type !== P.NBD_REP_META_CONTEXT) return out;
    }
  };
  t.deepEqual(await list([]), [{ type: P.NBD_REP_META_CONTEXT, text: 'base:allocation' }, { type: P.NBD_REP_ACK, text: '' }]);
  t.deepEqual(await list(['base:']), [{ type: P.NBD_REP_META_CONTEXT, text: 'base:allocation' }, { type: P.NBD_REP_ACK, text: '' }]);
  t.deepEqual(await list(['qemu:dirty-bitmap:x', 'base:nonesuch']), [{ type: P.NBD_REP_ACK, text: '' }]);
  t.deepEqual(await list([], 'nope'), [{ type: P.NBD_REP_ERR_UNKNOWN, text: '' }]);
  // A query count the data cannot hold, a query running past the end.
  const bad = metaData('disk', ['base:allocation']);
  bad.writeUInt32BE(1_000_000, 8);
  c.write(option(P.NBD_OPT_SET_META_CONTEXT, bad));
  t.is((await c.optionReply()).type, P.NBD_REP_ERR_INVALID);
  const short = metaData('disk', ['base:allocation']);
  short.writeUInt32BE(100, 12);
  c.write(option(P.NBD_OPT_SET_META_CONTEXT, short));
  t.is((await c.optionReply()).type, P.NBD_REP_ERR_INVALID);
  c.write(option(P.NBD_OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
  const mc = await c.optionReply();
  t.is(mc.type, P.NBD_REP_META_CONTEXT);
  t.is(mc.data.toString('utf8', 4), 'base:allocation');
  t.not(mc.data.readUInt32BE(0), 0);
  t.is((await c.optionReply()).type, P.NBD_REP_ACK);
  c.destroy();
});

test('transmission with structured replies: READ as OFFSET_DATA, errors as ERROR chunks with a message, CACHE, BLOCK_STATUS only after SET_META_CONTEXT', async (t) => {
  const s = await serveFile(t, { size: 4 * MiB });
  fs.writeFileSync(s.file, Buffer.alloc(8192, 0x42), { flag: 'r+' });
  const { c, flags } = await attach(s.sock, { structured: true });
  t.truthy(flags & P.NBD_FLAG_SEND_DF);
  t.truthy(flags & P.NBD_FLAG_SEND_CACHE);
  c.write(encodeRequest(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 1, 4096, 4096));
  const r = await c.chunk();
  t.like(r, { structured: true, type: P.NBD_REPLY_TYPE_OFFSET_DATA, flags: P.NBD_REPLY_FLAG_DONE, cookie: 1 });
  t.is(r.payload.readUInt32BE(4), 4096, 'offset of the data');
  t.true(r.payload.subarray(8).equals(Buffer.alloc(4096, 0x42)));
  // A READ may never get a simple reply once structured replies are on, errors included.
  c.write(encodeRequest(P.NBD_CMD_READ, 0, 2, 4 * MiB - 512, 1024));
  const e = await c.chunk();
  t.like(e, { structured: true, type: P.NBD_REPLY_TYPE_ERROR, flags: P.NBD_REPLY_FLAG_DONE, cookie: 2, error: P.NBD_EINVAL });
  t.true(e.payload.readUInt16BE(4) > 0, 'the error carries a message');
  c.write(encodeRequest(P.NBD_CMD_READ, 0x40, 3, 0, 512));
  t.like(await c.chunk(), { type: P.NBD_REPLY_TYPE_ERROR, error: P.NBD_EINVAL, cookie: 3 });
  c.write(encodeRequest(P.NBD_CMD_CACHE, 0, 4, 0, 8192));
  t.like(await c.chunk(), { error: 0, cookie: 4 });
  c.write(encodeRequest(P.NBD_CMD_CACHE, P.NBD_CMD_FLAG_REQ_ONE, 5, 0, 8192));
  t.like(await c.chunk(), { error: P.NBD_EINVAL, cookie: 5 });
  // No metadata context selected: BLOCK_STATUS is EINVAL.
  c.write(encodeRequest(P.NBD_CMD_BLOCK_STATUS, 0, 6, 0, 4096));
  t.like(await c.chunk(), { error: P.NBD_EINVAL, cookie: 6 });
  // Writes still answer simply, which the protocol allows.
  c.write(Buffer.concat([encodeRequest(P.NBD_CMD_WRITE, 0, 7, 0, 512), Buffer.alloc(512, 1)]));
  t.like(await c.chunk(), { structured: false, error: 0, cookie: 7 });
  c.destroy();
  // Context selected for another export name than the one entered: not active.
  const other = await RawClient.connect(s.sock);
  await other.read(18);
  other.write(Buffer.from([0, 0, 0, 3]));
  other.write(option(P.NBD_OPT_STRUCTURED_REPLY));
  await other.optionReply();
  other.write(option(P.NBD_OPT_SET_META_CONTEXT, metaData('nope', [P.BASE_ALLOCATION])));
  t.is((await other.optionReply()).type, P.NBD_REP_ERR_UNKNOWN);
  other.destroy();
});

test('BLOCK_STATUS from a used-block map: free blocks are holes, exact across 2^32, REQ_ONE gives one extent', async (t) => {
  const dir = scratchDir(t, 'nbdp-');
  const bs = 4096;
  const size = 2 ** 33; // 8 GiB: blocks on both sides of 2^32 bytes (block 2^20)
  const used = new Bitset(size / bs);
  used.setRange(0, 16);
  const b32 = 2 ** 32 / bs;
  used.setRange(b32 - 2, b32 + 3); // data straddling the 4 GiB boundary
  used.set(size / bs - 1); // the very last block
  const server = createNbdServer({ exports: { disk: mappedBackend(size, bs, used) } });
  t.teardown(() => server.close());
  const sock = path.join(dir, 's.sock');
  await server.listenUnix(sock);
  const { c, contextId } = await attach(sock, { structured: true, meta: [P.BASE_ALLOCATION] });
  t.truthy(contextId);
  const status = async (cookie: number, offset: number, length: number, flags = 0) => {
    c.write(encodeRequest(P.NBD_CMD_BLOCK_STATUS, flags, cookie, offset, length));
    const r = await c.chunk();
    t.like(r, { structured: true, type: P.NBD_REPLY_TYPE_BLOCK_STATUS, flags: P.NBD_REPLY_FLAG_DONE, cookie });
    t.is(r.payload.readUInt32BE(0), contextId!);
    const out: Array<[number, number]> = [];
    for (let at = 4; at < r.payload.length; at += 8) out.push([r.payload.readUInt32BE(at), r.payload.readUInt32BE(at + 4)]);
    return out;
  };
  const HZ = P.NBD_STATE_HOLE | P.NBD_STATE_ZERO;
  t.deepEqual(await status(1, 0, 32 * bs), [[16 * bs, 0], [16 * bs, HZ]]);
  t.deepEqual(await status(2, 2 ** 32 - 4 * bs, 8 * bs), [[2 * bs, HZ], [5 * bs, 0], [bs, HZ]]);
  t.deepEqual(await status(3, 2 ** 32 - 4 * bs, 8 * bs, P.NBD_CMD_FLAG_REQ_ONE), [[2 * bs, HZ]]);
  t.deepEqual(await status(4, 2 ** 32 + 2 * bs + 512, 1024), [[1024, 0]], 'unaligned, inside a used block past 2^32');
  t.deepEqual(await status(5, size - 2 * bs, 2 * bs), [[bs, HZ], [bs, 0]]);
  c.write(encodeRequest(P.NBD_CMD_BLOCK_STATUS, 0, 6, size - bs, 2 * bs));
  t.like(await c.chunk(), { type: P.NBD_REPLY_TYPE_ERROR, error: P.NBD_EINVAL, cookie: 6 });
  c.destroy();
  if (!which('nbdinfo')) return;
  // libnbd's view: nbdinfo --map lists the same extents.
  const map = JSON.parse((await exec('nbdinfo', ['--map', '--json', `nbd+unix:///disk?socket=${sock}`])).stdout) as Array<{ offset: number; length: number; type: number }>;
  const data = map.filter((e) => e.type === 0).map((e) => [e.offset, e.length]);
  t.deepEqual(data, [[0, 16 * bs], [2 ** 32 - 2 * bs, 5 * bs], [size - bs, bs]]);
});

testIf({ commands: ['nbdinfo', 'nbdcopy', 'qemu-img'] })('a sparse backing file: nbdinfo --map shows its holes, nbdcopy and qemu-img convert keep them', async (t) => {
  const dir = scratchDir(t, 'nbdp-');
  const file = sparseFile(path.join(dir, 'src.img'), 64 * MiB);
  // Data at 1 MiB (2 MiB long) and at 40 MiB (512 KiB); the rest is holes.
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, Buffer.alloc(2 * MiB, 0x11), 0, 2 * MiB, 1 * MiB);
  fs.writeSync(fd, Buffer.alloc(512 * KiB, 0x22), 0, 512 * KiB, 40 * MiB);
  fs.closeSync(fd);
  const s = await serveFile(t, { file });
  const uri = `nbd+unix:///disk?socket=${s.sock}`;
  const map = JSON.parse((await exec('nbdinfo', ['--map', '--json', uri])).stdout) as Array<{ offset: number; length: number; type: number; description: string }>;
  const data = map.filter((e) => (e.type & 1) === 0).map((e) => [e.offset, e.length]);
  t.deepEqual(data, [[1 * MiB, 2 * MiB], [40 * MiB, 512 * KiB]], JSON.stringify(map));
  t.true(map.filter((e) => e.type !== 0).every((e) => e.type === 3), 'holes are hole+zero');
  const allocated = (f: string) => fs.statSync(f).blocks * 512;
  const viaNbdcopy = path.join(dir, 'nbdcopy.img');
  sparseFile(viaNbdcopy, 64 * MiB);
  await exec('nbdcopy', [uri, viaNbdcopy]);
  const viaQemu = path.join(dir, 'qemu.img');
  await exec('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, viaQemu]);
  const want = fs.readFileSync(file);
  for (const out of [viaNbdcopy, viaQemu]) {
    t.true(fs.readFileSync(out).equals(want), `${path.basename(out)} has the same bytes`);
    const a = allocated(out);
    t.log(`${path.basename(out)}: ${a} bytes allocated (data: ${2.5 * MiB})`);
    t.true(a <= 4 * MiB, `${path.basename(out)} kept the holes (${a} bytes allocated of 64 MiB)`);
  }
});
