// TLS with pre-shared keys for NBD over TCP, as nbdkit (--tls-psk) and QEMU (tls-creds-psk) do it.
// The key file is gnutls' PSK format: one `identity:hexkey` per line. TLS 1.3 with an external PSK
// (the legacy OpenSSL PSK callback, which TLS 1.3 accepts for SHA-256 cipher suites) interoperates
// with the gnutls clients (libnbd's nbdinfo / nbdcopy, qemu-img), so nothing older is offered.
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import type * as net from 'node:net';
import * as tls from 'node:tls';

/** Identities are printable ASCII without ':' (the separator of the file format). */
const IDENTITY = /^[\x21-\x39\x3b-\x7e]{1,128}$/;
/** Bytes of key livesnap keygen makes (psktool's default, 256 bits). */
export const PSK_KEY_BYTES = 32;
/**
 * TLS 1.3 suites whose hash is SHA-256 (an external PSK is tied to SHA-256 here); AES-128-GCM
 * first: it is the cheapest where the CPU has AES instructions.
 */
export const PSK_CIPHERS = 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256';

export interface PskKeys {
  /** Where the keys came from (for messages). */
  readonly source: string;
  readonly identities: readonly string[];
  key(identity: string): Buffer | undefined;
}

/** Parses a PSK file's text; throws an Error naming the line that is wrong. */
export function parsePskFile(text: string, source: string): PskKeys {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '') return;
    const at = line.indexOf(':');
    const identity = at < 0 ? '' : line.slice(0, at);
    const hex = at < 0 ? '' : line.slice(at + 1).trim();
    if (!IDENTITY.test(identity)) throw new Error(`${source} line ${i + 1}: expected identity:hexkey (an identity of printable characters without ':')`);
    if (!/^(?:[0-9a-fA-F]{2}){16,64}$/.test(hex)) throw new Error(`${source} line ${i + 1}: the key of "${identity}" is not 16 to 64 bytes of hex`);
    if (keys.has(identity)) throw new Error(`${source} line ${i + 1}: identity "${identity}" appears twice`);
    keys.set(identity, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new Error(`${source}: no keys in the file`);
  return { source, identities: [...keys.keys()], key: (id) => keys.get(id) };
}

/**
 * Reads a PSK file. It holds a secret that lets its holder write the volume: a file others can
 * read is refused.
 */
export function loadPskFile(path: string): PskKeys {
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch (e) {
    throw new Error(`${path}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`);
  }
  if (!st.isFile()) throw new Error(`${path} is not a regular file`);
  if (st.mode & 0o004) throw new Error(`${path} is readable by every user (mode ${(st.mode & 0o777).toString(8)}); the key must stay secret`);
  return parsePskFile(fs.readFileSync(path, 'utf8'), path);
}

/** A new key line for a PSK file: `identity:hexkey` and a newline. */
export function newPskLine(identity: string): string {
  if (!IDENTITY.test(identity)) throw new Error(`identity "${identity}": use 1 to 128 printable characters without ':' or spaces`);
  return `${identity}:${randomBytes(PSK_KEY_BYTES).toString('hex')}\n`;
}

export function isValidIdentity(identity: string): boolean {
  return IDENTITY.test(identity);
}

/**
 * Starts the server side of TLS on a connection whose NBD_OPT_STARTTLS was just acknowledged.
 * The returned socket emits 'secure' once the client proved it holds a key of `keys`, or 'error'.
 */
export function startTlsServer(socket: net.Socket, keys: PskKeys, context: tls.SecureContext, onIdentity?: (identity: string, known: boolean) => void): tls.TLSSocket {
  return new tls.TLSSocket(socket, {
    isServer: true,
    secureContext: context,
    requestCert: false,
    pskCallback: (_s: tls.TLSSocket, identity: string) => {
      const key = keys.key(identity);
      onIdentity?.(identity, key !== undefined);
      return key ?? null;
    },
  } as tls.TLSSocketOptions);
}

/** Why a TLS handshake failed, in words: which identity, and OpenSSL's reason without its source location. */
export function tlsFailureReason(e: Error, identity: { name: string; known: boolean } | undefined): string {
  const m = /SSL routines:[^:]*:([^:]+)/.exec(e.message);
  const why = m ? m[1]! : e.message;
  if (!identity) return `the client offered no pre-shared key (${why})`;
  if (!identity.known) return `unknown PSK identity ${JSON.stringify(identity.name)} (${why})`;
  return `wrong key for PSK identity ${JSON.stringify(identity.name)} (${why})`;
}

/** The TLS settings every PSK connection shares (made once per listener). */
export function pskSecureContext(): tls.SecureContext {
  return tls.createSecureContext({ minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3', ciphers: PSK_CIPHERS, honorCipherOrder: true });
}
