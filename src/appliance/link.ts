// The appliance link: TLS 1.3 authenticated both ways by a pre-shared key (the key file `livesnap
// keygen` writes, as NBD's TLS-PSK), carrying the frames of link-protocol.ts. There is no plaintext
// mode. Sends respect the socket's backpressure; the receiver may pause reading (the appliance
// does while its ODC is full, so TCP itself slows the host's originals down).
import * as net from 'node:net';
import * as tls from 'node:tls';
import { PSK_CIPHERS, type PskKeys, pskSecureContext, startTlsServer, tlsFailureReason } from '../nbd/tls-psk';
import { UserError } from '../util/errors';
import { type ApplianceMessage, APPLIANCE_MESSAGES, encodeFrame, FrameDecoder, HOST_MESSAGES, type HostMessage, LinkProtocolError, type MessageSchemas } from './link-protocol';

export type LinkEnd = 'host' | 'appliance';

/** One end of an established link; `In` is what it receives, `Out` what it sends. */
export class Link<In extends { t: string }, Out extends { t: string }> {
  private readonly decoder: FrameDecoder<In>;
  private closedWith: Error | null | undefined;
  private handlers: Array<(m: In, payload: Buffer | undefined) => void> = [];
  private closers: Array<(e: Error | null) => void> = [];
  private drainWaiters: Array<() => void> = [];
  /** When a message last arrived (performance.now()). */
  lastHeard = performance.now();
  bytesIn = 0;
  bytesOut = 0;

  constructor(readonly socket: tls.TLSSocket, schemas: MessageSchemas, readonly peer: string) {
    this.decoder = new FrameDecoder<In>(schemas, peer);
    socket.on('data', (chunk: Buffer) => {
      if (this.closedWith !== undefined) return; // nothing after the end is acted on
      this.bytesIn += chunk.length;
      this.lastHeard = performance.now();
      try {
        this.decoder.push(chunk, (m, p) => { for (const h of this.handlers) h(m, p); });
      } catch (e) {
        this.close(e as Error);
      }
    });
    socket.on('drain', () => { const w = this.drainWaiters; this.drainWaiters = []; for (const f of w) f(); });
    socket.on('error', (e) => this.close(linkError(e, peer)));
    socket.on('close', () => this.close(this.decoder.partial ? new Error(`${peer} went away in the middle of a message`) : null));
    socket.on('end', () => socket.end());
  }

  onMessage(h: (m: In, payload: Buffer | undefined) => void): void { this.handlers.push(h); }

  /** Called once when the link ends: null for a clean close, else why. */
  onClose(h: (e: Error | null) => void): void {
    if (this.closedWith !== undefined) { queueMicrotask(() => h(this.closedWith!)); return; }
    this.closers.push(h);
  }

  get closed(): boolean { return this.closedWith !== undefined; }
  get closeReason(): Error | null | undefined { return this.closedWith; }

  /** Queues one message; false when the socket's buffer is over its high-water mark (await drained()). */
  send(m: Out, payload?: Buffer): boolean {
    if (this.closedWith !== undefined) return false;
    let ok = true;
    for (const part of encodeFrame(m as unknown as HostMessage | ApplianceMessage, payload)) {
      this.bytesOut += part.length;
      ok = this.socket.write(part);
    }
    return ok;
  }

  /** Resolves when the socket's send buffer has room again (or the link is closed). */
  drained(): Promise<void> {
    if (this.closedWith !== undefined || !this.socket.writableNeedDrain) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  pause(): void { this.socket.pause(); }
  resume(): void { this.socket.resume(); }

  /** Ends the link (with an error: at once; without: after what was queued is sent). Idempotent. */
  close(e: Error | null = null): void {
    if (this.closedWith !== undefined) return;
    this.closedWith = e;
    if (e) this.socket.destroy(); else this.socket.end();
    const w = this.drainWaiters; this.drainWaiters = [];
    for (const f of w) f();
    const c = this.closers; this.closers = [];
    for (const f of c) f(e);
  }
}

export type HostLink = Link<ApplianceMessage, HostMessage>;
export type ApplianceLink = Link<HostMessage, ApplianceMessage>;

function linkError(e: Error, peer: string): Error {
  if (e instanceof LinkProtocolError || e instanceof UserError) return e;
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ECONNRESET' || code === 'EPIPE') return new Error(`the link to ${peer} was cut (${code})`);
  return new Error(`the link to ${peer} failed: ${e.message}`);
}

/** HOST:PORT of an appliance (also "[v6]:PORT"); throws a UserError saying what is wrong. */
export function parseApplianceAddress(text: string, what = 'appliance address'): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s/\[\]]+)):(\d{1,5})$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port < 1 || port > 65535) throw new UserError(`${what} "${text}" is not HOST:PORT`, 'e.g. 192.0.2.7:10810 or [2001:db8::7]:10810');
  return { host: m[1] ?? m[2]!, port };
}

/**
 * Connects to an appliance and proves the key (TLS 1.3 PSK). Resolves once the handshake is done;
 * a refused key, an appliance that does not answer within `timeoutMs`, or one that does not speak
 * TLS-PSK reject with a message saying which.
 */
export function connectAppliance(addr: { host: string; port: number }, keys: PskKeys, timeoutMs: number): Promise<HostLink> {
  const identity = keys.identities[0]!;
  const where = `the appliance at ${addr.host.includes(':') ? `[${addr.host}]` : addr.host}:${addr.port}`;
  return new Promise((resolve, reject) => {
    let settled = false;
    const sock = tls.connect({
      host: addr.host,
      port: addr.port,
      minVersion: 'TLSv1.3',
      maxVersion: 'TLSv1.3',
      ciphers: PSK_CIPHERS,
      // The key is the identity: there is no certificate to check.
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ identity, psk: keys.key(identity)! }),
    } as tls.ConnectionOptions);
    const timer = setTimeout(() => fail(new UserError(`${where} did not answer within ${timeoutMs / 1000} s`, 'check the address, that "livesnap appliance" runs there, and the network between')), timeoutMs);
    const fail = (e: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      reject(e);
    };
    sock.once('secureConnect', () => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.setNoDelay(true);
      resolve(new Link<ApplianceMessage, HostMessage>(sock, APPLIANCE_MESSAGES, where));
    });
    sock.once('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ECONNREFUSED') return fail(new UserError(`${where} refused the connection`, 'is "livesnap appliance --listen" running there, on that port?'));
      if (e.code === 'EHOSTUNREACH' || e.code === 'ENETUNREACH' || e.code === 'ETIMEDOUT') return fail(new UserError(`${where} cannot be reached (${e.code})`, 'check the address and the network'));
      if (/alert|handshake|SSL|TLS/i.test(e.message) || e.code === 'ECONNRESET') {
        return fail(new UserError(`${where} refused the TLS handshake with PSK identity "${identity}" of ${keys.source} (${tlsFailureReason(e, { name: identity, known: true }).replace(/^wrong key for PSK identity "[^"]*" /, '')})`,
          'host and appliance need the same key file (livesnap keygen; copy it to both): a wrong or stale key is refused'));
      }
      fail(new Error(`${where}: ${e.message}`));
    });
  });
}

/**
 * Listens for hosts: every connection must complete a TLS 1.3 PSK handshake with a key of `keys`
 * first; a plaintext or wrong-key client is logged and dropped. `onLink` gets each proven link.
 */
export function listenForHosts(addr: { host: string; port: number }, keys: PskKeys, onLink: (l: ApplianceLink, identity: string) => void, log: (line: string) => void): Promise<net.Server> {
  const context = pskSecureContext();
  const server = net.createServer((raw) => {
    const who = `${raw.remoteAddress}:${raw.remotePort}`;
    let offered: { name: string; known: boolean } | undefined;
    // A client that says nothing for 10 s (a port scanner, a stuck handshake) is dropped.
    raw.setTimeout(10_000, () => { log(`host ${who}: no TLS handshake within 10 s; dropped`); raw.destroy(); });
    let established = false;
    const sock = startTlsServer(raw, keys, context, (name, known) => { offered = { name, known }; });
    sock.once('secure', () => {
      established = true;
      raw.setTimeout(0);
      sock.setNoDelay(true);
      onLink(new Link<HostMessage, ApplianceMessage>(sock, HOST_MESSAGES, `host ${who}`), offered?.name ?? '');
    });
    sock.on('error', (e) => {
      if (established) return; // the link reports it
      const plain = /wrong version number|http request|unknown protocol|packet length too long|record layer failure/i.test(e.message);
      log(`host ${who}: refused: ${plain ? 'it did not start TLS (a plaintext client, or not livesnap); the link is TLS-PSK only' : tlsFailureReason(e, offered)}`);
      raw.destroy();
    });
    raw.on('error', () => {});
  });
  return new Promise((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => reject(e.code === 'EADDRINUSE'
      ? new UserError(`--listen ${addr.host}:${addr.port}: the address is in use`, 'another appliance or program listens there: choose another port')
      : e.code === 'EADDRNOTAVAIL' ? new UserError(`--listen ${addr.host}:${addr.port}: no interface of this machine has that address`) : e));
    server.listen(addr.port, addr.host, () => resolve(server));
  });
}
