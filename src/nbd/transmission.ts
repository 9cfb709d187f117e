// Transmission phase: a pure, incremental request parser (bytes in, requests out) and the simple
// reply encoder. It never keeps a pushed chunk past push() unless it copies it (chunks may be a
// reused receive buffer). The parser copies a WRITE payload straight from the received chunks into the
// buffer the sink hands it (an aligned pool slot on the device backend), so the payload is copied
// once; headers are read in place from the chunk unless they straddle two chunks.
import * as P from './protocol';

export interface NbdRequest {
  flags: number;
  type: number;
  /** The 8-byte handle, as two 32-bit halves (echoed in the reply). */
  cookieHi: number;
  cookieLo: number;
  /** Byte offset; Infinity when the 64-bit value does not fit a double exactly (always out of range). */
  offset: number;
  length: number;
  /** WRITE only: the payload (exactly `length` bytes), or undefined when the sink chose to discard it. */
  payload?: Buffer;
  /** Opaque slot for the sink (e.g. the NbdBuffer that holds `payload`). */
  ctx?: unknown;
  /** Set by the sink when it has already decided the NBD error for this request. */
  error?: number;
}

export interface RequestSink {
  /**
   * A WRITE header has been parsed and `length` payload bytes follow: return the buffer to receive
   * them (exactly `length` bytes), or undefined to discard them (the sink then answers with an error).
   */
  payloadTarget(req: NbdRequest): Buffer | undefined;
  /** A whole request (header and, for WRITE, payload). Return false to pause parsing (backpressure). */
  request(req: NbdRequest): boolean;
  /** The stream cannot be parsed any further; the connection must close. */
  fatal(reason: string): void;
}

const enum St { Header, Payload, Dead }

export class RequestParser {
  private st = St.Header;
  private readonly hdr = Buffer.alloc(P.REQUEST_HEADER_SIZE);
  private hdrFill = 0;
  private cur: NbdRequest | undefined;
  private target: Buffer | undefined;
  private payloadDone = 0;
  private pending: Buffer | undefined;
  private pendingPos = 0;
  private paused = false;

  constructor(private readonly sink: RequestSink, private readonly maxPayload: number) {}

  get isPaused(): boolean { return this.paused; }
  get isDead(): boolean { return this.st === St.Dead; }
  /** Bytes received but not yet parsed (held while paused). */
  get buffered(): number { return this.pending ? this.pending.length - this.pendingPos : 0; }

  push(chunk: Buffer): void {
    if (this.st === St.Dead) return;
    if (this.pending) {
      // Only while paused: keep the bytes for resume().
      this.pending = Buffer.concat([this.pending.subarray(this.pendingPos), chunk]);
      this.pendingPos = 0;
      return;
    }
    if (this.paused) {
      this.pending = Buffer.from(chunk); // chunks may be a reused receive buffer: keep a copy
      this.pendingPos = 0;
      return;
    }
    this.parse(chunk, 0);
  }

  pause(): void { this.paused = true; }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    const p = this.pending;
    if (p) {
      this.pending = undefined;
      this.parse(p, this.pendingPos);
    }
  }

  /** Stops parsing for good (the connection is closing). */
  kill(): void {
    this.st = St.Dead;
    this.pending = undefined;
  }

  private parse(b: Buffer, pos: number): void {
    const n = b.length;
    while (pos < n) {
      if (this.paused || this.st === St.Dead) {
        if (this.st !== St.Dead) { this.pending = Buffer.from(b.subarray(pos)); this.pendingPos = 0; }
        return;
      }
      if (this.st === St.Header) {
        let h: Buffer, at: number;
        if (this.hdrFill === 0 && n - pos >= P.REQUEST_HEADER_SIZE) {
          h = b; at = pos; pos += P.REQUEST_HEADER_SIZE;
        } else {
          const take = Math.min(P.REQUEST_HEADER_SIZE - this.hdrFill, n - pos);
          b.copy(this.hdr, this.hdrFill, pos, pos + take);
          this.hdrFill += take; pos += take;
          if (this.hdrFill < P.REQUEST_HEADER_SIZE) return;
          this.hdrFill = 0;
          h = this.hdr; at = 0;
        }
        if (h.readUInt32BE(at) !== P.NBD_REQUEST_MAGIC) {
          this.st = St.Dead;
          this.sink.fatal(`bad request magic 0x${h.readUInt32BE(at).toString(16)} (expected 0x25609513)`);
          return;
        }
        const offHi = h.readUInt32BE(at + 16);
        const req: NbdRequest = {
          flags: h.readUInt16BE(at + 4),
          type: h.readUInt16BE(at + 6),
          cookieHi: h.readUInt32BE(at + 8),
          cookieLo: h.readUInt32BE(at + 12),
          offset: offHi < 0x200000 ? offHi * 0x100000000 + h.readUInt32BE(at + 20) : Infinity,
          length: h.readUInt32BE(at + 24),
        };
        if (req.type === P.NBD_CMD_WRITE) {
          if (req.length > this.maxPayload) {
            this.st = St.Dead;
            this.sink.fatal(`WRITE of ${req.length} bytes is over the ${this.maxPayload}-byte limit (its payload cannot be skipped safely)`);
            return;
          }
          if (req.length > 0) {
            this.cur = req;
            this.target = this.sink.payloadTarget(req);
            req.payload = this.target;
            this.payloadDone = 0;
            this.st = St.Payload;
            continue;
          }
          req.payload = Buffer.alloc(0);
        }
        if (!this.sink.request(req)) this.paused = true;
        continue;
      }
      // Payload
      const req = this.cur!;
      const want = req.length - this.payloadDone;
      const take = Math.min(want, n - pos);
      if (this.target) b.copy(this.target, this.payloadDone, pos, pos + take);
      this.payloadDone += take; pos += take;
      if (this.payloadDone === req.length) {
        this.cur = undefined;
        this.target = undefined;
        this.st = St.Header;
        if (!this.sink.request(req)) this.paused = true;
      }
    }
    if (this.paused && pos >= n) { /* nothing left to hold */ }
  }
}

/** A simple reply header (16 bytes). */
export function simpleReply(cookieHi: number, cookieLo: number, error: number): Buffer {
  const b = Buffer.allocUnsafe(P.SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error >>> 0, 4);
  b.writeUInt32BE(cookieHi >>> 0, 8);
  b.writeUInt32BE(cookieLo >>> 0, 12);
  return b;
}

/** Encodes a request header (for tests and tools). */
export function encodeRequest(type: number, flags: number, cookie: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(P.REQUEST_HEADER_SIZE);
  b.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(0, 8);
  b.writeUInt32BE(cookie >>> 0, 12);
  b.writeUInt32BE(Math.floor(offset / 0x100000000) >>> 0, 16);
  b.writeUInt32BE(offset % 0x100000000, 20);
  b.writeUInt32BE(length % 0x100000000, 24);
  return b;
}
