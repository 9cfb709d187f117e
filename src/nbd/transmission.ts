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

/**
 * Incremental request parser. While paused (backpressure) it queues what arrives; every byte is
 * copied at most once into the queue (a chunk may be a reused receive buffer) and never again:
 * a resumed parse continues on the queued chunk where it stopped (a view, not a copy), so a backlog
 * of any depth costs O(bytes).
 */
export class RequestParser {
  private st = St.Header;
  private readonly hdr = Buffer.alloc(P.REQUEST_HEADER_SIZE);
  private hdrFill = 0;
  private cur: NbdRequest | undefined;
  private target: Buffer | undefined;
  private payloadDone = 0;
  /** Owned chunks not parsed yet (the first from `head`, from `headPos` on). */
  private readonly queue: Buffer[] = [];
  private head = 0;
  private headPos = 0;
  private queuedBytes = 0;
  private paused = false;
  private resuming = false;

  /**
   * maxPayload: the longest WRITE payload the parser will read at all. A longer WRITE cannot be
   * answered without reading (or trusting) that many bytes, so it is fatal; a shorter one the sink
   * refuses is read and discarded.
   */
  constructor(private readonly sink: RequestSink, private readonly maxPayload: number) {}

  get isPaused(): boolean { return this.paused; }
  get isDead(): boolean { return this.st === St.Dead; }
  /** Bytes received but not yet parsed (held while paused). */
  get buffered(): number { return this.queuedBytes; }

  push(chunk: Buffer): void {
    if (this.st === St.Dead || chunk.length === 0) return;
    if (this.paused || this.head < this.queue.length) {
      this.enqueue(Buffer.from(chunk)); // chunks may be a reused receive buffer: keep a copy
      return;
    }
    const pos = this.parse(chunk, 0);
    if (pos < chunk.length && !this.isDead) this.enqueue(Buffer.from(chunk.subarray(pos)));
  }

  pause(): void { this.paused = true; }

  resume(): void {
    if (!this.paused || this.resuming) return;
    this.paused = false;
    // request() may call back into resume() (through the sink); the loop below already drains.
    this.resuming = true;
    try {
      while (this.head < this.queue.length && !this.paused && this.st !== St.Dead) {
        const c = this.queue[this.head]!;
        const pos = this.parse(c, this.headPos);
        this.queuedBytes -= pos - this.headPos;
        if (pos >= c.length) {
          this.queue[this.head++] = EMPTY;
          this.headPos = 0;
        } else {
          this.headPos = pos;
        }
      }
      if (this.head === this.queue.length) { this.queue.length = 0; this.head = 0; this.headPos = 0; }
      else if (this.head > 1024) { this.queue.splice(0, this.head); this.head = 0; }
    } finally {
      this.resuming = false;
    }
  }

  /** Stops parsing for good (the connection is closing). */
  kill(): void {
    this.st = St.Dead;
    this.queue.length = 0;
    this.head = 0;
    this.headPos = 0;
    this.queuedBytes = 0;
  }

  private enqueue(c: Buffer): void {
    this.queue.push(c);
    this.queuedBytes += c.length;
  }

  /** Parses from `pos` until the chunk ends, the parser pauses or dies; returns where it stopped. */
  private parse(b: Buffer, pos: number): number {
    const n = b.length;
    while (pos < n) {
      if (this.paused || this.st === St.Dead) return pos;
      if (this.st === St.Header) {
        let h: Buffer, at: number;
        if (this.hdrFill === 0 && n - pos >= P.REQUEST_HEADER_SIZE) {
          h = b; at = pos; pos += P.REQUEST_HEADER_SIZE;
        } else {
          const take = Math.min(P.REQUEST_HEADER_SIZE - this.hdrFill, n - pos);
          b.copy(this.hdr, this.hdrFill, pos, pos + take);
          this.hdrFill += take; pos += take;
          if (this.hdrFill < P.REQUEST_HEADER_SIZE) return pos;
          this.hdrFill = 0;
          h = this.hdr; at = 0;
        }
        if (h.readUInt32BE(at) !== P.NBD_REQUEST_MAGIC) {
          this.st = St.Dead;
          this.sink.fatal(`bad request magic 0x${h.readUInt32BE(at).toString(16)} (expected 0x25609513)`);
          return pos;
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
            this.sink.fatal(`WRITE of ${req.length} bytes is over the ${this.maxPayload}-byte limit (its payload is too long to read and discard)`);
            return pos;
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
    return pos;
  }
}

const EMPTY = Buffer.alloc(0);

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
