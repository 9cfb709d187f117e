// Hostile clients and a parser fuzz: bad input gets a clear refusal, never a crash, and the server
// keeps serving everyone else.
import test, { type ExecutionContext } from 'ava';
import { execFile } from 'node:child_process';
import * as net from 'node:net';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { heapBuffer, type NbdBackend } from '../src/nbd/backend';
import { Handshake } from '../src/nbd/handshake';
import * as P from '../src/nbd/protocol';
import { createNbdServer, type NbdServer } from '../src/nbd/server';
import { encodeRequest, RequestParser, type NbdRequest } from '../src/nbd/transmission';
import { metaData } from './helpers/nbd-raw';
import { testIf } from './helpers/skip';
import { rng, scratchDir, seedFromEnv } from './helpers/system';

const exec = promisify(execFile);
const SIZE = 4 * 1024 * 1024;

/** An in-memory export: the server logic is under test here, not the device. */
function memoryBackend(size = SIZE): NbdBackend & { mem: Buffer } {
  const mem = Buffer.alloc(size);
  return {
    mem, size, minBlockSize: 512, preferredBlockSize: 4096, maxBlockSize: 1024 * 1024, readOnly: false,
    async read(o, l) { return heapBuffer(Buffer.from(mem.subarray(o, o + l))); },
    async write(o, d) { d.copy(mem, o); },
    async flush() {},
    async trim() {},
    async writeZeroes(o, l) { mem.fill(0, o, o + l); },
  };
}

async function serve(t: ExecutionContext): Promise<{ server: NbdServer; sock: string; logs: string[]; backend: ReturnType<typeof memoryBackend> }> {
  const dir = scratchDir(t, 'nbdh-');
  const logs: string[] = [];
  const backend = memoryBackend();
  const server = createNbdServer({ exports: { disk: backend }, log: (l, m) => logs.push(`${l} ${m}`), handshakeTimeoutMs: 5000 });
  t.teardown(() => server.close());
  const sock = path.join(dir, 's.sock');
  await server.listenUnix(sock);
  return { server, sock, logs, backend };
}

/** A raw client: reads exactly what it asks for, reports when the server hangs up. */
class Raw {
  private buf = Buffer.alloc(0);
  private waiting: (() => void) | undefined;
  closed = false;
  constructor(readonly s: net.Socket) {
    s.on('data', (d) => { this.buf = Buffer.concat([this.buf, d]); this.waiting?.(); });
    s.on('close', () => { this.closed = true; this.waiting?.(); });
    s.on('error', () => {});
  }
  static connect(sock: string): Promise<Raw> {
    return new Promise((resolve, reject) => { const s = net.connect(sock, () => resolve(new Raw(s))); s.once('error', reject); });
  }
  async read(n: number, ms = 3000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed after ${this.buf.length}/${n} bytes`);
      if (Date.now() > deadline) throw new Error('timeout');
      await new Promise<void>((r) => { this.waiting = r; setTimeout(r, 50); });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  async untilClosed(ms = 3000): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) await new Promise<void>((r) => { this.waiting = r; setTimeout(r, 50); });
    return this.closed;
  }
  write(b: Buffer): void { this.s.write(b); }
  destroy(): void { this.s.destroy(); }
}

function option(opt: number, data: Buffer = Buffer.alloc(0), lenOverride?: number): Buffer {
  const h = Buffer.alloc(16);
  P.IHAVEOPT.copy(h, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(lenOverride ?? data.length, 12);
  return Buffer.concat([h, data]);
}

function goData(name: string): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.alloc(4 + n.length + 2);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  return d;
}

/** Negotiates NBD_OPT_GO for `disk`; returns the client in transmission. */
async function attach(sock: string): Promise<Raw> {
  const c = await Raw.connect(sock);
  await c.read(18);
  c.write(Buffer.from([0, 0, 0, 3]));
  c.write(option(P.NBD_OPT_GO, goData('disk')));
  for (;;) {
    const h = await c.read(20);
    const type = h.readUInt32BE(12);
    await c.read(h.readUInt32BE(16));
    if (type === P.NBD_REP_ACK) return c;
    if (type & 0x80000000) throw new Error(`GO refused: 0x${type.toString(16)}`);
  }
}

async function reply(c: Raw): Promise<{ error: number; cookie: number }> {
  const r = await c.read(16);
  if (r.readUInt32BE(0) !== P.NBD_SIMPLE_REPLY_MAGIC) throw new Error('bad reply magic');
  return { error: r.readUInt32BE(4), cookie: r.readUInt32BE(12) };
}

async function stillServes(t: ExecutionContext, sock: string): Promise<void> {
  const c = await attach(sock);
  c.write(Buffer.concat([encodeRequest(P.NBD_CMD_WRITE, 0, 77, 4096, 512), Buffer.alloc(512, 0x3c)]));
  t.deepEqual(await reply(c), { error: 0, cookie: 77 });
  c.write(encodeRequest(P.NBD_CMD_READ, 0, 78, 4096, 512));
  t.deepEqual(await reply(c), { error: 0, cookie: 78 });
  t.true((await c.read(512)).equals(Buffer.alloc(512, 0x3c)));
  c.write(encodeRequest(P.NBD_CMD_DISC, 0, 79, 0, 0));
  t.true(await c.untilClosed());
}

test('garbage handshake, unknown client flags and huge options close that connection with a logged reason', async (t) => {
  const { sock, logs } = await serve(t);
  // Garbage where the client flags and options belong.
  const g = await Raw.connect(sock);
  await g.read(18);
  g.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
  t.true(await g.untilClosed());
  // Unknown client flag bits.
  const f = await Raw.connect(sock);
  await f.read(18);
  f.write(Buffer.from([0x80, 0, 0, 1]));
  t.true(await f.untilClosed());
  // Wrong option magic.
  const m = await Raw.connect(sock);
  await m.read(18);
  m.write(Buffer.from([0, 0, 0, 1]));
  m.write(Buffer.concat([Buffer.from('IHAVEOPX'), Buffer.alloc(8)]));
  t.true(await m.untilClosed());
  // An option claiming 3 GB of payload: NBD_REP_ERR_TOO_BIG, then hang up (nothing buffered).
  const h = await Raw.connect(sock);
  await h.read(18);
  h.write(Buffer.from([0, 0, 0, 1]));
  h.write(option(P.NBD_OPT_GO, Buffer.alloc(0), 3_000_000_000));
  const rep = await h.read(20);
  t.is(rep.readUInt32BE(12), P.NBD_REP_ERR_TOO_BIG);
  t.true(await h.untilClosed());
  // Unknown option and extended headers: ERR_UNSUP, and negotiation goes on.
  const u = await Raw.connect(sock);
  await u.read(18);
  u.write(Buffer.from([0, 0, 0, 1]));
  u.write(option(999));
  const ur = await u.read(20);
  t.is(ur.readUInt32BE(12), P.NBD_REP_ERR_UNSUP);
  await u.read(ur.readUInt32BE(16));
  u.write(option(P.NBD_OPT_EXTENDED_HEADERS));
  const sr = await u.read(20);
  t.is(sr.readUInt32BE(12), P.NBD_REP_ERR_UNSUP);
  await u.read(sr.readUInt32BE(16));
  // STARTTLS on a socket without TLS: ERR_UNSUP (NOTLS mode), negotiation goes on.
  u.write(option(P.NBD_OPT_STARTTLS));
  const tr = await u.read(20);
  t.is(tr.readUInt32BE(12), P.NBD_REP_ERR_UNSUP);
  await u.read(tr.readUInt32BE(16));
  u.write(option(P.NBD_OPT_ABORT));
  t.is((await u.read(20)).readUInt32BE(12), P.NBD_REP_ACK);
  t.true(await u.untilClosed());
  const reasons = logs.filter((l) => l.includes('refused'));
  t.true(reasons.some((l) => /client flags/.test(l)), reasons.join('\n'));
  t.true(reasons.some((l) => /IHAVEOPT/.test(l)));
  t.true(reasons.some((l) => /3000000000-byte payload/.test(l)));
  await stillServes(t, sock);
});

test('bad requests get error replies and the connection continues; a bad magic or an insane write ends it', async (t) => {
  const { sock, logs, server, backend } = await serve(t);
  const c = await attach(sock);
  c.write(encodeRequest(P.NBD_CMD_READ, 0, 1, SIZE, 512));
  t.deepEqual(await reply(c), { error: P.NBD_EINVAL, cookie: 1 });
  // Longer than the maximum block size (1 MiB here): EINVAL, as the protocol says (not EOVERFLOW).
  c.write(encodeRequest(P.NBD_CMD_READ, 0, 2, 0, 2 * 1024 * 1024));
  t.deepEqual(await reply(c), { error: P.NBD_EINVAL, cookie: 2 });
  c.write(Buffer.concat([encodeRequest(P.NBD_CMD_WRITE, 0, 3, SIZE - 256, 512), Buffer.alloc(512)]));
  t.deepEqual(await reply(c), { error: P.NBD_ENOSPC, cookie: 3 });
  // A trim past the end is EINVAL (a write past the end is ENOSPC), on both sides of 2^32 and far out.
  c.write(encodeRequest(P.NBD_CMD_TRIM, 0, 4, 2 ** 60, 512));
  t.deepEqual(await reply(c), { error: P.NBD_EINVAL, cookie: 4 });
  c.write(encodeRequest(P.NBD_CMD_TRIM, 0, 41, SIZE - 512, 1024));
  t.deepEqual(await reply(c), { error: P.NBD_EINVAL, cookie: 41 });
  c.write(encodeRequest(P.NBD_CMD_TRIM, 0, 42, 2 ** 32 - 512, 1024));
  t.deepEqual(await reply(c), { error: P.NBD_EINVAL, cookie: 42 });
  c.write(encodeRequest(P.NBD_CMD_WRITE_ZEROES, 0, 43, 2 ** 32, 512));
  t.deepEqual(await reply(c), { error: P.NBD_ENOSPC, cookie: 43 });
  // A write over the maximum block size but of a sane length: its payload is read and discarded,
  // EINVAL, and the next request on the stream is parsed where it belongs.
  c.write(Buffer.concat([encodeRequest(P.NBD_CMD_WRITE, 0, 44, 0, 3 * 1024 * 1024), Buffer.alloc(3 * 1024 * 1024, 0xab),
    encodeRequest(P.NBD_CMD_WRITE, 0, 45, 8192, 512), Buffer.alloc(512, 0x5a)]));
  t.deepEqual(await reply(c), { error: P.NBD_EINVAL, cookie: 44 });
  t.deepEqual(await reply(c), { error: 0, cookie: 45 });
  t.false(backend.mem.includes(0xab), 'the refused payload was not written');
  t.true(backend.mem.subarray(8192, 8704).equals(Buffer.alloc(512, 0x5a)));
  c.write(encodeRequest(P.NBD_CMD_BLOCK_STATUS, 0, 5, 0, 512));
  t.deepEqual(await reply(c), { error: P.NBD_EINVAL, cookie: 5 });
  c.write(encodeRequest(P.NBD_CMD_READ, 0x80, 6, 0, 512));
  t.deepEqual(await reply(c), { error: P.NBD_EINVAL, cookie: 6 });
  // Still fine: pipelined valid requests, answered by handle.
  c.write(Buffer.concat([encodeRequest(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, 7, 1000, 100), Buffer.alloc(100, 9), encodeRequest(P.NBD_CMD_FLUSH, 0, 8, 0, 0)]));
  const got = [await reply(c), await reply(c)].sort((a, b) => a.cookie - b.cookie);
  t.deepEqual(got, [{ error: 0, cookie: 7 }, { error: 0, cookie: 8 }]);
  // A request with a bad magic: the stream cannot be resynchronised, the connection ends.
  const bad = encodeRequest(P.NBD_CMD_READ, 0, 9, 0, 512);
  bad.writeUInt32BE(0xdeadbeef, 0);
  c.write(bad);
  t.true(await c.untilClosed());
  // A write longer than 64 MiB: not read at all, the connection ends.
  const w = await attach(sock);
  w.write(encodeRequest(P.NBD_CMD_WRITE, 0, 10, 0, 64 * 1024 * 1024 + 1));
  t.true(await w.untilClosed());
  t.true(logs.some((l) => /bad request magic/.test(l)));
  t.true(logs.some((l) => /WRITE of 67108865 bytes is over the 67108864-byte limit/.test(l)), logs.join('\n'));
  await stillServes(t, sock);
  t.true(server.stats().protocolErrors >= 2);
});

test('a client vanishing mid-WRITE payload is cleaned up; others are unaffected', async (t) => {
  const { sock, server, backend } = await serve(t);
  const other = await attach(sock);
  const c = await attach(sock);
  c.write(Buffer.concat([encodeRequest(P.NBD_CMD_WRITE, 0, 1, 0, 65536), Buffer.alloc(30000, 0xee)]));
  await new Promise((r) => setTimeout(r, 50));
  c.destroy();
  // Also one that vanishes with reads in flight.
  const d = await attach(sock);
  for (let i = 0; i < 32; i++) d.write(encodeRequest(P.NBD_CMD_READ, 0, i, i * 65536, 65536));
  d.destroy();
  await new Promise((r) => setTimeout(r, 100));
  t.false(backend.mem.subarray(0, 65536).includes(0xee), 'a torn payload was never written');
  other.write(encodeRequest(P.NBD_CMD_READ, 0, 5, 0, 4096));
  t.deepEqual(await reply(other), { error: 0, cookie: 5 });
  await other.read(4096);
  await stillServes(t, sock);
  other.destroy();
  await new Promise((r) => setTimeout(r, 50));
  t.is(server.stats().connections, 0);
  t.is(server.stats().inflight, 0);
});

test('backpressure: a client that never reads replies cannot make the server buffer without bound', async (t) => {
  const { sock, server } = await serve(t);
  const c = await attach(sock);
  c.s.pause();
  // 4000 x 64 KiB reads = 250 MiB of replies if the server kept reading.
  const reqs: Buffer[] = [];
  for (let i = 0; i < 4000; i++) reqs.push(encodeRequest(P.NBD_CMD_READ, 0, i, (i % 60) * 65536, 65536));
  c.s.write(Buffer.concat(reqs));
  await new Promise((r) => setTimeout(r, 500));
  const st = server.stats();
  t.true(st.exports.disk!.reads < 2000, `server read ${st.exports.disk!.reads} requests while replies were not consumed`);
  c.destroy();
});

/** Seeded mutations of a valid client byte stream. */
function validStream(r: () => number): Buffer {
  const parts: Buffer[] = [Buffer.from([0, 0, 0, 3])];
  if (r() < 0.3) parts.push(option(P.NBD_OPT_LIST));
  if (r() < 0.5) parts.push(option(P.NBD_OPT_STRUCTURED_REPLY));
  if (r() < 0.3) parts.push(option(P.NBD_OPT_LIST_META_CONTEXT, metaData('disk', r() < 0.5 ? [] : ['base:'])));
  if (r() < 0.4) parts.push(option(P.NBD_OPT_SET_META_CONTEXT, metaData('disk', [P.BASE_ALLOCATION, 'x-other:thing'])));
  if (r() < 0.1) parts.push(option(P.NBD_OPT_STARTTLS));
  if (r() < 0.3) parts.push(option(P.NBD_OPT_INFO, goData('disk')));
  parts.push(r() < 0.8 ? option(P.NBD_OPT_GO, goData('disk')) : option(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  const n = 1 + Math.floor(r() * 6);
  for (let i = 0; i < n; i++) {
    const type = [P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_FLUSH, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_BLOCK_STATUS, P.NBD_CMD_CACHE][Math.floor(r() * 7)]!;
    const off = Math.floor(r() * 64) * 512, len = 512 * (1 + Math.floor(r() * 8));
    parts.push(encodeRequest(type, 0, i, off, type === P.NBD_CMD_FLUSH ? 0 : len));
    if (type === P.NBD_CMD_WRITE) parts.push(Buffer.alloc(len, i));
  }
  if (r() < 0.5) parts.push(encodeRequest(P.NBD_CMD_DISC, 0, 99, 0, 0));
  return Buffer.concat(parts);
}

function mutate(b: Buffer, r: () => number): Buffer {
  const out = Buffer.from(b);
  const k = 1 + Math.floor(r() * 4);
  for (let i = 0; i < k; i++) {
    const at = Math.floor(r() * out.length);
    const m = r();
    if (m < 0.5) out[at] = Math.floor(r() * 256);
    else if (m < 0.7) out.writeUInt32BE(Math.floor(r() * 0x100000000), Math.min(at, out.length - 4));
    else if (m < 0.85) return out.subarray(0, at);
    else out[at] = 0xff;
  }
  return out;
}

test('fuzz: mutated handshake and request streams never crash the pure parsers', (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const backend = memoryBackend();
  const dir = { lookup: (n: string) => (n === 'disk' || n === '' ? { name: 'disk', backend } : undefined), list: () => [{ name: 'disk' }] };
  let transmitted = 0, closed = 0, pending = 0, requests = 0, fatal = 0, starttls = 0;
  for (let iter = 0; iter < 600; iter++) {
    const stream = mutate(validStream(r), r);
    // A quarter of the sessions meet a listener that requires TLS.
    const hs = new Handshake(dir, { tls: r() < 0.25 ? 'required' : undefined });
    // Feed in random-sized pieces.
    let pos = 0, outcome: ReturnType<Handshake['feed']> = { kind: 'pending' };
    while (pos < stream.length && outcome.kind === 'pending') {
      const n = 1 + Math.floor(r() * 40);
      outcome = hs.feed(stream.subarray(pos, pos + n));
      pos += n;
    }
    if (outcome.kind === 'close') { closed++; t.true(outcome.reason.length > 0); continue; }
    if (outcome.kind === 'starttls') { starttls++; continue; }
    if (outcome.kind === 'pending') { pending++; continue; }
    transmitted++;
    const rest = Buffer.concat([outcome.rest, stream.subarray(pos)]);
    const parser = new RequestParser({
      payloadTarget: (req: NbdRequest) => (r() < 0.5 ? Buffer.alloc(req.length) : undefined),
      request: () => { requests++; return r() < 0.9; },
      fatal: (reason) => { fatal++; t.true(reason.length > 0); },
    }, 1024 * 1024);
    let p = 0;
    while (p < rest.length && !parser.isDead) {
      const n = 1 + Math.floor(r() * 700);
      parser.push(rest.subarray(p, p + n));
      p += n;
      if (parser.isPaused) parser.resume();
    }
    while (parser.isPaused && !parser.isDead) parser.resume();
  }
  t.log(`transmitted ${transmitted}, refused ${closed}, incomplete ${pending}, STARTTLS ${starttls}, requests ${requests}, fatal ${fatal}`);
  t.true(transmitted > 0 && closed > 0 && requests > 0);
});

test('fuzz over sockets: every mutated session completes or is closed with a reason; the server keeps serving', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed ^ 0x5555);
  const { sock, server, logs } = await serve(t);
  const sessions = 150;
  const outcomes = await Promise.all(Array.from({ length: sessions }, async () => {
    const stream = mutate(validStream(r), r);
    const c = await Raw.connect(sock);
    c.write(stream);
    // Most sessions end by DISC or by refusal; the rest the client ends itself.
    const closedByServer = await c.untilClosed(1500);
    c.destroy();
    return closedByServer;
  }));
  t.log(`${outcomes.filter(Boolean).length}/${sessions} sessions ended by the server; ${server.stats().protocolErrors} protocol errors logged`);
  await new Promise((res) => setTimeout(res, 100));
  t.is(server.stats().connections, 0);
  t.true(logs.filter((l) => l.includes('refused:')).every((l) => /refused: \S/.test(l)));
  await stillServes(t, sock);
});

testIf({ commands: ['qemu-io'] })('a real client works after the hostile ones', async (t) => {
  const { sock } = await serve(t);
  const g = await Raw.connect(sock);
  g.write(Buffer.alloc(100, 0xff));
  const out = await exec('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 64k', '-c', 'read -P 0x61 0 64k', `nbd+unix:///disk?socket=${sock}`]);
  t.notRegex(out.stdout + out.stderr, /Pattern verification failed/);
  g.destroy();
});
