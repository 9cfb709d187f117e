// A raw NBD client written from the protocol document (NetworkBlockDevice/nbd doc/proto.md), for tests
// that must see the exact bytes: negotiation with any options, simple and structured replies.
import * as net from 'node:net';
import * as P from '../../src/nbd/protocol';

/** Reads exactly what it asks for; reports when the server hangs up. */
export class RawClient {
  private chunks: Buffer[] = [];
  private have = 0;
  private waiting: (() => void) | undefined;
  closed = false;
  constructor(readonly s: net.Socket) {
    s.on('data', (d: Buffer) => { this.chunks.push(d); this.have += d.length; this.waiting?.(); });
    s.on('close', () => { this.closed = true; this.waiting?.(); });
    s.on('end', () => { this.closed = true; this.waiting?.(); });
    s.on('error', () => {});
  }

  static connect(target: string | { host: string; port: number }): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = typeof target === 'string' ? net.connect(target) : net.connect(target.port, target.host);
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  get buffered(): number { return this.have; }

  async read(n: number, ms = 5000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    while (this.have < n) {
      if (this.closed) throw new Error(`connection closed after ${this.have}/${n} bytes`);
      if (Date.now() > deadline) throw new Error(`timeout waiting for ${n} bytes (have ${this.have})`);
      await new Promise<void>((r) => { this.waiting = r; setTimeout(r, 50); });
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.have = rest.length;
    return out;
  }

  async untilClosed(ms = 5000): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) await new Promise<void>((r) => { this.waiting = r; setTimeout(r, 50); });
    return this.closed;
  }

  write(b: Buffer): void { this.s.write(b); }
  destroy(): void { this.s.destroy(); }

  /** Reads an option reply: its type and data. */
  async optionReply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(h.readUInt32BE(16)) };
  }

  async simpleReply(): Promise<{ error: number; cookie: number }> {
    const r = await this.read(16);
    if (r.readUInt32BE(0) !== P.NBD_SIMPLE_REPLY_MAGIC) throw new Error(`not a simple reply: magic 0x${r.readUInt32BE(0).toString(16)}`);
    return { error: r.readUInt32BE(4), cookie: r.readUInt32BE(12) };
  }

  /** Any reply: simple (then `payload` is whatever `readLength` says follows) or one structured chunk. */
  async chunk(): Promise<{ structured: boolean; flags: number; type: number; cookie: number; error: number; payload: Buffer }> {
    const m = (await this.read(4)).readUInt32BE(0);
    if (m === P.NBD_SIMPLE_REPLY_MAGIC) {
      const r = await this.read(12);
      return { structured: false, flags: 0, type: -1, cookie: r.readUInt32BE(8), error: r.readUInt32BE(0), payload: Buffer.alloc(0) };
    }
    if (m !== P.NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${m.toString(16)}`);
    const h = await this.read(16);
    const payload = await this.read(h.readUInt32BE(12));
    const type = h.readUInt16BE(2);
    return { structured: true, flags: h.readUInt16BE(0), type, cookie: h.readUInt32BE(8), error: type & 0x8000 ? payload.readUInt32BE(0) : 0, payload };
  }
}

export function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  P.IHAVEOPT.copy(h, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

export function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  d.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((x, i) => d.writeUInt16BE(x, 6 + n.length + 2 * i));
  return d;
}

export function metaData(name: string, queries: string[]): Buffer {
  const parts = [Buffer.alloc(4), Buffer.from(name), Buffer.alloc(4)];
  parts[0]!.writeUInt32BE(Buffer.byteLength(name));
  parts[2]!.writeUInt32BE(queries.length);
  for (const q of queries) {
    const l = Buffer.alloc(4);
    l.writeUInt32BE(Buffer.byteLength(q));
    parts.push(l, Buffer.from(q));
  }
  return Buffer.concat(parts);
}

export interface AttachOptions { structured?: boolean; meta?: string[]; name?: string }

/** Negotiates (fixed newstyle, NO_ZEROES) and NBD_OPT_GO; returns the client in transmission and the size and flags. */
export async function attach(target: string | { host: string; port: number }, opts: AttachOptions = {}): Promise<{ c: RawClient; size: number; flags: number; contextId?: number }> {
  const c = await RawClient.connect(target);
  await c.read(18);
  c.write(Buffer.from([0, 0, 0, 3]));
  const name = opts.name ?? 'disk';
  if (opts.structured) {
    c.write(option(P.NBD_OPT_STRUCTURED_REPLY));
    const r = await c.optionReply();
    if (r.type !== P.NBD_REP_ACK) throw new Error(`STRUCTURED_REPLY refused: 0x${r.type.toString(16)}`);
  }
  let contextId: number | undefined;
  if (opts.meta) {
    c.write(option(P.NBD_OPT_SET_META_CONTEXT, metaData(name, opts.meta)));
    for (;;) {
      const r = await c.optionReply();
      if (r.type === P.NBD_REP_META_CONTEXT) contextId = r.data.readUInt32BE(0);
      else if (r.type === P.NBD_REP_ACK) break;
      else throw new Error(`SET_META_CONTEXT refused: 0x${r.type.toString(16)}`);
    }
  }
  c.write(option(P.NBD_OPT_GO, goData(name)));
  let size = -1, flags = 0;
  for (;;) {
    const r = await c.optionReply();
    if (r.type === P.NBD_REP_INFO && r.data.readUInt16BE(0) === P.NBD_INFO_EXPORT) {
      size = r.data.readUInt32BE(2) * 2 ** 32 + r.data.readUInt32BE(6);
      flags = r.data.readUInt16BE(10);
    }
    if (r.type === P.NBD_REP_ACK) return { c, size, flags, contextId };
    if (r.type & 0x80000000) throw new Error(`GO refused: 0x${r.type.toString(16)} ${r.data.toString()}`);
  }
}

/** Counts simple replies as they stream in, without keeping them: resolves when `n` have arrived or the server closed. */
export function countReplies(s: net.Socket, n: number): Promise<{ replies: number; errors: number; closedEarly: boolean }> {
  return new Promise((resolve) => {
    let replies = 0, errors = 0, carry = Buffer.alloc(0), done = false;
    const finish = (closedEarly: boolean) => { if (!done) { done = true; resolve({ replies, errors, closedEarly }); } };
    s.on('data', (d: Buffer) => {
      let b = carry.length ? Buffer.concat([carry, d]) : d;
      let at = 0;
      while (b.length - at >= 16) {
        if (b.readUInt32BE(at) !== P.NBD_SIMPLE_REPLY_MAGIC) { errors++; }
        else if (b.readUInt32BE(at + 4) !== 0) errors++;
        replies++;
        at += 16;
      }
      carry = Buffer.from(b.subarray(at));
      b = carry;
      if (replies >= n) finish(false);
    });
    s.on('close', () => finish(replies < n));
    s.on('end', () => finish(replies < n));
  });
}

/** python3-libnbd: 64 aio 64 KiB writes (pattern of round argv[2]), then nbd_shutdown; prints {ok, failed}. */
export const LIBNBD_DISC = `
import nbd, sys, json
uri, rnd = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
bufs, cookies = [], []
for i in range(64):
    b = bytearray([((rnd * 64 + i) % 255) + 1]) * 65536
    b[0:4] = (rnd * 1000 + i).to_bytes(4, 'big')
    buf = nbd.Buffer.from_bytearray(b)
    bufs.append(buf)
    cookies.append(h.aio_pwrite(buf, i * 65536))
h.shutdown()
ok, failed = 0, []
for ck in cookies:
    try:
        if h.aio_command_completed(ck): ok += 1
        else: failed.append('not completed')
    except nbd.Error as e:
        failed.append(str(e))
print(json.dumps({'ok': ok, 'failed': failed}))
`;
