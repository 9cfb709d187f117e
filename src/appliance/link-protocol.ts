// The appliance link's messages and framing (README.md here is the protocol document). A frame is
// a 16-byte header, a JSON message, then an optional binary payload (the originals of an `orig`):
//   u32le magic 0x5041534c ("LSAP") | u8 version | u8 0 | u16le 0 | u32le JSON length | u32le payload length
// Every message is checked against its schema on arrival: a peer that sends anything else is cut
// off with a message naming what was wrong (LinkProtocolError), never trusted further.
import * as t from 'typanion';

export const LINK_MAGIC = 0x5041534c;
export const LINK_VERSION = 1;
export const FRAME_HEADER = 16;
/** JSON of one message at most (a `reconciled` message carries at most MAX_RANGES ranges). */
export const MAX_JSON = 1 << 20;
/** Payload of one message at most (an `orig` carries at most 64 blocks of at most 64 KiB). */
export const MAX_PAYLOAD = 4 << 20;
export const MAX_RANGES = 8192;
/** Blocks of the host's volume the appliance compares before it accepts the LUN. */
export const MAX_FINGERPRINT = 64;

const nat = t.cascade(t.isNumber(), [t.isInteger(), t.isInInclusiveRange(0, Number.MAX_SAFE_INTEGER)]);
const pos = t.cascade(t.isNumber(), [t.isInteger(), t.isInInclusiveRange(1, Number.MAX_SAFE_INTEGER)]);
const shortStr = t.cascade(t.isString(), [t.hasMaxLength(4096)]);
const range = t.isTuple([nat, nat]);

// Host to appliance.
const isHello = t.isObject({
  t: t.isLiteral('hello'),
  version: nat,
  /** The host's export name: the appliance's --lun NAME. */
  unit: t.cascade(t.isString(), [t.hasMinLength(1), t.hasMaxLength(255)]),
  size: pos,
  blockSize: t.cascade(t.isNumber(), [t.isInteger(), t.isInInclusiveRange(512, 65536)]),
  instant: shortStr,
  host: shortStr,
  /** [block, sha256 hex] of blocks read at the instant. */
  fingerprint: t.cascade(t.isArray(t.isTuple([nat, t.cascade(t.isString(), [t.matchesRegExp(/^[0-9a-f]{64}$/)])])), [t.hasMaxLength(MAX_FINGERPRINT)]),
  timeoutMs: pos,
});
/** The originals of blocks [first, first+count), in the payload (the last block cut at the volume's end). */
const isOrig = t.isObject({ t: t.isLiteral('orig'), id: nat, first: nat, count: t.cascade(t.isNumber(), [t.isInteger(), t.isInInclusiveRange(1, 64)]) });
const isPing = t.isObject({ t: t.isLiteral('ping'), at: t.isNumber() });
const isCancel = t.isObject({ t: t.isLiteral('cancel'), reason: shortStr });
/** After `done`: the host's snapshot held to the end, so the output is the instant (else: cancel). */
const isCommit = t.isObject({ t: t.isLiteral('commit') });

// A replica over the link (replica://HOST:PORT/NAME): the host asks what the appliance's replica
// NAME holds, then streams one backup into it (the appliance stages and applies it with its journal).
const replicaName = t.cascade(t.isString(), [t.hasMinLength(1), t.hasMaxLength(255)]);
const isRQuery = t.isObject({ t: t.isLiteral('rquery'), version: nat, replica: replicaName });
const isRBegin = t.isObject({
  t: t.isLiteral('rbegin'), replica: replicaName, size: pos, blockSize: t.cascade(t.isNumber(), [t.isInteger(), t.isInInclusiveRange(512, 65536)]),
  id: shortStr, parent: t.isNullable(shortStr), kind: t.isEnum(['full', 'incremental'] as const), granularity: pos, instant: shortStr, source: shortStr,
  usedBlocks: nat, zeroedBlocks: nat, excludedBytes: nat,
});
/** Block ranges [start, end) of the blocks data will come for (`rused`) or that become zeros (`rzero`), in order. */
const isRUsed = t.isObject({ t: t.isLiteral('rused'), ranges: t.cascade(t.isArray(range), [t.hasMaxLength(MAX_RANGES)]) });
const isRZero = t.isObject({ t: t.isLiteral('rzero'), ranges: t.cascade(t.isArray(range), [t.hasMaxLength(MAX_RANGES)]) });
/** The sets are complete: the appliance opens the replica (checks parent, size) and answers rready. */
const isRSets = t.isObject({ t: t.isLiteral('rsets') });
/** Volume bytes [offset, offset + length) in the payload. */
const isRData = t.isObject({ t: t.isLiteral('rdata'), offset: nat, length: pos });
const isRFinish = t.isObject({ t: t.isLiteral('rfinish'), badBlocks: t.cascade(t.isArray(nat), [t.hasMaxLength(MAX_RANGES)]) });

// Appliance to host.
const isRHeld = t.isObject({ t: t.isLiteral('rheld'), snapshotId: t.isNullable(shortStr), untrusted: t.isOptional(shortStr) });
const isRReady = t.isObject({ t: t.isLiteral('rready') });
/** The replica holds the new snapshot (journal committed and applied). */
const isRDone = t.isObject({ t: t.isLiteral('rdone'), snapshotId: shortStr, bytes: nat });
const isReady = t.isObject({ t: t.isLiteral('ready'), output: shortStr, odcBytes: nat });
/** Originals of `orig` messages up to and including `id` are in the ODC (acks are in order). */
const isAck = t.isObject({ t: t.isLiteral('ack'), id: nat });
/** Blocks whose originals are no longer needed (read and reconciled, or not part of the backup). */
const isReconciled = t.isObject({ t: t.isLiteral('reconciled'), ranges: t.cascade(t.isArray(range), [t.hasMaxLength(MAX_RANGES)]) });
const isPong = t.isObject({ t: t.isLiteral('pong'), at: t.isNumber() });
const isProgress = t.isObject({ t: t.isLiteral('progress'), bytesDone: nat, bytesTotal: nat, odcUsedBytes: nat, odcPeakBytes: nat });
const isDone = t.isObject({
  t: t.isLiteral('done'),
  output: shortStr,
  /** Bytes of volume data the output holds, blocks of them, the archive's size. */
  bytes: nat,
  blocks: nat,
  usedBlocks: nat,
  totalBlocks: nat,
  filesystem: shortStr,
  outputBytes: nat,
  /** XXH3-128 of the archive's chunk checksum list, and the chunk count (the trailer has each). */
  checksums: t.isObject({ kind: shortStr, chunks: nat, digest: shortStr }),
  originalsReceived: nat,
  originalsUsed: nat,
  odcPeakBytes: nat,
  durationMs: t.isNumber(),
  runStatus: t.isOptional(t.isNumber()),
});
const isError = t.isObject({ t: t.isLiteral('error'), message: shortStr, hint: t.isOptional(shortStr) });

export type Hello = t.InferType<typeof isHello>;
export type Orig = t.InferType<typeof isOrig>;
export type RBegin = t.InferType<typeof isRBegin>;
export type ReplicaHostMessage = t.InferType<typeof isRQuery> | RBegin | t.InferType<typeof isRUsed> | t.InferType<typeof isRZero> | t.InferType<typeof isRSets> | t.InferType<typeof isRData> | t.InferType<typeof isRFinish>;
export type ReplicaApplianceMessage = t.InferType<typeof isRHeld> | t.InferType<typeof isRReady> | t.InferType<typeof isRDone>;
export type HostMessage = Hello | Orig | t.InferType<typeof isPing> | t.InferType<typeof isCancel> | t.InferType<typeof isCommit> | ReplicaHostMessage;
export type Ready = t.InferType<typeof isReady>;
export type Done = t.InferType<typeof isDone>;
export type ApplianceMessage = Ready | t.InferType<typeof isAck> | t.InferType<typeof isReconciled> | t.InferType<typeof isPong>
  | t.InferType<typeof isProgress> | Done | t.InferType<typeof isError> | ReplicaApplianceMessage;

export type MessageSchemas = Record<string, t.StrictValidator<unknown, unknown>>;
type Schemas = MessageSchemas;
export const HOST_MESSAGES: Schemas = {
  hello: isHello, orig: isOrig, ping: isPing, cancel: isCancel, commit: isCommit,
  rquery: isRQuery, rbegin: isRBegin, rused: isRUsed, rzero: isRZero, rsets: isRSets, rdata: isRData, rfinish: isRFinish,
};
export const APPLIANCE_MESSAGES: Schemas = { ready: isReady, ack: isAck, reconciled: isReconciled, pong: isPong, progress: isProgress, done: isDone, error: isError, rheld: isRHeld, rready: isRReady, rdone: isRDone };
/** Messages that carry a payload, and those that must not. */
const WITH_PAYLOAD = new Set(['orig', 'rdata']);

export class LinkProtocolError extends Error {
  override name = 'LinkProtocolError';
}

/** One frame's bytes. */
export function encodeFrame(msg: HostMessage | ApplianceMessage, payload?: Buffer): Buffer[] {
  const json = Buffer.from(JSON.stringify(msg));
  if (json.length > MAX_JSON) throw new LinkProtocolError(`a "${msg.t}" message of ${json.length} bytes is over the link's ${MAX_JSON}`);
  const plen = payload?.length ?? 0;
  if (plen > MAX_PAYLOAD) throw new LinkProtocolError(`a payload of ${plen} bytes is over the link's ${MAX_PAYLOAD}`);
  const h = Buffer.alloc(FRAME_HEADER);
  h.writeUInt32LE(LINK_MAGIC, 0);
  h.writeUInt8(LINK_VERSION, 4);
  h.writeUInt32LE(json.length, 8);
  h.writeUInt32LE(plen, 12);
  return payload && plen ? [h, json, payload] : [h, json];
}

/**
 * Turns the bytes of one direction of the link into messages. push() throws LinkProtocolError at
 * the first thing that is not a valid frame of a known, well-formed message; nothing after it is
 * parsed. A payload is gathered into one buffer of its announced size (no repeated concatenation).
 */
export class FrameDecoder<M extends { t: string }> {
  private head = Buffer.alloc(FRAME_HEADER);
  private headGot = 0;
  private json: Buffer | undefined;
  private payload: Buffer | undefined;
  private got = 0;
  private broken: LinkProtocolError | undefined;

  constructor(private readonly schemas: Schemas, private readonly peer: string) {}

  push(chunk: Buffer, out: (msg: M, payload: Buffer | undefined) => void): void {
    if (this.broken) throw this.broken;
    try {
      let at = 0;
      while (at < chunk.length) {
        if (this.json === undefined) {
          const n = Math.min(FRAME_HEADER - this.headGot, chunk.length - at);
          chunk.copy(this.head, this.headGot, at, at + n);
          this.headGot += n;
          at += n;
          if (this.headGot < FRAME_HEADER) return;
          this.startFrame();
          continue;
        }
        const jl = this.json.length;
        const total = jl + (this.payload?.length ?? 0);
        const n = Math.min(total - this.got, chunk.length - at);
        let k = 0;
        while (k < n) {
          const pos = this.got + k;
          if (pos < jl) {
            const m = Math.min(n - k, jl - pos);
            chunk.copy(this.json, pos, at + k, at + k + m);
            k += m;
          } else {
            const m = n - k;
            chunk.copy(this.payload!, pos - jl, at + k, at + k + m);
            k += m;
          }
        }
        this.got += n;
        at += n;
        if (this.got === total) this.endFrame(out);
      }
    } catch (e) {
      this.broken = e instanceof LinkProtocolError ? e : new LinkProtocolError(String((e as Error).message ?? e));
      throw this.broken;
    }
  }

  /** Bytes of a frame started but not finished (a peer that went away mid-frame). */
  get partial(): number {
    return this.headGot + this.got;
  }

  private startFrame(): void {
    const h = this.head;
    const magic = h.readUInt32LE(0);
    if (magic !== LINK_MAGIC) throw new LinkProtocolError(`${this.peer} does not speak the livesnap appliance protocol (frame magic 0x${magic.toString(16).padStart(8, '0')})`);
    const version = h.readUInt8(4);
    if (version !== LINK_VERSION) throw new LinkProtocolError(`${this.peer} speaks version ${version} of the appliance protocol, this livesnap ${LINK_VERSION}`);
    if (h.readUInt8(5) !== 0 || h.readUInt16LE(6) !== 0) throw new LinkProtocolError(`${this.peer} sent a frame with reserved bits set`);
    const jl = h.readUInt32LE(8);
    const pl = h.readUInt32LE(12);
    if (jl < 2 || jl > MAX_JSON) throw new LinkProtocolError(`${this.peer} sent a message of ${jl} bytes (2 to ${MAX_JSON})`);
    if (pl > MAX_PAYLOAD) throw new LinkProtocolError(`${this.peer} sent a payload of ${pl} bytes (at most ${MAX_PAYLOAD})`);
    this.json = Buffer.allocUnsafe(jl);
    this.payload = pl ? Buffer.allocUnsafe(pl) : undefined;
    this.got = 0;
  }

  private endFrame(out: (msg: M, payload: Buffer | undefined) => void): void {
    const json = this.json!;
    const payload = this.payload;
    this.json = undefined;
    this.payload = undefined;
    this.headGot = 0;
    this.got = 0;
    let v: unknown;
    try { v = JSON.parse(json.toString('utf8')); } catch { throw new LinkProtocolError(`${this.peer} sent a message that is not JSON`); }
    const kind = typeof v === 'object' && v !== null ? (v as { t?: unknown }).t : undefined;
    const schema = typeof kind === 'string' && Object.hasOwn(this.schemas, kind) ? this.schemas[kind] : undefined;
    if (!schema) throw new LinkProtocolError(`${this.peer} sent an unknown message${typeof kind === 'string' ? ` "${kind.slice(0, 40)}"` : ''}`);
    const errors: string[] = [];
    if (!schema(v, { errors })) throw new LinkProtocolError(`${this.peer} sent a malformed "${kind}" message: ${errors.slice(0, 3).join('; ')}`);
    if (WITH_PAYLOAD.has(kind as string) !== (payload !== undefined)) throw new LinkProtocolError(`${this.peer} sent a "${kind}" message ${payload ? 'with' : 'without'} a payload`);
    out(v as M, payload);
  }
}
