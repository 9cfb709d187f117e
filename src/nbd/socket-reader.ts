// How a connection uses its socket. Reads: into one reusable buffer instead of a fresh 64 KiB allocation
// per read (Node's `onread` socket option): the payload is still copied once (into aligned device
// memory), but nothing is allocated and the garbage collector has nothing to do, per read (the
// figures are in the README; LIVESNAP_NBD_READ_BUFFER=0 turns it off to compare).
//
// Node offers `onread` only to sockets it constructs, not to the ones net.Server hands out, so the
// accepted socket's handle moves to a new Socket built with the option. That touches one
// undocumented field (`_handle`, stable since Node 12); where it is missing the plain socket and
// its 'data' events are used. The chunk passed to onChunk is only valid during the call.
import * as net from 'node:net';
import { config } from '../config';
import { setSendBuffer } from '../device/socket';

interface HandleCarrier { _handle?: object | null }

export interface ReusableReadSocket {
  socket: net.Socket;
  /** True when onChunk gets the reads (no 'data' events); false: the caller listens for 'data'. */
  userBuffer: boolean;
}

export function withReadBuffer(accepted: net.Socket, size: number, onChunk: (chunk: Buffer) => void): ReusableReadSocket {
  const old = accepted as net.Socket & HandleCarrier;
  const handle = old._handle;
  // LIVESNAP_NBD_READ_BUFFER=0: plain 'data' events (to compare, or if a Node release breaks this).
  if (!handle || !config().nbdReadBuffer) {
    accepted.resume();
    return { socket: accepted, userBuffer: false };
  }
  const buffer = Buffer.allocUnsafe(size);
  let socket: net.Socket;
  try {
    socket = new net.Socket({
      handle,
      allowHalfOpen: true,
      onread: { buffer, callback: (n: number, buf: Uint8Array) => { onChunk((buf as Buffer).subarray(0, n)); } },
    } as net.SocketConstructorOpts);
  } catch {
    accepted.resume();
    return { socket: accepted, userBuffer: false };
  }
  // The old object no longer owns the handle; destroying it later (when the new one closes) only
  // settles net.Server's connection count, so server.close() still completes.
  old._handle = null;
  socket.once('close', () => old.destroy());
  return { socket, userBuffer: true };
}

/**
 * Asks for a send buffer of `bytes` (SO_SNDBUF; the kernel caps it at net.core.wmem_max). With the
 * default ~208 KiB a 1 MiB READ reply leaves in five writes, each waiting for the socket to drain
 * (LIVESNAP_NBD_SEND_BUFFER=0 turns it off to compare). Best effort: without a file descriptor the
 * default stays.
 */
export function enlargeSendBuffer(socket: net.Socket, bytes: number): void {
  if (!config().nbdSendBuffer) return;
  const fd = (socket as net.Socket & { _handle?: { fd?: number } | null })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return;
  try { setSendBuffer(fd, bytes); } catch { /* keep the default */ }
}
