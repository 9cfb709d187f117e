// Fixed-newstyle negotiation as a pure state machine: bytes in, bytes out, one outcome. No sockets,
// so the fuzz test can drive it directly.
import type { NbdBackend } from './backend';
import * as P from './protocol';

export interface ExportDirectory {
  /** The backend for `name` ("" = the default export), or undefined. */
  lookup(name: string): { name: string; backend: NbdBackend } | undefined;
  list(): Array<{ name: string; description?: string }>;
}

export type HandshakeOutcome =
  | { kind: 'pending' }
  | { kind: 'transmit'; name: string; backend: NbdBackend; flags: number; rest: Buffer }
  | { kind: 'close'; reason: string; error: boolean };

const enum St { ClientFlags, OptHeader, OptData, Done }

export function transmissionFlags(b: NbdBackend): number {
  let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA;
  if (b.readOnly) f |= P.NBD_FLAG_READ_ONLY;
  else f |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES;
  if (b.multiConn !== false) f |= P.NBD_FLAG_CAN_MULTI_CONN;
  return f;
}

export class Handshake {
  private st = St.ClientFlags;
  private buf: Buffer = Buffer.alloc(0);
  private fixed = false;
  private noZeroes = false;
  private opt = 0;
  private optLen = 0;
  private options = 0;
  /** Bytes to send to the client, collected by feed(); the caller drains it. */
  readonly out: Buffer[] = [];

  constructor(private readonly dir: ExportDirectory) {}

  /** The server's greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
  static greeting(): Buffer {
    const b = Buffer.alloc(18);
    P.NBDMAGIC.copy(b, 0);
    P.IHAVEOPT.copy(b, 8);
    b.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    return b;
  }

  /** Feeds received bytes; replies accumulate in `out`. */
  feed(data: Buffer): HandshakeOutcome {
    if (this.st === St.Done) return { kind: 'close', reason: 'data after the end of negotiation', error: true };
    this.buf = this.buf.length ? Buffer.concat([this.buf, data]) : data;
    for (;;) {
      switch (this.st) {
        case St.ClientFlags: {
          if (this.buf.length < 4) return { kind: 'pending' };
          const flags = this.buf.readUInt32BE(0);
          this.buf = this.buf.subarray(4);
          const known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES;
          if (flags & ~known) return this.fail(`client flags 0x${(flags >>> 0).toString(16)} include bits this server does not know (not an NBD newstyle client?)`);
          this.fixed = !!(flags & P.NBD_FLAG_C_FIXED_NEWSTYLE);
          this.noZeroes = !!(flags & P.NBD_FLAG_C_NO_ZEROES);
          this.st = St.OptHeader;
          break;
        }
        case St.OptHeader: {
          if (this.buf.length < 16) return { kind: 'pending' };
          if (!this.buf.subarray(0, 8).equals(P.IHAVEOPT)) return this.fail('option request without the IHAVEOPT magic');
          this.opt = this.buf.readUInt32BE(8);
          this.optLen = this.buf.readUInt32BE(12);
          this.buf = this.buf.subarray(16);
          if (++this.options > P.MAX_OPTIONS) return this.fail(`more than ${P.MAX_OPTIONS} options`);
          if (this.optLen > P.MAX_OPTION_LENGTH) {
            if (this.fixed) this.reply(this.opt, P.NBD_REP_ERR_TOO_BIG, Buffer.from('option too long'));
            return this.fail(`${P.optionName(this.opt)} with a ${this.optLen}-byte payload (limit ${P.MAX_OPTION_LENGTH})`);
          }
          this.st = St.OptData;
          break;
        }
        case St.OptData: {
          if (this.buf.length < this.optLen) return { kind: 'pending' };
          const payload = this.buf.subarray(0, this.optLen);
          this.buf = this.buf.subarray(this.optLen);
          this.st = St.OptHeader;
          const r = this.option(this.opt, payload);
          if (r) {
            this.st = St.Done;
            if (r.kind === 'transmit') return { ...r, rest: Buffer.from(this.buf) };
            return r;
          }
          break;
        }
        default:
          return { kind: 'close', reason: 'negotiation already over', error: true };
      }
    }
  }

  private fail(reason: string): HandshakeOutcome {
    this.st = St.Done;
    return { kind: 'close', reason, error: true };
  }

  private reply(opt: number, type: number, data?: Buffer): void {
    const h = Buffer.alloc(20);
    h.writeUInt32BE(P.OPT_REPLY_MAGIC_HI, 0);
    h.writeUInt32BE(P.OPT_REPLY_MAGIC_LO, 4);
    h.writeUInt32BE(opt >>> 0, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(data ? data.length : 0, 16);
    this.out.push(h);
    if (data && data.length) this.out.push(data);
  }

  private error(opt: number, type: number, message: string): undefined {
    this.reply(opt, type, Buffer.from(message, 'utf8'));
    return undefined;
  }

  /** Handles one option; returns an outcome when negotiation ends. */
  private option(opt: number, data: Buffer): Exclude<HandshakeOutcome, { kind: 'pending' }> | undefined {
    switch (opt) {
      case P.NBD_OPT_EXPORT_NAME: {
        const name = data.toString('utf8');
        const e = this.dir.lookup(name);
        // This option cannot be answered with an error: the only refusal is to hang up.
        if (!e) return { kind: 'close', reason: `NBD_OPT_EXPORT_NAME for unknown export "${name}"`, error: true };
        const flags = transmissionFlags(e.backend);
        const r = Buffer.alloc(this.noZeroes ? 10 : 134);
        writeU64(r, 0, e.backend.size);
        r.writeUInt16BE(flags, 8);
        this.out.push(r);
        return { kind: 'transmit', name: e.name, backend: e.backend, flags, rest: Buffer.alloc(0) };
      }
      case P.NBD_OPT_ABORT:
        if (this.fixed) this.reply(opt, P.NBD_REP_ACK);
        return { kind: 'close', reason: 'client sent NBD_OPT_ABORT', error: false };
      default:
        break;
    }
    if (!this.fixed) {
      // Non-fixed newstyle: the server may not reply to unknown options; it must hang up.
      return { kind: 'close', reason: `${P.optionName(opt)} from a client without NBD_FLAG_C_FIXED_NEWSTYLE`, error: true };
    }
    switch (opt) {
      case P.NBD_OPT_LIST: {
        if (data.length !== 0) return this.error(opt, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        for (const e of this.dir.list()) {
          const name = Buffer.from(e.name, 'utf8');
          const desc = Buffer.from(e.description ?? '', 'utf8');
          const d = Buffer.alloc(4 + name.length + desc.length);
          d.writeUInt32BE(name.length, 0);
          name.copy(d, 4);
          desc.copy(d, 4 + name.length);
          this.reply(opt, P.NBD_REP_SERVER, d);
        }
        this.reply(opt, P.NBD_REP_ACK);
        return undefined;
      }
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO: {
        if (data.length < 6) return this.error(opt, P.NBD_REP_ERR_INVALID, 'option data too short');
        const nameLen = data.readUInt32BE(0);
        if (nameLen > P.MAX_NAME_LENGTH || 4 + nameLen + 2 > data.length) return this.error(opt, P.NBD_REP_ERR_INVALID, 'bad export name length');
        const name = data.toString('utf8', 4, 4 + nameLen);
        const nReq = data.readUInt16BE(4 + nameLen);
        if (data.length !== 4 + nameLen + 2 + 2 * nReq) return this.error(opt, P.NBD_REP_ERR_INVALID, 'option length does not match its information requests');
        const wanted = new Set<number>();
        for (let i = 0; i < nReq; i++) wanted.add(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
        const e = this.dir.lookup(name);
        if (!e) return this.error(opt, P.NBD_REP_ERR_UNKNOWN, `no export named "${name}"`);
        const b = e.backend;
        const flags = transmissionFlags(b);
        const ex = Buffer.alloc(12);
        ex.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
        writeU64(ex, 2, b.size);
        ex.writeUInt16BE(flags, 10);
        this.reply(opt, P.NBD_REP_INFO, ex);
        if (wanted.has(P.NBD_INFO_NAME)) {
          const n = Buffer.from(e.name, 'utf8');
          const d = Buffer.alloc(2 + n.length);
          d.writeUInt16BE(P.NBD_INFO_NAME, 0);
          n.copy(d, 2);
          this.reply(opt, P.NBD_REP_INFO, d);
        }
        if (wanted.has(P.NBD_INFO_DESCRIPTION) && b.description) {
          const n = Buffer.from(b.description, 'utf8');
          const d = Buffer.alloc(2 + n.length);
          d.writeUInt16BE(P.NBD_INFO_DESCRIPTION, 0);
          n.copy(d, 2);
          this.reply(opt, P.NBD_REP_INFO, d);
        }
        // Always sent: unaligned requests work (read-modify-write), so these are hints, not limits
        // the client must have asked for.
        const bs = Buffer.alloc(14);
        bs.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
        bs.writeUInt32BE(b.minBlockSize, 2);
        bs.writeUInt32BE(b.preferredBlockSize, 6);
        bs.writeUInt32BE(b.maxBlockSize, 10);
        this.reply(opt, P.NBD_REP_INFO, bs);
        this.reply(opt, P.NBD_REP_ACK);
        if (opt === P.NBD_OPT_GO) return { kind: 'transmit', name: e.name, backend: b, flags, rest: Buffer.alloc(0) };
        return undefined;
      }
      case P.NBD_OPT_STARTTLS:
        return this.error(opt, P.NBD_REP_ERR_UNSUP, 'TLS is not offered on this socket');
      case P.NBD_OPT_STRUCTURED_REPLY:
        return this.error(opt, P.NBD_REP_ERR_UNSUP, 'structured replies are not supported');
      default:
        return this.error(opt, P.NBD_REP_ERR_UNSUP, `${P.optionName(opt)} is not supported`);
    }
  }
}

export function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000) >>> 0, at);
  b.writeUInt32BE(v >>> 0, at + 4);
}
