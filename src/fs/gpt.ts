// The GUID partition table: the primary header at LBA 1 and its entry array, both checked by their
// CRC32s; when the primary is damaged, the backup header at the last LBA (and its own entry
// array). Every entry must lie inside the usable area and no two may overlap; anything else throws,
// and the caller copies the whole disk and says why.
import type { BlockReader } from '../device/device';
import { crc32 } from './crc32';
import { isProtectiveMbr } from './mbr';
import { gptTypeName, guidText, type Partition, type PartitionTable } from './partition-types';
import { CorruptFileSystemError } from './used-map';

const SIGNATURE = Buffer.from('EFI PART', 'latin1');
const MIN_HEADER = 92;
/** The entry array may be at most this large (the spec's minimum is 16 KiB; 128 x 128 bytes is usual). */
const MAX_ARRAY_BYTES = 4 << 20;

function corrupt(message: string): CorruptFileSystemError {
  return new CorruptFileSystemError('gpt', message);
}

interface Header {
  lba: number;
  sectorSize: number;
  myLba: number;
  alternateLba: number;
  firstUsable: number;
  lastUsable: number;
  entriesLba: number;
  entryCount: number;
  entrySize: number;
  entriesCrc: number;
  diskGuid: string;
}

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} ${v} is out of range`);
  return Number(v);
}

/** Parses and checks one header sector; returns a reason string when it is not a valid header. */
function parseHeader(sector: Buffer, lba: number, sectorSize: number, diskSectors: number, which: string): Header | string {
  if (!sector.subarray(0, 8).equals(SIGNATURE)) return `no "EFI PART" signature at LBA ${lba}`;
  const size = sector.readUInt32LE(12);
  if (size < MIN_HEADER || size > sectorSize) return `${which} header size ${size} is out of range (${MIN_HEADER}..${sectorSize})`;
  const stored = sector.readUInt32LE(16);
  const copy = Buffer.from(sector.subarray(0, size));
  copy.writeUInt32LE(0, 16);
  const got = crc32(copy);
  if (got !== stored) return `${which} header CRC32 mismatch (stored 0x${stored.toString(16)}, computed 0x${got.toString(16)})`;
  let h: Header;
  try {
    h = {
      lba, sectorSize,
      myLba: u64(sector, 24, 'header LBA'),
      alternateLba: u64(sector, 32, 'alternate header LBA'),
      firstUsable: u64(sector, 40, 'first usable LBA'),
      lastUsable: u64(sector, 48, 'last usable LBA'),
      diskGuid: guidText(sector, 56),
      entriesLba: u64(sector, 72, 'entry array LBA'),
      entryCount: sector.readUInt32LE(80),
      entrySize: sector.readUInt32LE(84),
      entriesCrc: sector.readUInt32LE(88),
    };
  } catch (e) {
    if (e instanceof CorruptFileSystemError) return `${which} header: ${e.message}`;
    throw e;
  }
  if (h.myLba !== lba) return `${which} header says it lives at LBA ${h.myLba}, but it was read at LBA ${lba}`;
  if (h.alternateLba === lba || h.alternateLba >= diskSectors) return `${which} header's alternate LBA ${h.alternateLba} is impossible on a disk of ${diskSectors} sectors`;
  if (h.firstUsable > h.lastUsable || h.lastUsable >= diskSectors) {
    return `${which} header's usable area (LBA ${h.firstUsable}..${h.lastUsable}) does not fit the disk (${diskSectors} sectors)`;
  }
  if (h.entrySize < 128 || h.entrySize > 4096 || h.entrySize % 8 !== 0) return `${which} header's entry size ${h.entrySize} is impossible`;
  const arrayBytes = h.entryCount * h.entrySize;
  if (h.entryCount === 0 || arrayBytes > MAX_ARRAY_BYTES) return `${which} header's entry array (${h.entryCount} x ${h.entrySize} bytes) is impossible`;
  const arraySectors = Math.ceil(arrayBytes / sectorSize);
  if (h.entriesLba < 2 || h.entriesLba + arraySectors > diskSectors) return `${which} header's entry array at LBA ${h.entriesLba} (${arraySectors} sectors) runs past the disk`;
  const arrayEnd = h.entriesLba + arraySectors - 1;
  if (!(arrayEnd < h.firstUsable || h.entriesLba > h.lastUsable)) return `${which} header's entry array (LBA ${h.entriesLba}..${arrayEnd}) overlaps the usable area`;
  if (h.lba >= h.firstUsable && h.lba <= h.lastUsable) return `${which} header (LBA ${h.lba}) lies inside the usable area`;
  return h;
}

/** Entries of a checked header; a reason string when the array's CRC fails or an entry is impossible. */
function parseEntries(h: Header, array: Buffer, which: string): Partition[] | string {
  const got = crc32(array, 0, h.entryCount * h.entrySize);
  if (got !== h.entriesCrc) return `${which} entry array CRC32 mismatch (stored 0x${h.entriesCrc.toString(16)}, computed 0x${got.toString(16)})`;
  const out: Partition[] = [];
  for (let i = 0; i < h.entryCount; i++) {
    const o = i * h.entrySize;
    if (array.subarray(o, o + 16).every((b) => b === 0)) continue;
    const typeId = guidText(array, o);
    const first = array.readBigUInt64LE(o + 32);
    const last = array.readBigUInt64LE(o + 40);
    if (first > last || first < BigInt(h.firstUsable) || last > BigInt(h.lastUsable)) {
      return `entry ${i + 1} (LBA ${first}..${last}) lies outside the usable area (LBA ${h.firstUsable}..${h.lastUsable})`;
    }
    const nameRaw = array.subarray(o + 56, o + Math.min(128, h.entrySize));
    let name = '';
    for (let k = 0; k + 1 < nameRaw.length; k += 2) {
      const c = nameRaw.readUInt16LE(k);
      if (c === 0) break;
      name += String.fromCharCode(c);
    }
    out.push({
      number: i + 1,
      offset: Number(first) * h.sectorSize,
      size: (Number(last) - Number(first) + 1) * h.sectorSize,
      typeId,
      typeName: gptTypeName(typeId),
      ...(name ? { label: name } : {}),
    });
  }
  const sorted = [...out].sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1]!, b = sorted[i]!;
    if (b.offset < a.offset + a.size) return `entries ${a.number} and ${b.number} overlap (bytes ${b.offset}..${Math.min(a.offset + a.size, b.offset + b.size) - 1})`;
  }
  return sorted;
}

/** Sector size of a GPT on this device (512 or 4096), or undefined when LBA 1 holds no signature. */
export async function gptSectorSize(reader: BlockReader): Promise<number | undefined> {
  for (const ss of [512, 4096]) {
    if (reader.size < 2 * ss) continue;
    const b = await reader.read(ss, 8);
    if (b.equals(SIGNATURE)) return ss;
  }
  return undefined;
}

/** True when the device carries a GPT: a signature at LBA 1, or a protective MBR (the primary may be lost). */
export async function probeGpt(reader: BlockReader): Promise<boolean> {
  if (reader.size < 1024) return false;
  if ((await gptSectorSize(reader)) !== undefined) return true;
  return isProtectiveMbr(await reader.read(0, 512));
}

export async function readGpt(reader: BlockReader): Promise<PartitionTable> {
  const notes: string[] = [];
  const s0 = await reader.read(0, 512);
  const protective = isProtectiveMbr(s0);
  const found = await gptSectorSize(reader);
  const sectorSize = found ?? 512;
  const diskSectors = Math.floor(reader.size / sectorSize);
  if (diskSectors < 4) throw corrupt(`the device (${reader.size} bytes) is too small for a GPT`);
  if (!protective) notes.push('no protective MBR in sector 0: the GPT is used as found');

  const tryHeader = async (lba: number, which: string): Promise<{ h: Header; parts: Partition[] } | string> => {
    const sector = await reader.read(lba * sectorSize, sectorSize);
    const h = parseHeader(sector, lba, sectorSize, diskSectors, which);
    if (typeof h === 'string') return h;
    const array = await reader.read(h.entriesLba * sectorSize, Math.ceil((h.entryCount * h.entrySize) / sectorSize) * sectorSize);
    const parts = parseEntries(h, array, which);
    if (typeof parts === 'string') return parts;
    return { h, parts };
  };

  const primary = await tryHeader(1, 'primary');
  let used: { h: Header; parts: Partition[] };
  let backup: { h: Header; parts: Partition[] } | string;
  if (typeof primary !== 'string') {
    used = primary;
    backup = primary.h.alternateLba < diskSectors ? await tryHeader(primary.h.alternateLba, 'backup') : 'the backup header is past the end of the disk';
    if (primary.h.alternateLba !== diskSectors - 1) {
      notes.push(`the backup GPT header is at LBA ${primary.h.alternateLba}, not at the last LBA ${diskSectors - 1} (the disk was grown or cut)`);
    }
    if (typeof backup === 'string') notes.push(`the backup GPT is not valid (${backup}): the primary is used`);
  } else {
    // The primary is lost: only a disk that still says "GPT" (protective MBR) may use the backup.
    if (!protective) throw corrupt(`primary GPT: ${primary}`);
    backup = await tryHeader(diskSectors - 1, 'backup');
    if (typeof backup === 'string') throw corrupt(`primary GPT: ${primary}; backup GPT at the last LBA: ${backup}`);
    used = backup;
    notes.push(`the primary GPT is damaged (${primary}): the backup GPT at the end of the disk is used`);
  }
  const tableRanges: Array<[number, number]> = [[0, sectorSize]];
  const addHeader = (h: Header) => {
    tableRanges.push([h.lba * sectorSize, (h.lba + 1) * sectorSize]);
    tableRanges.push([h.entriesLba * sectorSize, (h.entriesLba + Math.ceil((h.entryCount * h.entrySize) / sectorSize)) * sectorSize]);
  };
  addHeader(used.h);
  if (typeof backup !== 'string' && backup !== used) addHeader(backup.h);
  // Where the other copy should be, even when it is damaged: restored as it is.
  if (used.h.alternateLba < diskSectors) tableRanges.push([used.h.alternateLba * sectorSize, (used.h.alternateLba + 1) * sectorSize]);
  if (typeof primary === 'string') tableRanges.push([sectorSize, 2 * sectorSize]);
  tableRanges.sort((a, b) => a[0] - b[0]);
  return { kind: 'gpt', sectorSize, partitions: used.parts, tableRanges, notes };
}
