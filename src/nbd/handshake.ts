// Fixed-newstyle negotiation as a pure state machine: bytes in, bytes out, one outcome. No sockets,
// so the fuzz test can drive it directly.
import type { NbdBackend } from './backend';
import * as P from './protocol';

export interface ExportDirectory {
  /** The backend for `name` ("" = the default export), or undefined. */
  lookup(name: string): { name: string; backend: NbdBackend } | undefined;
  list(): Array<{ name: string; description?: string }>;
}

/** What negotiation settled for the transmission phase. */
export interface Negotiated {
  /** NBD_OPT_STRUCTURED_REPLY was acknowledged: READ, BLOCK_STATUS and errors use structured replies. */
  structured: boolean;
  /** The id given to base:allocation by NBD_OPT_SET_META_CONTEXT for this export, if it was selected. */
  allocationContext?: number;
}

export type HandshakeOutcome =
  | { kind: 'pending' }
  | { kind: 'transmit'; name: string; backend: NbdBackend; flags: number; negotiated: Negotiated; rest: Buffer }
  /** NBD_OPT_STARTTLS was acknowledged: the next bytes are a TLS handshake (rest: what came after it). */
  | { kind: 'starttls'; rest: Buffer }
  | { kind: 'close'; reason: string; error: boolean };

export interface HandshakeOptions {
  /**
   * 'required': TLS must be started (NBD_OPT_STARTTLS) before any other option is answered
   * (FORCEDTLS, nbdkit --tls=require); 'active': this negotiation already runs inside TLS;
   * undefined: no TLS on this connection (STARTTLS is refused).
   */
  tls?: 'required' | 'active';
  /** After STARTTLS the negotiation restarts at the options; the client's flags carry over. */
  clientFlags?: { noZeroes: boolean };
}

const enum St { ClientFlags, OptHeader, OptData, Done }

/** The id base:allocation gets from NBD_OPT_SET_META_CONTEXT (opaque to the client). */
const ALLOCATION_CONTEXT_ID = 1;

export function transmissionFlags(b: NbdBackend, structured = false): number {
  let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_CACHE;
  if (b.readOnly) f |= P.NBD_FLAG_READ_ONLY;
  else f |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES;
  if (b.multiConn !== false) f |= P.NBD_FLAG_CAN_MULTI_CONN;
  // Every READ is answered with one content chunk, so "don't fragment" costs nothing.
  if (structured) f |= P.NBD_FLAG_SEND_DF;
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
  private structured = false;
  /** The last NBD_OPT_SET_META_CONTEXT: for which export (canonical name), and whether it selected base:allocation. */
  private meta: { exportName: string; allocation: boolean } | undefined;
  private readonly tls: HandshakeOptions['tls'];
  /** Bytes to send to the client, collected by feed(); the caller drains it. */
  readonly out: Buffer[] = [];
  /** Refusals worth logging that did not end the negotiation (e.g. an option sent before STARTTLS). */
  readonly notes: string[] = [];

  constructor(private readonly dir: ExportDirectory, opts: HandshakeOptions = {}) {
    this.tls = opts.tls;
    if (opts.clientFlags) {
      this.fixed = true;
      this.noZeroes = opts.clientFlags.noZeroes;
      this.st = St.OptHeader;
    }
  }

  /** The client's NBD_FLAG_C_NO_ZEROES (carried over a STARTTLS). */
  get clientNoZeroes(): boolean { return this.noZeroes; }

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
            if (r.kind === 'transmit' || r.kind === 'starttls') return { ...r, rest: Buffer.from(this.buf) };
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
    const tlsPending = this.tls === 'required';
    switch (opt) {
      case P.NBD_OPT_EXPORT_NAME: {
        // This option cannot be answered with an error: the only refusal is to hang up.
        if (tlsPending) return { kind: 'close', reason: 'NBD_OPT_EXPORT_NAME without NBD_OPT_STARTTLS: TLS is required on this listener', error: true };
        const name = data.toString('utf8');
        const e = this.dir.lookup(name);
        if (!e) return { kind: 'close', reason: `NBD_OPT_EXPORT_NAME for unknown export "${name}"`, error: true };
        const negotiated = this.negotiatedFor(e.name);
        const flags = transmissionFlags(e.backend, negotiated.structured);
        const r = Buffer.alloc(this.noZeroes ? 10 : 134);
        writeU64(r, 0, e.backend.size);
        r.writeUInt16BE(flags, 8);
        this.out.push(r);
        return { kind: 'transmit', name: e.name, backend: e.backend, flags, negotiated, rest: Buffer.alloc(0) };
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
    if (opt === P.NBD_OPT_STARTTLS) {
      if (data.length !== 0) return this.error(opt, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
      if (this.tls === 'active') return this.error(opt, P.NBD_REP_ERR_INVALID, 'TLS is already active');
      if (this.tls !== 'required') return this.error(opt, P.NBD_REP_ERR_UNSUP, 'TLS is not offered on this socket');
      this.reply(opt, P.NBD_REP_ACK);
      return { kind: 'starttls', rest: Buffer.alloc(0) };
    }
    if (tlsPending) {
      this.notes.push(`${P.optionName(opt)} before NBD_OPT_STARTTLS refused: TLS is required on this listener`);
      return this.error(opt, P.NBD_REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
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
        const negotiated = this.negotiatedFor(e.name);
        const flags = transmissionFlags(b, negotiated.structured);
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
        if (opt === P.NBD_OPT_GO) return { kind: 'transmit', name: e.name, backend: b, flags, negotiated, rest: Buffer.alloc(0) };
        return undefined;
      }
      case P.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.error(opt, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structured = true;
        this.reply(opt, P.NBD_REP_ACK);
        return undefined;
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT:
        return this.metaContext(opt, data);
      default:
        return this.error(opt, P.NBD_REP_ERR_UNSUP, `${P.optionName(opt)} is not supported`);
    }
  }

  /** What GO / EXPORT_NAME for `name` enters transmission with. */
  private negotiatedFor(name: string): Negotiated {
    const allocation = this.structured && this.meta?.allocation === true && this.meta.exportName === name;
    return { structured: this.structured, allocationContext: allocation ? ALLOCATION_CONTEXT_ID : undefined };
  }

  /** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: only base:allocation exists. */
  private metaContext(opt: number, data: Buffer): undefined {
    const set = opt === P.NBD_OPT_SET_META_CONTEXT;
    // SET replaces the selection even when it fails.
    if (set) this.meta = undefined;
    const q = parseMetaQuery(data);
    if (typeof q === 'string') return this.error(opt, P.NBD_REP_ERR_INVALID, q);
    if (!this.structured) return this.error(opt, P.NBD_REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
    const e = this.dir.lookup(q.exportName);
    if (!e) return this.error(opt, P.NBD_REP_ERR_UNKNOWN, `no export named "${q.exportName}"`);
    // LIST with no query lists everything; "base:" is the namespace's wildcard (LIST only).
    const matches = set
      ? q.queries.includes(P.BASE_ALLOCATION)
      : q.queries.length === 0 || q.queries.some((s) => s === P.BASE_ALLOCATION || s === 'base:');
    if (matches) {
      const name = Buffer.from(P.BASE_ALLOCATION);
      const d = Buffer.alloc(4 + name.length);
      d.writeUInt32BE(set ? ALLOCATION_CONTEXT_ID : 0, 0);
      name.copy(d, 4);
      this.reply(opt, P.NBD_REP_META_CONTEXT, d);
    }
    if (set) this.meta = { exportName: e.name, allocation: matches };
    this.reply(opt, P.NBD_REP_ACK);
    return undefined;
  }
}

export function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000) >>> 0, at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

/** The data of LIST/SET_META_CONTEXT: export name and queries, or what is wrong with it. */
function parseMetaQuery(data: Buffer): { exportName: string; queries: string[] } | string {
  if (data.length < 8) return 'option data too short';
  const nameLen = data.readUInt32BE(0);
  if (nameLen > P.MAX_NAME_LENGTH || 4 + nameLen + 4 > data.length) return 'bad export name length';
  const exportName = data.toString('utf8', 4, 4 + nameLen);
  let at = 4 + nameLen;
  const n = data.readUInt32BE(at);
  at += 4;
  // Each query takes at least its 4-byte length: a count the data cannot hold is refused before looping.
  if (n > (data.length - at) / 4) return 'more queries than the option data holds';
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    if (at + 4 > data.length) return 'query length past the end of the option';
    const len = data.readUInt32BE(at);
    at += 4;
    if (len > P.MAX_STRING_LENGTH || at + len > data.length) return 'query past the end of the option';
    queries.push(data.toString('utf8', at, at + len));
    at += len;
  }
  if (at !== data.length) return 'option length does not match its queries';
  return { exportName, queries };
}
