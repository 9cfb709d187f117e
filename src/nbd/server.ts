// The NBD server: the front door every write to a protected volume goes through. Listens on a unix
// socket (mode 0600) or, when asked, TCP; serves several named exports to several clients at once;
// requests on a connection run concurrently and are answered as they complete (matched by handle).
// It validates every request and calls the export's NbdBackend; it knows nothing else.
import * as fs from 'node:fs';
import * as net from 'node:net';
import type { NbdBackend, NbdBuffer } from './backend';
import { NbdError } from './backend';
import { Handshake, type ExportDirectory } from './handshake';
import * as P from './protocol';
import { RequestParser, simpleReply, type NbdRequest, type RequestSink } from './transmission';
import { enlargeSendBuffer, withReadBuffer } from './socket-reader';

/** Bytes one read of a connection may bring in (the reusable receive buffer, per connection). */
const READ_BUFFER_BYTES = 512 * 1024;
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
  [P.NBD_CMD_READ]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_WRITE]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_FLUSH]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_TRIM]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_WRITE_ZEROES]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE,
  [P.NBD_CMD_DISC]: 0,
};

let nextConnId = 1;

class Connection implements RequestSink {
  readonly id = nextConnId++;
  private hs: Handshake | undefined;
  private parser: RequestParser | undefined;
  exportName = '';
  private backend: NbdBackend | undefined;
  private counters: ExportCounters | undefined;
  inflight = 0;
  private inflightBytes = 0;
  private corked = false;
  private socketPaused = false;
  /** 'hs' negotiating, 'tx' transmission, 'closing' no more requests read, 'dead' socket gone. */
  state: 'hs' | 'tx' | 'closing' | 'dead' = 'hs';
  private closeReason = '';
  private readonly drained: Array<() => void> = [];
  private readonly uncork = () => { this.corked = false; this.socket.uncork(); };

  /** userBuffer: the socket's reads arrive through onData() directly (see socket-reader.ts). */
  constructor(readonly socket: net.Socket, private readonly srv: NbdServer, readonly peer: string, userBuffer: boolean) {
    this.hs = new Handshake(srv.directory);
    socket.setTimeout(srv.handshakeTimeoutMs);
    socket.on('timeout', () => { if (this.state === 'hs') this.abort('negotiation timed out'); });
    if (!userBuffer) socket.on('data', (c: Buffer) => this.onData(c));
    socket.on('error', (e) => { if (this.state !== 'dead') this.srv.log('debug', `nbd: connection ${this.id} (${peer}): ${e.message}`); });
    socket.on('close', () => this.onClose());
    socket.on('drain', () => this.maybeResume());
    socket.write(Handshake.greeting());
  }

  /** Received bytes; `chunk` may be a reused buffer, valid only during the call. */
  onData(chunk: Buffer): void {
    if (this.state === 'tx') { this.parser!.push(chunk); return; }
    if (this.state !== 'hs') return;
    const hs = this.hs!;
    const r = hs.feed(Buffer.from(chunk)); // the handshake keeps partial input
    for (const b of hs.out.splice(0)) this.socket.write(b);
    if (r.kind === 'pending') return;
    this.hs = undefined;
    if (r.kind === 'close') {
      if (r.error) this.srv.protocolError(this, `negotiation: ${r.reason}`);
      else this.srv.log('debug', `nbd: connection ${this.id} (${this.peer}): ${r.reason}`);
      this.state = 'closing';
      this.closeReason = r.reason;
      this.socket.end();
      return;
    }
    if (!this.srv.attach(this, r.name)) { this.abort('export removed during negotiation'); return; }
    this.state = 'tx';
    this.exportName = r.name;
    this.backend = r.backend;
    this.counters = this.srv.countersFor(r.name);
    this.counters.connections++;
    this.socket.setTimeout(0);
    this.srv.log('info', `nbd: connection ${this.id} (${this.peer}) attached to export "${r.name}"`);
    this.parser = new RequestParser(this, Math.min(r.backend.maxBlockSize, 0x7ffff000));
    if (r.rest.length) this.parser.push(r.rest);
  }

  /** Validates a request; 0 when the backend may be called. */
  private check(req: NbdRequest): number {
    const b = this.backend!;
    const allowed = ALLOWED_FLAGS[req.type];
    if (allowed === undefined) return P.NBD_EINVAL;
    if (req.flags & ~allowed) return P.NBD_EINVAL;
    switch (req.type) {
      case P.NBD_CMD_READ:
        if (req.length === 0) return P.NBD_EINVAL;
        if (req.length > b.maxBlockSize) return P.NBD_EOVERFLOW;
        if (req.offset + req.length > b.size) return P.NBD_EINVAL;
        return 0;
      case P.NBD_CMD_WRITE:
      case P.NBD_CMD_TRIM:
      case P.NBD_CMD_WRITE_ZEROES:
        if (b.readOnly) return P.NBD_EPERM;
        if (req.length === 0) return P.NBD_EINVAL;
        if (req.type === P.NBD_CMD_WRITE && req.length > b.maxBlockSize) return P.NBD_EOVERFLOW;
        if (req.offset + req.length > b.size) return P.NBD_ENOSPC;
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
      this.closeGracefully('client sent NBD_CMD_DISC', 'debug');
      return false;
    }
    const err = req.error ?? this.check(req);
    this.inflight++;
    this.srv.inflight++;
    if (err) {
      this.finishError(req, err, `${P.commandName(req.type)} offset ${req.offset} length ${req.length} refused`, 'debug');
      return this.canRead();
    }
    const b = this.backend!;
    const fua = (req.flags & P.NBD_CMD_FLAG_FUA) !== 0;
    switch (req.type) {
      case P.NBD_CMD_READ:
        c.reads++;
        if (req.flags & P.NBD_CMD_FLAG_FUA) { /* FUA on a read asks nothing of us */ }
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

  private finishOk(req: NbdRequest): void {
    if (req.type === P.NBD_CMD_WRITE) { this.counters!.bytesWritten += req.length; this.srv.totals.bytesWritten += req.length; }
    if (this.state !== 'dead') this.out(simpleReply(req.cookieHi, req.cookieLo, 0));
    this.done(req);
  }

  private finishRead(req: NbdRequest, nb: NbdBuffer): void {
    this.counters!.bytesRead += req.length;
    this.srv.totals.bytesRead += req.length;
    this.inflightBytes -= req.length;
    if (this.state === 'dead' || this.socket.destroyed) {
      nb.release();
    } else {
      this.out(simpleReply(req.cookieHi, req.cookieLo, 0));
      this.out(nb.data, () => nb.release());
    }
    this.done(req);
  }

  private failed(req: NbdRequest, e: unknown): void {
    if (req.type === P.NBD_CMD_READ) this.inflightBytes -= req.length;
    const errno = e instanceof NbdError ? e.nbdErrno : P.nbdErrnoFor((e as NodeJS.ErrnoException)?.code);
    this.finishError(req, errno, `${P.commandName(req.type)} offset ${req.offset} length ${req.length} failed: ${(e as Error)?.message ?? e}`, 'warn');
  }

  private finishError(req: NbdRequest, errno: number, what: string, level: LogLevel): void {
    this.counters!.errors++;
    this.srv.totals.errors++;
    this.srv.log(level, `nbd: connection ${this.id} export "${this.exportName}": ${what} (NBD error ${errno})`);
    if (this.state !== 'dead') this.out(simpleReply(req.cookieHi, req.cookieLo, errno));
    this.done(req);
  }

  private maybeResume(): void {
    if (!this.parser || this.state !== 'tx') return;
    if (!this.canRead()) {
      if (!this.socketPaused) { this.socketPaused = true; this.socket.pause(); }
      this.parser.pause();
      return;
    }
    if (this.socketPaused) { this.socketPaused = false; this.socket.resume(); }
    if (this.parser.isPaused) this.parser.resume();
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
        if (this.state !== 'dead') this.socket.end();
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
  }

  private onClose(): void {
    const was = this.state;
    this.state = 'dead';
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

  get backendInUse(): NbdBackend | undefined { return this.backend; }
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

  private accept(socket: net.Socket, peer: string): void {
    if (this.closing) { socket.destroy(); return; }
    this.connectionsTotal++;
    let c: Connection | undefined;
    const r = withReadBuffer(socket, READ_BUFFER_BYTES, (chunk) => c!.onData(chunk));
    if (r.socket.remoteFamily) r.socket.setNoDelay(true);
    enlargeSendBuffer(r.socket, SEND_BUFFER_BYTES);
    c = new Connection(r.socket, this, peer, r.userBuffer);
    this.conns.add(c);
  }

  private newServer(describe: (s: net.Socket) => string): net.Server {
    const server = net.createServer({ pauseOnConnect: true }, (s) => this.accept(s, describe(s)));
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

  /** Listens on TCP (default host 127.0.0.1). Returns the bound port (useful with port 0). */
  async listenTcp(host = '127.0.0.1', port = 10809): Promise<number> {
    const server = this.newServer((s) => `${s.remoteAddress}:${s.remotePort}`);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => { server.off('error', reject); resolve(); });
    });
    this.listeners.push({ server });
    const bound = (server.address() as net.AddressInfo).port;
    this.log('info', `nbd: listening on tcp ${host}:${bound}`);
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
    for (const c of this.conns) if (c.state === 'hs') c.socket.destroy();
    await Promise.all([...this.conns].map((c) => c.closeGracefully('server shutting down')));
    await Promise.all([...this.conns].map((c) => c.idle()));
    for (const c of this.conns) c.socket.destroy();
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
