// The replica's journal: records written front to back and fdatasync'd, then one fixed-size commit
// record at the very end, fdatasync'd again. Every record ends in the XXH3-128 of its own bytes and
// carries the previous record's, so the commit record's checksum seals the whole journal (a chain).
//   record = magic u32 "LSJR" | type u32 | seq u64 | offset u64 | length u64 | prev 16 | payload | check 16
//   HEADER (seq 0, JSON: what the apply makes), ZERO (a volume range to zero, no payload),
//   DATA (payload: the range's bytes), COMMIT (64 bytes: counts and its own position; last).
// Read back: no valid commit record at the end = uncommitted (staging was cut short: drop it, nothing
// was applied); a valid commit over a body that does not check = damaged (never applied).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { xxh128 } from '../device/hash';
import { syncDir } from '../util/durable-file';
import { UserError } from '../util/errors';
import { checkMetaFields, faultStep, type ReplicaMeta } from './replica-state';

const MAGIC = 0x524a534c; // "LSJR" little-endian
const HEAD = 48;
const CHECK = 16;
export const RECORD_OVERHEAD = HEAD + CHECK;
/** The largest DATA payload written and accepted (a bigger length in a file is damage). */
export const MAX_DATA_RECORD = 8 << 20;
const MAX_HEADER_PAYLOAD = 64 << 10;
const COMMIT_PAYLOAD = 64;
export const COMMIT_BYTES = RECORD_OVERHEAD + COMMIT_PAYLOAD;
const JOURNAL_FORMAT = 'livesnap-replica-journal';
const JOURNAL_VERSION = 1;
const TYPE = { header: 1, zero: 2, data: 3, commit: 4 } as const;
const NO_CHECK = Buffer.alloc(CHECK);

export interface JournalHeader {
  /**
   * delta: applied over `base` in place; full: the whole volume in place (a device holding a
   * snapshot); replace: a full written to `partial`, renamed over the image file.
   */
  kind: 'delta' | 'full' | 'replace';
  /** The snapshot the replica holds before the apply (a delta must find exactly it). */
  base: string | null;
  /** The metadata after the apply (badBlocks comes with the commit record). */
  target: Omit<ReplicaMeta, 'badBlocks' | 'fileStamp'>;
  /** replace: the storage id of the staged file (it becomes the target's). */
  partial?: string;
}

export interface JournalEntry {
  type: 'zero' | 'data';
  offset: number;
  length: number;
  /** Where a DATA record's bytes are in the journal file. */
  at: number;
}

export interface CommitInfo {
  records: number;
  dataBytes: number;
  zeroBytes: number;
  badBlocks: number;
}

export type CommittedJournal = { state: 'committed'; header: JournalHeader; entries: JournalEntry[]; commit: CommitInfo; bytes: number };
export type JournalRead = CommittedJournal | { state: 'uncommitted'; why: string; bytes: number };

/** A journal whose commit record is valid but whose body is not: never applied; only a full backup mends the replica. */
export class JournalDamagedError extends UserError {}

// u64 fields as two u32 halves: exact below 2^53, and a larger value read back is refused.
function putU64(b: Buffer, at: number, n: number): void {
  b.writeUInt32LE(n % 0x100000000, at);
  b.writeUInt32LE(Math.floor(n / 0x100000000), at + 4);
}
function getU64(b: Buffer, at: number): number | undefined {
  const hi = b.readUInt32LE(at + 4);
  return hi >= 0x200000 ? undefined : hi * 0x100000000 + b.readUInt32LE(at);
}

export interface JournalPiece {
  type: 'zero' | 'data';
  offset: number;
  length: number;
  /** DATA: exactly `length` bytes. */
  data?: Uint8Array;
}

export class JournalWriter {
  private seq = 0;
  private prev: Buffer = NO_CHECK;
  private pos = 0;
  private dataBytes = 0;
  private zeroBytes = 0;

  private constructor(private readonly fh: fs.promises.FileHandle, readonly file: string) {}

  /** Creates (truncates) the journal and writes its header record. */
  static async create(file: string, header: JournalHeader): Promise<JournalWriter> {
    faultStep('stage');
    const fh = await fs.promises.open(file, 'w', 0o600);
    const w = new JournalWriter(fh, file);
    const payload = Buffer.from(JSON.stringify({ format: JOURNAL_FORMAT, version: JOURNAL_VERSION, ...header }));
    if (payload.length > MAX_HEADER_PAYLOAD) throw new Error(`journal header of ${payload.length} bytes`);
    try { await w.put(w.encode([{ type: TYPE.header, offset: 0, length: payload.length, payload }])); } catch (e) { await fh.close().catch(() => {}); throw e; }
    return w;
  }

  /** Appends ZERO and DATA records in one write (DATA longer than MAX_DATA_RECORD is split). */
  async append(pieces: readonly JournalPiece[]): Promise<void> {
    const recs: Array<{ type: number; offset: number; length: number; payload?: Uint8Array }> = [];
    for (const p of pieces) {
      if (p.type === 'zero') { recs.push({ type: TYPE.zero, offset: p.offset, length: p.length }); this.zeroBytes += p.length; continue; }
      for (let d = 0; d < p.length; d += MAX_DATA_RECORD) {
        const n = Math.min(MAX_DATA_RECORD, p.length - d);
        recs.push({ type: TYPE.data, offset: p.offset + d, length: n, payload: p.data!.subarray(d, d + n) });
      }
      this.dataBytes += p.length;
    }
    if (recs.length === 0) return;
    faultStep('stage');
    await this.put(this.encode(recs));
  }

  /** Makes the body durable, then writes the commit record and makes it durable: from here the apply happens. */
  async commit(badBlocks: number): Promise<void> {
    faultStep('sync-journal');
    await this.fh.datasync();
    const payload = Buffer.alloc(COMMIT_PAYLOAD);
    putU64(payload, 0, this.seq);
    putU64(payload, 8, this.dataBytes);
    putU64(payload, 16, this.zeroBytes);
    putU64(payload, 24, this.pos);
    putU64(payload, 32, badBlocks);
    faultStep('commit');
    await this.put(this.encode([{ type: TYPE.commit, offset: 0, length: COMMIT_PAYLOAD, payload }]));
    faultStep('sync-commit');
    await this.fh.datasync();
    await syncDir(path.dirname(this.file));
  }

  async close(): Promise<void> {
    await this.fh.close().catch(() => {});
  }

  private async put(buf: Buffer): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.fh.write(buf, done, buf.length - done, this.pos + done);
      done += bytesWritten;
    }
    this.pos += buf.length;
  }

  private encode(recs: ReadonlyArray<{ type: number; offset: number; length: number; payload?: Uint8Array }>): Buffer {
    let total = 0;
    for (const r of recs) total += RECORD_OVERHEAD + (r.payload?.length ?? 0);
    const buf = Buffer.allocUnsafe(total);
    let at = 0;
    for (const r of recs) {
      const plen = r.payload?.length ?? 0;
      buf.writeUInt32LE(MAGIC, at);
      buf.writeUInt32LE(r.type, at + 4);
      putU64(buf, at + 8, this.seq);
      putU64(buf, at + 16, r.offset);
      putU64(buf, at + 24, r.length);
      this.prev.copy(buf, at + 32);
      if (r.payload) buf.set(r.payload, at + HEAD);
      const check = xxh128(buf.subarray(at, at + HEAD + plen));
      check.copy(buf, at + HEAD + plen);
      this.prev = check;
      this.seq++;
      at += RECORD_OVERHEAD + plen;
    }
    return buf;
  }
}

/** Random-access bytes of a journal: a file, or a buffer (tests). */
export interface JournalSource {
  readonly size: number;
  /** Exactly `length` bytes at `pos` (within size). */
  read(pos: number, length: number): Promise<Buffer>;
  /** Fills `dst` from `pos`. */
  readInto(dst: Uint8Array, pos: number): Promise<void>;
}

export async function openJournal(file: string): Promise<JournalSource & { close(): Promise<void> }> {
  const fh = await fs.promises.open(file, 'r');
  const size = (await fh.stat()).size;
  const readInto = async (dst: Uint8Array, pos: number) => {
    let done = 0;
    while (done < dst.length) {
      const { bytesRead } = await fh.read(dst, done, dst.length - done, pos + done);
      if (bytesRead === 0) throw new Error(`${file} ended at byte ${pos + done} while reading it`);
      done += bytesRead;
    }
  };
  return {
    size,
    readInto,
    read: async (pos, length) => { const b = Buffer.allocUnsafe(length); await readInto(b, pos); return b; },
    close: () => fh.close(),
  };
}

export function bufferSource(b: Buffer): JournalSource {
  return {
    size: b.length,
    read: async (pos, length) => Buffer.from(b.subarray(pos, pos + length)),
    readInto: async (dst, pos) => { dst.set(b.subarray(pos, pos + dst.length)); },
  };
}

type Commit = CommitInfo & { seq: number; prev: Buffer; at: number };

/** The commit record in `tail` (the journal's last COMMIT_BYTES bytes, at `at`), or why it is not one. */
function decodeCommit(tail: Buffer, at: number): Commit | string {
  if (tail.readUInt32LE(0) !== MAGIC || tail.readUInt32LE(4) !== TYPE.commit) return 'no commit record';
  if (!xxh128(tail.subarray(0, HEAD + COMMIT_PAYLOAD)).equals(tail.subarray(HEAD + COMMIT_PAYLOAD))) return 'its checksum does not match';
  const seq = getU64(tail, 8), length = getU64(tail, 24);
  const p = tail.subarray(HEAD);
  const records = getU64(p, 0), dataBytes = getU64(p, 8), zeroBytes = getU64(p, 16), commitAt = getU64(p, 24), badBlocks = getU64(p, 32);
  if (seq === undefined || records === undefined || dataBytes === undefined || zeroBytes === undefined || badBlocks === undefined) return 'a field is out of range';
  if (length !== COMMIT_PAYLOAD || commitAt !== at) return `it says it is at byte ${String(commitAt)}`;
  return { seq, prev: Buffer.from(tail.subarray(32, 48)), at, records, dataBytes, zeroBytes, badBlocks };
}

function checkHeader(j: unknown): JournalHeader | string {
  if (typeof j !== 'object' || j === null || Array.isArray(j)) return 'not a JSON object';
  const h = j as Record<string, unknown>;
  if (h.format !== JOURNAL_FORMAT || h.version !== JOURNAL_VERSION) return `format ${String(h.format)} version ${String(h.version)}, this livesnap reads ${JOURNAL_FORMAT} ${JOURNAL_VERSION}`;
  if (h.kind !== 'delta' && h.kind !== 'full' && h.kind !== 'replace') return `unknown kind ${String(h.kind)}`;
  if (h.base !== null && (typeof h.base !== 'string' || h.base.length === 0 || h.base.length > 256)) return 'no valid base';
  if (h.kind === 'delta' && h.base === null) return 'a delta without a base';
  if (typeof h.target !== 'object' || h.target === null) return 'no target';
  const t = checkMetaFields({ ...(h.target as Record<string, unknown>), badBlocks: 0 });
  if (typeof t === 'string') return `target: ${t}`;
  if (h.kind === 'replace' && (typeof h.partial !== 'string' || h.partial !== t.storage)) return 'a replace without its staged file';
  const { badBlocks: _b, ...target } = t;
  return { kind: h.kind, base: h.base as string | null, target, ...(h.kind === 'replace' ? { partial: h.partial as string } : {}) };
}

/**
 * Reads and checks a whole journal without applying anything. Uncommitted: no valid commit record
 * ends it (cut short while staging). Committed: every record checks, in sequence and chained, within
 * the volume and sector-aligned. Throws JournalDamagedError for a committed journal that does not.
 */
export async function readJournal(src: JournalSource, name: string): Promise<JournalRead> {
  const size = src.size;
  if (size < RECORD_OVERHEAD + COMMIT_BYTES) return { state: 'uncommitted', why: `${size} bytes, shorter than a header and a commit record`, bytes: size };
  const commitAt = size - COMMIT_BYTES;
  const c = decodeCommit(await src.read(commitAt, COMMIT_BYTES), commitAt);
  if (typeof c === 'string') return { state: 'uncommitted', why: `its last ${COMMIT_BYTES} bytes are not a valid commit record (${c})`, bytes: size };
  // From here on the journal says it was committed (an apply may have begun): anything wrong is damage.
  const damaged = (at: number, why: string) => new JournalDamagedError(
    `the replica journal ${name} is committed but damaged at byte ${at}: ${why}`,
    'it was not applied, and the replica may hold part of an earlier apply of it: run a full backup to the replica ("livesnap backup <export> --to replica:PATH" rewrites it and drops this journal)',
  );
  let pos = 0, seq = 0, prev: Buffer = NO_CHECK, dataBytes = 0, zeroBytes = 0;
  let header: JournalHeader | undefined;
  const entries: JournalEntry[] = [];
  while (pos < commitAt) {
    if (commitAt - pos < RECORD_OVERHEAD) throw damaged(pos, 'a record runs into the commit record');
    const h = await src.read(pos, HEAD);
    if (h.readUInt32LE(0) !== MAGIC) throw damaged(pos, 'no record starts here');
    const type = h.readUInt32LE(4), rseq = getU64(h, 8), offset = getU64(h, 16), length = getU64(h, 24);
    if (rseq !== seq) throw damaged(pos, `record ${String(rseq)} where record ${seq} belongs`);
    if (!h.subarray(32, 48).equals(prev)) throw damaged(pos, `record ${seq} does not follow record ${seq - 1}`);
    if (offset === undefined || length === undefined) throw damaged(pos, `record ${seq} has an offset or length past 2^53`);
    if ((seq === 0) !== (type === TYPE.header)) throw damaged(pos, seq === 0 ? 'the journal does not start with its header' : `a second header at record ${seq}`);
    if (type !== TYPE.header && type !== TYPE.zero && type !== TYPE.data) throw damaged(pos, `record ${seq} has ${type === TYPE.commit ? 'a commit record before the end' : `unknown type ${type}`}`);
    const plen = type === TYPE.zero ? 0 : length;
    if (type === TYPE.header && length > MAX_HEADER_PAYLOAD) throw damaged(pos, `a header of ${length} bytes`);
    if (type === TYPE.data && (length === 0 || length > MAX_DATA_RECORD)) throw damaged(pos, `record ${seq} claims ${length} bytes of data`);
    if (plen > commitAt - pos - RECORD_OVERHEAD) throw damaged(pos, `record ${seq} runs past the commit record`);
    const rec = await src.read(pos, HEAD + plen + CHECK);
    if (!xxh128(rec.subarray(0, HEAD + plen)).equals(rec.subarray(HEAD + plen))) throw damaged(pos, `record ${seq}'s checksum does not match`);
    if (type === TYPE.header) {
      let j: unknown;
      try { j = JSON.parse(rec.subarray(HEAD, HEAD + plen).toString('utf8')); } catch { throw damaged(pos, 'the header is not JSON'); }
      const hd = checkHeader(j);
      if (typeof hd === 'string') throw damaged(pos, `header: ${hd}`);
      header = hd;
    } else {
      const vs = header!.target.volumeSize;
      if (length === 0 || offset % 512 !== 0 || length % 512 !== 0) throw damaged(pos, `record ${seq}: range ${offset}+${length} is not whole 512-byte sectors`);
      if (offset > vs || length > vs - offset) throw damaged(pos, `record ${seq}: range ${offset}+${length} is outside the ${vs}-byte volume`);
      if (header!.kind === 'replace') throw damaged(pos, 'a replace journal carries no ranges');
      entries.push({ type: type === TYPE.zero ? 'zero' : 'data', offset, length, at: pos + HEAD });
      if (type === TYPE.zero) zeroBytes += length; else dataBytes += length;
    }
    prev = rec.subarray(HEAD + plen);
    seq++;
    pos += RECORD_OVERHEAD + plen;
  }
  if (!header) throw damaged(0, 'no header');
  if (c.seq !== seq || !c.prev.equals(prev)) throw damaged(commitAt, 'the commit record does not follow the last record');
  if (c.records !== seq || c.dataBytes !== dataBytes || c.zeroBytes !== zeroBytes) throw damaged(commitAt, `the commit record counts ${c.records} records, ${c.dataBytes} data bytes, ${c.zeroBytes} zeroed bytes; the journal has ${seq}, ${dataBytes}, ${zeroBytes}`);
  return { state: 'committed', header, entries, commit: { records: c.records, dataBytes, zeroBytes, badBlocks: c.badBlocks }, bytes: size };
}
