// ustar header blocks and POSIX pax extended headers (typeflag 'x'), as GNU tar and bsdtar read them.
// Only what livesnap writes: regular files, pax records for what does not fit in ustar fields.
import { ArchiveError } from './errors';

export const BLOCK = 512;

/** Largest size a 12-byte octal ustar field can hold (8 GiB - 1); beyond it the pax `size` key is used. */
export const USTAR_MAX_SIZE = 0o77777777777;

export interface HeaderFields {
  name: string;
  size: number;
  mode?: number;
  uid?: number;
  gid?: number;
  uname?: string;
  gname?: string;
  /** Seconds since the epoch. */
  mtime: number;
  /** '0' regular file, 'x' pax extended header. */
  typeflag: '0' | 'x';
}

function putString(b: Buffer, off: number, len: number, s: string): void {
  const bytes = Buffer.from(s, 'utf8');
  if (bytes.length > len) throw new RangeError(`ustar field too long: "${s}" (max ${len} bytes)`);
  bytes.copy(b, off);
}

function putOctal(b: Buffer, off: number, len: number, v: number): void {
  // len-1 octal digits, zero-padded, then NUL.
  const s = Math.floor(v).toString(8);
  if (s.length > len - 1) throw new RangeError(`value ${v} does not fit a ${len}-byte ustar field`);
  putString(b, off, len, s.padStart(len - 1, '0'));
}

/** One 512-byte ustar header block. */
export function ustarHeader(f: HeaderFields): Buffer {
  const b = Buffer.alloc(BLOCK);
  putString(b, 0, 100, f.name);
  putOctal(b, 100, 8, f.mode ?? 0o600);
  putOctal(b, 108, 8, f.uid ?? 0);
  putOctal(b, 116, 8, f.gid ?? 0);
  putOctal(b, 124, 12, f.size > USTAR_MAX_SIZE ? 0 : f.size);
  putOctal(b, 136, 12, f.mtime);
  b.write(f.typeflag, 156, 'latin1');
  b.write('ustar\0', 257, 'latin1');
  b.write('00', 263, 'latin1');
  putString(b, 265, 32, f.uname ?? 'root');
  putString(b, 297, 32, f.gname ?? 'root');
  putOctal(b, 329, 8, 0);
  putOctal(b, 337, 8, 0);
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += b[i]!;
  putString(b, 148, 8, sum.toString(8).padStart(6, '0') + '\0 ');
  return b;
}

/** The body of a pax extended header: "len key=value\n" records, len counting itself. */
export function paxRecords(entries: Array<[string, string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of entries) {
    const body = ` ${k}=${v}\n`;
    const bodyLen = Buffer.byteLength(body);
    let len = bodyLen + 1;
    while (String(len).length + bodyLen !== len) len = String(len).length + bodyLen;
    parts.push(Buffer.from(`${len}${body}`, 'utf8'));
  }
  return Buffer.concat(parts);
}

/** Zero bytes that pad `n` up to a whole 512-byte block. */
export function padTo512(n: number): number {
  return (BLOCK - (n % BLOCK)) % BLOCK;
}

/** A regular-file member: optional pax header, ustar header, body and padding, as one buffer. */
export function smallMember(name: string, body: Buffer, mtime: number, owner: Owner): Buffer {
  return Buffer.concat([ustarHeader({ name, size: body.length, mtime, typeflag: '0', ...owner }), body, Buffer.alloc(padTo512(body.length))]);
}

export interface Owner { uid: number; gid: number; uname: string; gname: string }

export interface ParsedHeader {
  name: string;
  mode: number;
  size: number;
  mtime: number;
  typeflag: string;
  magic: string;
}

export function isZeroBlock(b: Uint8Array): boolean {
  for (let i = 0; i < BLOCK; i++) if (b[i] !== 0) return false;
  return true;
}

function readString(b: Uint8Array, off: number, len: number): string {
  let end = off;
  while (end < off + len && b[end] !== 0) end++;
  return Buffer.from(b.buffer, b.byteOffset + off, end - off).toString('utf8');
}

function readOctal(b: Uint8Array, off: number, len: number, what: string, archiveOffset: number): number {
  if (b[off]! & 0x80) { // 32-bit-ok: a byte
    // GNU base-256: big-endian binary in the remaining bytes.
    let v = 0;
    for (let i = off + 1; i < off + len; i++) v = v * 256 + b[i]!;
    return v;
  }
  const s = readString(b, off, len).trim();
  if (s === '') return 0;
  if (!/^[0-7]+$/.test(s)) throw new ArchiveError(`bad ${what} field "${s}" in the tar header at archive offset ${archiveOffset}`, archiveOffset);
  return parseInt(s, 8);
}

/** The header's checksum: the sum of its bytes with the checksum field counted as spaces. */
function headerSum(b: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : b[i]!;
  return sum;
}

/** True when a 512-byte block is a tar header by its checksum (v7, ustar and GNU headers alike). */
export function headerChecksumOk(b: Uint8Array): boolean {
  const stored = readString(b, 148, 8).trim();
  return /^[0-7]+$/.test(stored) && parseInt(stored, 8) === headerSum(b);
}

/** Parses and checks a ustar header block (checksum first: a corrupt header is named as such). */
export function parseUstarHeader(b: Uint8Array, archiveOffset: number): ParsedHeader {
  if (!headerChecksumOk(b)) {
    const stored = readString(b, 148, 8).trim(), sum = headerSum(b);
    if (archiveOffset === 0) throw new ArchiveError('not a livesnap archive: its first 512 bytes are not a tar header (another kind of file, or damaged at the start)', 0);
    throw new ArchiveError(`tar header checksum mismatch at archive offset ${archiveOffset} (stored ${JSON.stringify(stored)}, computed ${sum.toString(8)}): the header is corrupt`, archiveOffset);
  }
  const prefix = readString(b, 345, 155);
  const name = readString(b, 0, 100);
  return {
    name: prefix ? `${prefix}/${name}` : name,
    mode: readOctal(b, 100, 8, 'mode', archiveOffset),
    size: readOctal(b, 124, 12, 'size', archiveOffset),
    mtime: readOctal(b, 136, 12, 'mtime', archiveOffset),
    typeflag: String.fromCharCode(b[156]! || 0x30),
    magic: readString(b, 257, 6),
  };
}

/** Parses a pax extended header body; errors name the archive offset of the bad record. */
export function parsePaxRecords(body: Buffer, archiveOffset: number): Map<string, string> {
  const out = new Map<string, string>();
  let i = 0;
  while (i < body.length) {
    if (body[i] === 0) break;
    const sp = body.indexOf(0x20, i);
    const lenText = sp < 0 ? '' : body.subarray(i, sp).toString('latin1');
    const len = /^[0-9]+$/.test(lenText) ? Number(lenText) : NaN;
    if (!(len > 0) || i + len > body.length || body[i + len - 1] !== 0x0a) {
      throw new ArchiveError(`bad pax extended header record at archive offset ${archiveOffset + i}`, archiveOffset + i);
    }
    const rec = body.subarray(sp + 1, i + len - 1).toString('utf8');
    const eq = rec.indexOf('=');
    if (eq <= 0) throw new ArchiveError(`bad pax extended header record at archive offset ${archiveOffset + i}`, archiveOffset + i);
    out.set(rec.slice(0, eq), rec.slice(eq + 1));
    i += len;
  }
  return out;
}
