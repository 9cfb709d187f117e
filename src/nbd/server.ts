// The NBD server: the front door every write to a protected volume goes through. Listens on a unix
// socket (mode 0600) or, when asked, TCP; serves several named exports to several clients at once;
// requests on a connection run concurrently and are answered as they complete (matched by handle).
// It validates every request and calls the export's NbdBackend; it knows nothing else.
import * as fs from 'node:fs';
import * as net from 'node:net';
import type * as tls from 'node:tls';
import type { AllocationExtent } from './allocation';
import type { NbdBackend, NbdBuffer } from './backend';
import { NbdError } from './backend';
import { Handshake, writeU64, type ExportDirectory, type Negotiated } from './handshake';
import * as P from './protocol';
import { RequestParser, simpleReply, type NbdRequest, type RequestSink } from './transmission';
import { enlargeSendBuffer, withReadBuffer } from './socket-reader';
import { pskSecureContext, startTlsServer, tlsFailureReason, type PskKeys } from './tls-psk';

/** Bytes one read of a connection may bring in (the reusable receive buffer, per connection). */
const READ_BUFFER_BYTES = 512 * 1024;
/**
 * A WRITE longer than the export's maximum block size is read and discarded (answered EINVAL, the
 * connection goes on) up to this length; beyond it the client is not speaking NBD sanely: hang up.
 */
const MAX_WRITE_SKIP = 64 * 1024 * 1024;
/** After our end of a connection is closed, how long the client gets to close its end. */
const LINGER_MS = 10000;
/** Send buffer asked for per connection (READ replies of up to the max block size). */
const SEND_BUFFER_BYTES = 4 * 1024 * 1024;

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type NbdLog = (level: LogLevel, message: string) => void;

export interface NbdServerOptions {
  exports?: Map<string, NbdBackend> | Record<string, NbdBackend>;
  /** Export used when a client asks for "" (default: the only export, if there is exactly one). */
  defaultExport?: string;
  log?: NbdLog;
  /** Requests one connection may have in flight before the server stops reading it (default 64). */
  maxInflight?: number;
  /** Payload bytes one connection may have in flight before the server stops reading it (default 64 MiB). */
  maxInflightBytes?: number;
  /** A client that has not finished negotiating after this many ms is dropped (default 30000). */
  handshakeTimeoutMs?: number;
}

export interface ExportCounters {
  connections: number;
  requests: number;
  reads: number;
  writes: number;
  flushes: number;
  trims: number;
  zeroes: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
}

export interface NbdServerStats extends ExportCounters {
  connectionsTotal: number;
  protocolErrors: number;
  inflight: number;
  exports: Record<string, ExportCounters>;
}

function newCounters(): ExportCounters {
  return { connections: 0, requests: 0, reads: 0, writes: 0, flushes: 0, trims: 0, zeroes: 0, bytesRead: 0, bytesWritten: 0, errors: 0 };
}

const ALLOWED_FLAGS: Record<number, number> = {
  [P.NBD_CMD_READ]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF,
  [P.NBD_CMD_WRITE]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_FLUSH]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_TRIM]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_CACHE]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_WRITE_ZEROES]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE,
  [P.NBD_CMD_BLOCK_STATUS]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_REQ_ONE,
  [P.NBD_CMD_DISC]: 0,
};

/** Why a request was refused before the backend saw it (the text of a structured error chunk). */
const REFUSAL: Record<number, string> = {
  [P.NBD_EINVAL]: 'invalid request',
  [P.NBD_EPERM]: 'the export is read-only',
  [P.NBD_ENOSPC]: 'the request ends past the end of the export',
};

let nextConnId = 1;

/** TLS of a listener: connections must start it before anything else. */
export interface ListenerTls {
  keys: PskKeys;
  context: tls.SecureContext;
}

class Connection implements RequestSink {
  readonly id = nextConnId++;
  private hs: Handshake | undefined;
  private parser: RequestParser | undefined;
  exportName = '';
  private backend: NbdBackend | undefined;
  private counters: ExportCounters | undefined;
  private negotiated: Negotiated = { structured: false };
  inflight = 0;
  private inflightBytes = 0;
  private corked = false;
  private socketPaused = false;
  /** 'hs' negotiating, 'tx' transmission, 'closing' no more requests read, 'dead' socket gone. */
  state: 'hs' | 'tx' | 'closing' | 'dead' = 'hs';
  private closeReason = '';
  private readonly drained: Array<() => void> = [];
  private readonly uncork = () => { this.corked = false; this.socket.uncork(); };
  private readonly onSocketData = (c: Buffer) => this.onData(c);
  private hsTimer: NodeJS.Timeout | undefined;
  private lingerTimer: NodeJS.Timeout | undefined;
  /** The transport: the accepted socket, or the TLS socket over it once STARTTLS succeeded. */
  socket: net.Socket;
  private tlsActive = false;

  /** userBuffer: the socket's reads arrive through onData() directly (see socket-reader.ts). */
  constructor(socket: net.Socket, private readonly srv: NbdServer, readonly peer: string, userBuffer: boolean, private readonly tlsConfig?: ListenerTls) {
    this.socket = socket;
    this.hs = new Handshake(srv.directory, { tls: tlsConfig ? 'required' : undefined });
    this.hsTimer = setTimeout(() => { if (this.state === 'hs') this.abort('negotiation timed out'); }, srv.handshakeTimeoutMs);
    this.bind(socket, !userBuffer, false);
    socket.write(Handshake.greeting());
  }

  private bind(s: net.Socket, dataEvents: boolean, tlsLayer: boolean): void {
    if (dataEvents) s.on('data', this.onSocketData);
    s.on('error', (e) => {
      if (this.state === 'dead') return;
      // A failed TLS handshake (no TLS, wrong key, unknown identity) is a refusal worth a reason.
      if (tlsLayer && !this.tlsActive) this.srv.protocolError(this, `TLS handshake failed: ${tlsFailureReason(e, this.pskIdentity)}`);
      else this.srv.log('debug', `nbd: connection ${this.id} (${this.peer}): ${e.message}`);
    });
    s.on('end', () => this.onEnd());
    s.on('close', () => this.onClose());
    s.on('drain', () => this.maybeResume());
  }

  private rawSocket: net.Socket | undefined;
  /** The PSK identity the client offered (for the log when its handshake fails). */
  private pskIdentity: { name: string; known: boolean } | undefined;

  /** Received bytes; `chunk` may be a reused buffer, valid only during the call. */
  onData(chunk: Buffer): void {
    if (this.state === 'tx') { this.parser!.push(chunk); return; }
    if (this.state !== 'hs' || !this.hs) return;
    const hs = this.hs;
    const r = hs.feed(Buffer.from(chunk)); // the handshake keeps partial input
    for (const b of hs.out.splice(0)) this.socket.write(b);
    for (const n of hs.notes.splice(0)) this.srv.log('warn', `nbd: connection ${this.id} (${this.peer}): ${n}`);
    if (r.kind === 'pending') return;
    this.hs = undefined;
    if (r.kind === 'close') {
      if (r.error) this.srv.protocolError(this, `negotiation: ${r.reason}`);
      else this.srv.log('debug', `nbd: connection ${this.id} (${this.peer}): ${r.reason}`);
      this.state = 'closing';
      this.closeReason = r.reason;
      this.endSocket();
      return;
    }
    if (r.kind === 'starttls') { this.startTls(hs, r.rest); return; }
    if (!this.srv.attach(this, r.name)) { this.abort('export removed during negotiation'); return; }
    this.state = 'tx';
    this.exportName = r.name;
    this.backend = r.backend;
    this.negotiated = r.negotiated;
    this.counters = this.srv.countersFor(r.name);
    this.counters.connections++;
    clearTimeout(this.hsTimer);
    const how = [this.tlsActive ? 'TLS' : '', r.negotiated.structured ? 'structured replies' : '', r.negotiated.allocationContext ? P.BASE_ALLOCATION : ''].filter(Boolean).join(', ');
    this.srv.log('info', `nbd: connection ${this.id} (${this.peer}) attached to export "${r.name}"${how ? ` (${how})` : ''}`);
    this.parser = new RequestParser(this, Math.min(Math.max(r.backend.maxBlockSize, MAX_WRITE_SKIP), 0x7ffff000));
    if (r.rest.length) this.parser.push(r.rest);
  }

  /** NBD_OPT_STARTTLS was acknowledged: the rest of the connection runs inside TLS. */
  private startTls(hs: Handshake, rest: Buffer): void {
    if (!this.tlsConfig) { this.abort('STARTTLS without TLS configured'); return; }
    // The client waits for our ACK before its ClientHello: bytes already here are not TLS.
    if (rest.length) { this.abort('data after NBD_OPT_STARTTLS before the TLS handshake'); return; }
    const raw = this.socket;
    raw.off('data', this.onSocketData);
    this.rawSocket = raw;
    const secure = startTlsServer(raw, this.tlsConfig.keys, this.tlsConfig.context, (name, known) => { this.pskIdentity = { name, known }; });
    this.socket = secure;
    this.bind(secure, true, true);
    secure.once('secure', () => {
      if (this.state !== 'hs') return;
      this.tlsActive = true;
      this.hs = new Handshake(this.srv.directory, { tls: 'active', clientFlags: { noZeroes: hs.clientNoZeroes } });
      this.srv.log('debug', `nbd: connection ${this.id} (${this.peer}): ${secure.getProtocol()} ${secure.getCipher()?.name ?? ''} with PSK identity "${this.pskIdentity?.name ?? '?'}"`);
    });
  }

  /** Validates a request; 0 when the backend may be called. */
  private check(req: NbdRequest): number {
    const b = this.backend!;
    const allowed = ALLOWED_FLAGS[req.type];
    if (allowed === undefined) return P.NBD_EINVAL;
    if (req.flags & ~allowed) return P.NBD_EINVAL;
    switch (req.type) {
      case P.NBD_CMD_FLUSH:
        return req.length === 0 && req.offset === 0 ? 0 : P.NBD_EINVAL;
      case P.NBD_CMD_DISC:
        return 0;
      case P.NBD_CMD_READ:
      case P.NBD_CMD_CACHE:
        if (req.length === 0) return P.NBD_EINVAL;
        // A payload the export cannot carry is an invalid request (EOVERFLOW is for DF reads only).
        if (req.type === P.NBD_CMD_READ && req.length > b.maxBlockSize) return P.NBD_EINVAL;
        if (req.offset + req.length > b.size) return P.NBD_EINVAL;
        return 0;
      case P.NBD_CMD_BLOCK_STATUS:
        if (!this.negotiated.allocationContext) return P.NBD_EINVAL;
        if (req.length === 0 || req.offset + req.length > b.size) return P.NBD_EINVAL;
        return 0;
      case P.NBD_CMD_WRITE:
      case P.NBD_CMD_TRIM:
      case P.NBD_CMD_WRITE_ZEROES:
        if (b.readOnly) return P.NBD_EPERM;
        if (req.length === 0) return P.NBD_EINVAL;
        if (req.type === P.NBD_CMD_WRITE && req.length > b.maxBlockSize) return P.NBD_EINVAL;
        // The protocol: a write past the end is ENOSPC, a trim past the end EINVAL.
        if (req.offset + req.length > b.size) return req.type === P.NBD_CMD_TRIM ? P.NBD_EINVAL : P.NBD_ENOSPC;
        return 0;
      default:
        return 0;
    }
  }

  payloadTarget(req: NbdRequest): Buffer | undefined {
    const err = this.check(req);
    if (err) { req.error = err; return undefined; }
    this.inflightBytes += req.length;
    const nb = this.backend!.allocPayload?.(req.length);
    if (nb) { req.ctx = nb; return nb.data; }
    return Buffer.allocUnsafe(req.length);
  }

  request(req: NbdRequest): boolean {
    const c = this.counters!;
    c.requests++;
    this.srv.totals.requests++;
    if (req.type === P.NBD_CMD_DISC) {
      // Everything parsed before DISC is in flight and is answered before the connection closes.
      this.closeGracefully('client sent NBD_CMD_DISC', 'debug');
      return false;
    }
    const err = req.error ?? this.check(req);
    this.inflight++;
    this.srv.inflight++;
    if (err) {
      this.finishError(req, err, `${P.commandName(req.type)} offset ${req.offset} length ${req.length} refused`, 'debug', REFUSAL[err] ?? 'invalid request');
      return this.canRead();
    }
    const b = this.backend!;
    const fua = (req.flags & P.NBD_CMD_FLAG_FUA) !== 0;
    switch (req.type) {
      case P.NBD_CMD_READ:
        c.reads++;
        this.inflightBytes += req.length;
        b.read(req.offset, req.length).then((nb) => this.finishRead(req, nb), (e) => this.failed(req, e));
        break;
      case P.NBD_CMD_WRITE:
        c.writes++;
        b.write(req.offset, req.payload!, fua).then(() => this.finishOk(req), (e) => this.failed(req, e));
        break;
      case P.NBD_CMD_FLUSH:
        c.flushes++;
        b.flush().then(() => this.finishOk(req), (e) => this.failed(req, e));
        break;
      case P.NBD_CMD_TRIM:
        c.trims++;
        b.trim(req.offset, req.length, fua).then(() => this.finishOk(req), (e) => this.failed(req, e));
        break;
      case P.NBD_CMD_WRITE_ZEROES:
        c.zeroes++;
        b.writeZeroes(req.offset, req.length, fua, (req.flags & P.NBD_CMD_FLAG_NO_HOLE) !== 0)
          .then(() => this.finishOk(req), (e) => this.failed(req, e));
        break;
      case P.NBD_CMD_CACHE:
        // A hint with no effect on what reads return; the backend reads on demand anyway.
        Promise.resolve().then(() => this.finishOk(req));
        break;
      case P.NBD_CMD_BLOCK_STATUS: {
        const p = b.extents ? b.extents(req.offset, req.length) : Promise.resolve([{ length: req.length, hole: false, zero: false }]);
        p.then((ex) => this.finishBlockStatus(req, ex), (e) => this.failed(req, e));
        break;
      }
    }
    return this.canRead();
  }

  fatal(reason: string): void {
    this.srv.protocolError(this, reason);
    this.closeGracefully(reason, 'warn');
  }

  private canRead(): boolean {
    return this.state === 'tx' && this.inflight < this.srv.maxInflight && this.inflightBytes < this.srv.maxInflightBytes
      && this.socket.writableLength < this.srv.maxInflightBytes;
  }

  private out(b: Buffer, cb?: (err?: Error | null) => void): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(b, cb);
  }

  private done(req: NbdRequest): void {
    this.inflight--;
    this.srv.inflight--;
    if (req.type === P.NBD_CMD_WRITE && req.error === undefined) this.inflightBytes -= req.length;
    const nb = req.ctx as NbdBuffer | undefined;
    if (nb) { req.ctx = undefined; nb.release(); }
    if (this.inflight === 0 && this.drained.length) for (const f of this.drained.splice(0)) f();
    this.maybeResume();
  }

  private get canReply(): boolean {
    return this.state !== 'dead' && !this.socket.destroyed && this.socket.writable;
  }

  private finishOk(req: NbdRequest): void {
    if (req.type === P.NBD_CMD_WRITE) { this.counters!.bytesWritten += req.length; this.srv.totals.bytesWritten += req.length; }
    if (this.canReply) this.out(simpleReply(req.cookieHi, req.cookieLo, 0));
    this.done(req);
  }

  private finishRead(req: NbdRequest, nb: NbdBuffer): void {
    this.counters!.bytesRead += req.length;
    this.srv.totals.bytesRead += req.length;
    this.inflightBytes -= req.length;
    if (!this.canReply) {
      nb.release();
    } else {
      this.out(this.negotiated.structured ? dataChunkHeader(req, req.offset, req.length) : simpleReply(req.cookieHi, req.cookieLo, 0));
      this.out(nb.data, () => nb.release());
    }
    this.done(req);
  }

  private finishBlockStatus(req: NbdRequest, extents: AllocationExtent[]): void {
    if (this.canReply) this.out(blockStatusChunk(req, this.negotiated.allocationContext!, extents));
    this.done(req);
  }

  private failed(req: NbdRequest, e: unknown): void {
    if (req.type === P.NBD_CMD_READ) this.inflightBytes -= req.length;
    const errno = e instanceof NbdError ? e.nbdErrno : P.nbdErrnoFor((e as NodeJS.ErrnoException)?.code);
    const message = (e as Error)?.message ?? String(e);
    this.finishError(req, errno, `${P.commandName(req.type)} offset ${req.offset} length ${req.length} failed: ${message}`, 'warn', message);
  }

  private finishError(req: NbdRequest, errno: number, what: string, level: LogLevel, message: string): void {
    this.counters!.errors++;
    this.srv.totals.errors++;
    this.srv.log(level, `nbd: connection ${this.id} export "${this.exportName}": ${what} (NBD error ${errno})`);
    if (this.canReply) this.out(this.negotiated.structured ? errorChunk(req, errno, message) : simpleReply(req.cookieHi, req.cookieLo, errno));
    this.done(req);
  }

  private maybeResume(): void {
    if (!this.parser || this.state !== 'tx') return;
    if (!this.canRead()) {
      if (!this.socketPaused) { this.socketPaused = true; this.socket.pause(); }
      this.parser.pause();
      return;
    }
    if (this.parser.isPaused) this.parser.resume();
    // The parser may have paused again on what it had queued: read the socket only once it is drained.
    if (this.socketPaused && !this.parser.isPaused && this.state === 'tx') { this.socketPaused = false; this.socket.resume(); }
  }

  /** The client closed its sending side (half-close, as libnbd's nbd_shutdown does after DISC). */
  private onEnd(): void {
    if (this.state === 'tx') this.closeGracefully('the client closed its end of the connection', 'debug');
    else if (this.state === 'hs') { this.state = 'closing'; this.closeReason = 'client closed during negotiation'; this.endSocket(); }
  }

  /** Ends our side once queued replies are sent; a client that never closes its side is cut off later. */
  private endSocket(): void {
    if (this.state === 'dead') return;
    clearTimeout(this.hsTimer);
    this.socket.end();
    if (!this.lingerTimer) {
      this.lingerTimer = setTimeout(() => this.socket.destroy(), LINGER_MS);
      this.lingerTimer.unref();
    }
  }

  /** Stops reading; in-flight requests are answered; then the socket is closed. */
  closeGracefully(reason: string, level: LogLevel = 'info'): Promise<void> {
    if (this.state === 'dead') return Promise.resolve();
    if (this.state !== 'closing') {
      this.srv.log(level, `nbd: connection ${this.id} (${this.peer}) closing: ${reason}`);
      this.closeReason = reason;
      this.state = 'closing';
    }
    this.parser?.kill();
    // Keep reading (the bytes are dropped): a paused socket with a reusable read buffer stops
    // reading the handle, and would never see the client's end of the connection.
    this.socketPaused = false;
    this.socket.resume();
    return new Promise<void>((resolve) => {
      const finish = () => {
        this.endSocket();
        resolve();
      };
      if (this.inflight === 0) finish();
      else this.drained.push(finish);
    });
  }

  /** Drops the connection at once (in-flight requests still finish on the backend). */
  abort(reason: string): void {
    if (this.state === 'dead') return;
    this.srv.protocolError(this, reason);
    this.closeReason = reason;
    this.state = 'closing';
    this.parser?.kill();
    this.socket.destroy();
    this.rawSocket?.destroy();
  }

  private onClose(): void {
    if (this.state === 'dead') return;
    const was = this.state;
    this.state = 'dead';
    clearTimeout(this.hsTimer);
    clearTimeout(this.lingerTimer);
    this.parser?.kill();
    if (was === 'tx') {
      this.srv.log('info', `nbd: connection ${this.id} (${this.peer}) to "${this.exportName}" closed by the client` + (this.inflight ? ` with ${this.inflight} request(s) in flight` : ''));
    } else {
      this.srv.log('debug', `nbd: connection ${this.id} (${this.peer}) closed${this.closeReason ? `: ${this.closeReason}` : ''}`);
    }
    if (this.counters) this.counters.connections--;
    this.srv.detach(this);
    const finish = () => { if (this.drained.length) for (const f of this.drained.splice(0)) f(); };
    if (this.inflight === 0) finish();
  }

  /** Resolves once nothing is in flight. */
  idle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((r) => this.drained.push(r));
  }

  /** Closes the transport at once (after a graceful close, or at server shutdown). */
  destroy(): void {
    this.socket.destroy();
    this.rawSocket?.destroy();
  }

  get backendInUse(): NbdBackend | undefined { return this.backend; }
}

/** The header of a structured OFFSET_DATA chunk (DONE) carrying `length` bytes at `offset`; the data follows. */
function dataChunkHeader(req: NbdRequest, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_SIZE + 8);
  chunkHeader(b, req, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + length);
  writeU64(b, 20, offset);
  return b;
}

function chunkHeader(b: Buffer, req: NbdRequest, type: number, length: number): void {
  b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(P.NBD_REPLY_FLAG_DONE, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(req.cookieHi >>> 0, 8);
  b.writeUInt32BE(req.cookieLo >>> 0, 12);
  b.writeUInt32BE(length, 16);
}

/** A structured ERROR chunk (DONE) with a message for the human at the client. */
function errorChunk(req: NbdRequest, errno: number, message: string): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > 1024) msg = msg.subarray(0, 1024);
  const b = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_SIZE + 6 + msg.length);
  chunkHeader(b, req, P.NBD_REPLY_TYPE_ERROR, 6 + msg.length);
  b.writeUInt32BE(errno >>> 0, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  return b;
}

/**
 * A BLOCK_STATUS chunk (DONE) for one context: the backend's extents clipped to the request,
 * neighbours with equal flags merged; with REQ_ONE exactly one descriptor. At least one
 * descriptor always (an empty answer from a backend counts as "data").
 */
function blockStatusChunk(req: NbdRequest, contextId: number, extents: AllocationExtent[]): Buffer {
  const reqOne = (req.flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
  const lengths: number[] = [];
  const flags: number[] = [];
  let covered = 0;
  for (const e of extents) {
    if (covered >= req.length) break;
    if (!(e.length > 0) || !Number.isInteger(e.length)) break;
    const len = Math.min(e.length, req.length - covered);
    const f = (e.hole ? P.NBD_STATE_HOLE : 0) + (e.zero ? P.NBD_STATE_ZERO : 0);
    const last = flags.length - 1;
    if (last >= 0 && flags[last] === f) lengths[last] += len;
    else {
      if (lengths.length >= (reqOne ? 1 : P.MAX_BLOCK_STATUS_EXTENTS)) break;
      lengths.push(len); flags.push(f);
    }
    covered += len;
  }
  if (lengths.length === 0) { lengths.push(req.length); flags.push(0); }
  const n = lengths.length;
  const b = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_SIZE + 4 + 8 * n);
  chunkHeader(b, req, P.NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
  b.writeUInt32BE(contextId, 20);
  for (let i = 0; i < n; i++) {
    b.writeUInt32BE(lengths[i]!, 24 + 8 * i);
    b.writeUInt32BE(flags[i]!, 28 + 8 * i);
  }
  return b;
}

export class NbdServer {
  private readonly exports = new Map<string, NbdBackend>();
  private readonly counters = new Map<string, ExportCounters>();
  private readonly conns = new Set<Connection>();
  private readonly listeners: Array<{ server: net.Server; path?: string }> = [];
  private closing = false;
  readonly totals = newCounters();
  connectionsTotal = 0;
  protocolErrors = 0;
  inflight = 0;
  readonly maxInflight: number;
  readonly maxInflightBytes: number;
  readonly handshakeTimeoutMs: number;
  readonly log: NbdLog;
  private readonly defaultExport: string | undefined;
  readonly directory: ExportDirectory;

  constructor(opts: NbdServerOptions = {}) {
    this.log = opts.log ?? (() => {});
    this.maxInflight = opts.maxInflight ?? 64;
    this.maxInflightBytes = opts.maxInflightBytes ?? 64 * 1024 * 1024;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 30000;
    this.defaultExport = opts.defaultExport;
    const ex = opts.exports instanceof Map ? [...opts.exports] : Object.entries(opts.exports ?? {});
    for (const [n, b] of ex) this.addExport(n, b);
    this.directory = {
      lookup: (name) => {
        let n = name;
        if (n === '' && !this.exports.has('')) {
          if (this.defaultExport !== undefined) n = this.defaultExport;
          else if (this.exports.size === 1) n = [...this.exports.keys()][0]!;
        }
        const backend = this.exports.get(n);
        return backend ? { name: n, backend } : undefined;
      },
      list: () => [...this.exports].map(([name, b]) => ({ name, description: b.description })),
    };
  }

  addExport(name: string, backend: NbdBackend): void {
    if (Buffer.byteLength(name) > P.MAX_NAME_LENGTH) throw new Error(`export name longer than ${P.MAX_NAME_LENGTH} bytes`);
    if (this.exports.has(name)) throw new Error(`export "${name}" already exists`);
    if (!(backend.maxBlockSize > 0) || !(backend.minBlockSize > 0)) throw new Error(`export "${name}": bad block sizes`);
    this.exports.set(name, backend);
    if (!this.counters.has(name)) this.counters.set(name, newCounters());
  }

  /** Stops offering `name`; its connections finish their in-flight requests and are closed. */
  async removeExport(name: string): Promise<void> {
    const b = this.exports.get(name);
    if (!b) throw new Error(`no export named "${name}"`);
    this.exports.delete(name);
    await Promise.all([...this.conns].filter((c) => c.exportName === name && c.state !== 'hs').map((c) => c.closeGracefully(`export "${name}" removed`)));
    await b.flush().catch(() => {});
    this.counters.delete(name);
  }

  exportNames(): string[] {
    return [...this.exports.keys()];
  }

  countersFor(name: string): ExportCounters {
    let c = this.counters.get(name);
    if (!c) { c = newCounters(); this.counters.set(name, c); }
    return c;
  }

  stats(): NbdServerStats {
    const exports: Record<string, ExportCounters> = {};
    let connections = 0;
    for (const [n, c] of this.counters) { exports[n] = { ...c }; connections += c.connections; }
    return { ...this.totals, connections, connectionsTotal: this.connectionsTotal, protocolErrors: this.protocolErrors, inflight: this.inflight, exports };
  }

  /** @internal */
  attach(c: Connection, name: string): boolean {
    return this.exports.has(name) && !this.closing && !!c;
  }

  /** @internal */
  detach(c: Connection): void {
    this.conns.delete(c);
  }

  /** @internal */
  protocolError(c: Connection, reason: string): void {
    this.protocolErrors++;
    this.log('warn', `nbd: connection ${c.id} (${c.peer}) refused: ${reason}`);
  }

  private accept(socket: net.Socket, peer: string, tlsConfig?: ListenerTls): void {
    if (this.closing) { socket.destroy(); return; }
    this.connectionsTotal++;
    let c: Connection | undefined;
    // TLS reads through its own layer: the reusable receive buffer is for plaintext sockets.
    const r = tlsConfig ? { socket, userBuffer: false } : withReadBuffer(socket, READ_BUFFER_BYTES, (chunk) => c!.onData(chunk));
    if (tlsConfig) socket.resume();
    if (r.socket.remoteFamily) r.socket.setNoDelay(true);
    enlargeSendBuffer(r.socket, SEND_BUFFER_BYTES);
    c = new Connection(r.socket, this, peer, r.userBuffer, tlsConfig);
    this.conns.add(c);
  }

  private newServer(describe: (s: net.Socket) => string, tlsConfig?: ListenerTls): net.Server {
    // allowHalfOpen: a client that half-closes after NBD_CMD_DISC still gets every reply.
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (s) => this.accept(s, describe(s), tlsConfig));
    server.on('error', (e) => this.log('error', `nbd: listener: ${e.message}`));
    return server;
  }

  /**
   * Listens on a unix socket at `path`, mode 0600 (owner only: whoever can connect can write the
   * volume). A stale socket file left by a dead server is replaced; a live one is an error.
   */
  async listenUnix(path: string): Promise<void> {
    if (fs.existsSync(path)) {
      const st = fs.lstatSync(path);
      if (!st.isSocket()) throw new Error(`${path} exists and is not a socket; refusing to replace it`);
      const live = await new Promise<boolean>((resolve) => {
        const s = net.connect(path);
        s.once('connect', () => { s.destroy(); resolve(true); });
        s.once('error', () => resolve(false));
      });
      if (live) throw new Error(`${path}: another server is already listening there`);
      fs.unlinkSync(path);
    }
    const server = this.newServer(() => `unix:${path}`);
    const oldMask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => { server.off('error', reject); resolve(); });
      });
    } finally {
      process.umask(oldMask);
    }
    fs.chmodSync(path, 0o600);
    this.listeners.push({ server, path });
    this.log('info', `nbd: listening on unix socket ${path}`);
  }

  /**
   * Listens on TCP (default host 127.0.0.1). Returns the bound port (useful with port 0). With
   * `tls`, every client must start TLS with one of its pre-shared keys before anything else.
   */
  async listenTcp(host = '127.0.0.1', port = 10809, opts: { tls?: PskKeys } = {}): Promise<number> {
    const tlsConfig = opts.tls ? { keys: opts.tls, context: pskSecureContext() } : undefined;
    const server = this.newServer((s) => `${s.remoteAddress}:${s.remotePort}`, tlsConfig);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => { server.off('error', reject); resolve(); });
    });
    this.listeners.push({ server });
    const bound = (server.address() as net.AddressInfo).port;
    this.log('info', `nbd: listening on tcp ${host}:${bound}${tlsConfig ? ' (TLS-PSK required)' : ''}`);
    return bound;
  }

  get connectionCount(): number {
    return this.conns.size;
  }

  /**
   * Graceful stop: no new connections, each connection stops reading, its in-flight requests are
   * answered, it is closed; then every export is flushed and the unix socket files removed.
   */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const closed = this.listeners.map((l) => new Promise<void>((r) => l.server.close(() => r())));
    for (const c of this.conns) if (c.state === 'hs') c.destroy();
    await Promise.all([...this.conns].map((c) => c.closeGracefully('server shutting down')));
    await Promise.all([...this.conns].map((c) => c.idle()));
    for (const c of this.conns) c.destroy();
    await Promise.all(closed);
    for (const l of this.listeners) if (l.path) { try { fs.unlinkSync(l.path); } catch { /* already gone */ } }
    for (const [name, b] of this.exports) {
      try { await b.flush(); } catch (e) { this.log('error', `nbd: flush of export "${name}" at shutdown failed: ${(e as Error).message}`); }
    }
  }
}

export function createNbdServer(opts: NbdServerOptions = {}): NbdServer {
  return new NbdServer(opts);
}
