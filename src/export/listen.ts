// serve --listen / --tls-psk / --insecure-plaintext: what they may be, checked before anything is
// opened. TCP carries no owner check as the 0600 unix socket does: on any address (loopback too:
// every local user can connect there) a client that reaches the port can write the volume, so TCP
// needs TLS with a pre-shared key, or the user's explicit --insecure-plaintext.
import * as net from 'node:net';
import { UserError } from '../util/errors';

export interface ListenAddress { host: string; port: number }

export interface TcpSecurityOptions { listen?: string; tlsPsk?: string; insecurePlaintext?: boolean }

const LISTEN_HINT = 'use --listen HOST:PORT, e.g. --listen 127.0.0.1:10809, --listen [::1]:10809, or --listen :10809 (loopback)';

/** Parses --listen: `HOST:PORT`, `[IPV6]:PORT`, or `:PORT` (loopback, 127.0.0.1). Port 0 picks a free port. */
export function parseListen(text: string): ListenAddress {
  const m = /^(?:\[([^\]]*)\]|([^:[\]]*)):(\d{1,5})$/.exec(text);
  if (!m) throw new UserError(`--listen ${text}: expected HOST:PORT`, LISTEN_HINT);
  const port = Number(m[3]);
  if (port > 65535) throw new UserError(`--listen ${text}: port ${port} is out of range (0-65535)`, LISTEN_HINT);
  const host = m[1] ?? (m[2] === '' ? '127.0.0.1' : m[2]!);
  if (m[1] !== undefined && net.isIPv6(host) !== true) throw new UserError(`--listen ${text}: "${host}" is not an IPv6 address`, LISTEN_HINT);
  if (m[1] === undefined && host !== 'localhost' && !net.isIPv4(host)) {
    throw new UserError(`--listen ${text}: "${host}" is not an IPv4 address`, `${LISTEN_HINT}; write IPv6 addresses in brackets`);
  }
  return { host, port };
}

/** Checks how the TCP listener of an export is secured; throws a UserError for a combination that is refused. */
export function checkTcpSecurity(o: TcpSecurityOptions): 'tls-psk' | 'plaintext' | 'none' {
  if (!o.listen) {
    if (o.tlsPsk) throw new UserError('--tls-psk applies to TCP only (--listen); the unix socket is owner-only', 'add --listen HOST:PORT, or leave out --tls-psk');
    if (o.insecurePlaintext) throw new UserError('--insecure-plaintext applies to TCP only (--listen)', 'leave it out');
    return 'none';
  }
  if (o.tlsPsk && o.insecurePlaintext) throw new UserError('--tls-psk and --insecure-plaintext contradict each other', 'give one of them');
  if (o.tlsPsk) return 'tls-psk';
  if (o.insecurePlaintext) return 'plaintext';
  throw new UserError(
    `--listen ${o.listen} without TLS: anyone who can reach the port could read and write the volume (on loopback, every local user)`,
    'make a key with "livesnap keygen /etc/livesnap/keys.psk" and add --tls-psk /etc/livesnap/keys.psk; or, knowing the risk, --insecure-plaintext',
  );
}

/** The warning --insecure-plaintext prints (CLI) and logs (daemon). */
export function plaintextWarning(addr: ListenAddress): string {
  return `WARNING: NBD on tcp ${formatHostPort(addr)} WITHOUT TLS (--insecure-plaintext): any user or host that can reach this port can read and write the whole volume`;
}

export function formatHostPort(a: ListenAddress): string {
  return net.isIPv6(a.host) ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}
