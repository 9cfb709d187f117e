// One NBD connection with many requests in flight (qemu-io sends one at a time): the tests of the
// hold method need writes that are queued together, acknowledged later, and reads that overtake them.
// Simple replies only; each request's promise resolves with its reply's time (and a read's data).
import * as P from '../../src/nbd/protocol';
import { attach, type RawClient } from './nbd-raw';

export interface Reply { error: number; at: number; data?: Buffer }

export class Pipelined {
  private cookie = 0;
  private readonly pending = new Map<number, { readLen: number; resolve: (r: Reply) => void }>();
  private loop: Promise<void> | undefined;
  broken: Error | undefined;

  private constructor(readonly c: RawClient, readonly size: number) {}

  static async open(socket: string, name: string): Promise<Pipelined> {
    const { c, size } = await attach(socket, { name });
    const p = new Pipelined(c, size);
    p.loop = p.readLoop();
    return p;
  }

  write(offset: number, data: Buffer, fua = false): Promise<Reply> {
    return this.request(P.NBD_CMD_WRITE, offset, data.length, data, fua ? P.NBD_CMD_FLAG_FUA : 0, 0);
  }

  read(offset: number, length: number): Promise<Reply> {
    return this.request(P.NBD_CMD_READ, offset, length, undefined, 0, length);
  }

  writeZeroes(offset: number, length: number): Promise<Reply> {
    return this.request(P.NBD_CMD_WRITE_ZEROES, offset, length, undefined, 0, 0);
  }

  get inFlight(): number { return this.pending.size; }

  private request(type: number, offset: number, length: number, data: Buffer | undefined, flags: number, readLen: number): Promise<Reply> {
    if (this.broken) return Promise.reject(this.broken);
    const cookie = ++this.cookie;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(cookie), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    const p = new Promise<Reply>((resolve) => this.pending.set(cookie, { readLen, resolve }));
    this.c.write(data ? Buffer.concat([h, data]) : h);
    return p;
  }

  private async readLoop(): Promise<void> {
    try {
      for (;;) {
        const r = await this.c.read(16, 600_000);
        if (r.readUInt32BE(0) !== P.NBD_SIMPLE_REPLY_MAGIC) throw new Error('not a simple reply');
        const cookie = Number(r.readBigUInt64BE(8));
        const error = r.readUInt32BE(4);
        const w = this.pending.get(cookie);
        if (!w) throw new Error(`reply to unknown cookie ${cookie}`);
        this.pending.delete(cookie);
        const data = w.readLen > 0 && error === 0 ? Buffer.from(await this.c.read(w.readLen, 600_000)) : undefined;
        w.resolve({ error, at: performance.now(), data });
      }
    } catch (e) {
      this.broken = e as Error;
      for (const w of this.pending.values()) w.resolve({ error: -1, at: performance.now() });
      this.pending.clear();
    }
  }

  async close(): Promise<void> {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(P.NBD_CMD_DISC, 6);
    if (!this.broken) this.c.write(h);
    this.c.destroy();
    await this.loop;
  }
}
