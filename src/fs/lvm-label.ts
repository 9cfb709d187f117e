// The on-disk parts of an LVM2 physical volume: the label (LABELONE in one of the first four
// sectors, with its CRC), the PV header (UUID, size, data and metadata areas), and each metadata
// area's header (its CRC, and raw_locn: where the current metadata text lies in the ring buffer,
// with the CRC of that text). Every offset is checked against the PV's size before it is read.
import type { BlockReader } from '../device/device';
import { crc32Update, LVM_INITIAL_CRC } from './crc32';
import { CorruptFileSystemError } from './used-map';

const SECTOR = 512;
const LABEL_SCAN_SECTORS = 4;
const LABEL_ID = 'LABELONE';
const LABEL_TYPE = 'LVM2 001';
const MDA_MAGIC = Buffer.from(' LVM2 x[5A%r0N*>', 'latin1');
const MDA_HEADER_SIZE = 512;
const RAW_LOCN_IGNORED = 1;
/** Metadata text larger than this is not believed (LVM's own areas are 1 MiB by default). */
const MAX_TEXT = 64 << 20;

export function corruptLvm(message: string): CorruptFileSystemError {
  return new CorruptFileSystemError('lvm2', message);
}

export interface DiskArea {
  offset: number;
  size: number;
}

export interface PvLabel {
  sector: number;
  /** The 32-character PV UUID as stored (no dashes). */
  uuid: string;
  deviceSize: number;
  dataAreas: DiskArea[];
  metadataAreas: DiskArea[];
}

export interface MetadataText {
  /** Byte offset of the metadata area on the PV. */
  area: number;
  text: string;
}

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corruptLvm(`${what} ${v} is out of range`);
  return Number(v);
}

/** Sector index of a LABELONE label (any CRC), or -1. */
export async function findLabel(reader: BlockReader): Promise<number> {
  const n = Math.min(LABEL_SCAN_SECTORS, Math.floor(reader.size / SECTOR));
  if (n < 1) return -1;
  const head = await reader.read(0, n * SECTOR);
  for (let s = 0; s < n; s++) if (head.toString('latin1', s * SECTOR, s * SECTOR + 8) === LABEL_ID && head.toString('latin1', s * SECTOR + 24, s * SECTOR + 32) === LABEL_TYPE) return s;
  return -1;
}

export async function readPvLabel(reader: BlockReader): Promise<PvLabel> {
  const s = await findLabel(reader);
  if (s < 0) throw corruptLvm('no LVM2 label (LABELONE) in the first four sectors');
  const b = await reader.read(s * SECTOR, SECTOR);
  const sectorXl = u64(b, 8, 'label sector number');
  if (sectorXl !== s) throw corruptLvm(`the label in sector ${s} says it belongs in sector ${sectorXl}`);
  const stored = b.readUInt32LE(16);
  const got = crc32Update(LVM_INITIAL_CRC, b, 20, SECTOR);
  if (stored !== got) throw corruptLvm(`label CRC mismatch (stored 0x${stored.toString(16)}, computed 0x${got.toString(16)})`);
  const off = b.readUInt32LE(20);
  if (off < 32 || off + 32 + 8 + 16 > SECTOR) throw corruptLvm(`label's PV header offset ${off} is outside the label sector`);
  const uuid = b.toString('latin1', off, off + 32);
  if (!/^[A-Za-z0-9!#+.\-_=?]{32}$/.test(uuid)) throw corruptLvm('the PV UUID holds characters LVM never writes');
  const deviceSize = u64(b, off + 32, 'PV device size');
  let p = off + 40;
  const list = (what: string): DiskArea[] => {
    const out: DiskArea[] = [];
    for (;;) {
      if (p + 16 > SECTOR) throw corruptLvm(`the PV header's ${what} list runs past the label sector`);
      const o = u64(b, p, `${what} offset`);
      const z = u64(b, p + 8, `${what} size`);
      p += 16;
      if (o === 0) return out;
      out.push({ offset: o, size: z });
    }
  };
  const dataAreas = list('data area');
  const metadataAreas = list('metadata area');
  if (dataAreas.length > 1) throw corruptLvm(`the PV header lists ${dataAreas.length} data areas (LVM2 writes one)`);
  for (const a of [...dataAreas, ...metadataAreas]) {
    if (a.offset >= reader.size || a.offset + a.size > reader.size) throw corruptLvm(`an area at byte ${a.offset} (${a.size} bytes) lies past the end of the PV (${reader.size} bytes)`);
  }
  for (const m of metadataAreas) {
    if (m.size < 2 * MDA_HEADER_SIZE) throw corruptLvm(`the metadata area at byte ${m.offset} is only ${m.size} bytes`);
    if (m.offset < (s + 1) * SECTOR) throw corruptLvm(`the metadata area at byte ${m.offset} overlaps the label`);
  }
  return { sector: s, uuid, deviceSize, dataAreas, metadataAreas };
}

/**
 * The current metadata text of each metadata area: the mda header's CRC, then raw_locn[0] (the
 * newest copy; it may wrap around the end of the ring buffer), then the text's own CRC. Areas that
 * fail are reported in `problems`; areas without metadata (an orphan PV) yield nothing.
 */
export async function readMetadataTexts(reader: BlockReader, label: PvLabel): Promise<{ texts: MetadataText[]; empty: number; problems: string[] }> {
  const texts: MetadataText[] = [];
  const problems: string[] = [];
  let empty = 0;
  const headers = await reader.readMany(label.metadataAreas.map((m) => ({ offset: m.offset, length: MDA_HEADER_SIZE })));
  for (let k = 0; k < label.metadataAreas.length; k++) {
    const m = label.metadataAreas[k]!;
    const h = headers[k]!;
    const where = `metadata area at byte ${m.offset}`;
    const stored = h.readUInt32LE(0);
    const got = crc32Update(LVM_INITIAL_CRC, h, 4, MDA_HEADER_SIZE);
    if (stored !== got) { problems.push(`${where}: header CRC mismatch (stored 0x${stored.toString(16)}, computed 0x${got.toString(16)})`); continue; }
    if (!h.subarray(4, 20).equals(MDA_MAGIC)) { problems.push(`${where}: bad magic`); continue; }
    if (h.readUInt32LE(20) !== 1) { problems.push(`${where}: version ${h.readUInt32LE(20)} is not 1`); continue; }
    let start: number, size: number, off: number, len: number;
    try {
      start = u64(h, 24, 'mda start');
      size = u64(h, 32, 'mda size');
      off = u64(h, 40, 'raw_locn offset');
      len = u64(h, 48, 'raw_locn size');
    } catch (e) {
      problems.push(`${where}: ${(e as Error).message}`);
      continue;
    }
    const textCrc = h.readUInt32LE(56);
    const flags = h.readUInt32LE(60);
    if (start !== m.offset || size !== m.size) { problems.push(`${where}: its header says it is ${size} bytes at ${start}, the PV header says ${m.size} at ${m.offset}`); continue; }
    if (flags & RAW_LOCN_IGNORED) { empty++; continue; }
    if (off === 0 && len === 0) { empty++; continue; }
    if (off < MDA_HEADER_SIZE || off >= size || len === 0 || len > size - MDA_HEADER_SIZE || len > MAX_TEXT) {
      problems.push(`${where}: metadata text of ${len} bytes at ${off} does not fit the ${size}-byte area`);
      continue;
    }
    // The ring buffer: text past the end of the area continues right after the header.
    const first = Math.min(len, size - off);
    const ranges = [{ offset: m.offset + off, length: first }];
    if (first < len) ranges.push({ offset: m.offset + MDA_HEADER_SIZE, length: len - first });
    const parts = await reader.readMany(ranges);
    let crc = LVM_INITIAL_CRC;
    for (const part of parts) crc = crc32Update(crc, part);
    if (crc !== textCrc) { problems.push(`${where}: metadata text CRC mismatch (stored 0x${textCrc.toString(16)}, computed 0x${crc.toString(16)})`); continue; }
    texts.push({ area: m.offset, text: Buffer.concat(parts).toString('latin1') });
  }
  return { texts, empty, problems };
}
