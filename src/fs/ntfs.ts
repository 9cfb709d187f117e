// NTFS used-block map from $Bitmap: the boot sector gives the cluster size and where the MFT is;
// MFT record 0 ($MFT) maps the MFT itself; record 6 ($Bitmap) holds the non-resident $DATA whose
// data runs locate the cluster bitmap (bit i = cluster i in use). Every record is checked (FILE
// magic, update sequence fixups, attribute bounds), every run must stay inside the volume, and the
// clusters of $MFT and $Bitmap must themselves be marked in use. The boot sector and its backup (the
// last sector of the volume) are kept. A volume marked dirty ($Volume) is copied whole: Windows
// replays $LogFile at its next mount and may change allocations.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import { CorruptFileSystemError, type FileSystemReader, type UsedBlockMap } from './used-map';

const MFT_RECORD_MFT = 0;
const MFT_RECORD_VOLUME = 3;
const MFT_RECORD_BITMAP = 6;
const ATTR_ATTRIBUTE_LIST = 0x20;
const ATTR_VOLUME_INFORMATION = 0x70;
const ATTR_DATA = 0x80;
const ATTR_END = 0xffffffff;
const VOLUME_IS_DIRTY = 1;
const READ_CHUNK = 1 << 20;
const BATCH = 64;

function corrupt(message: string): CorruptFileSystemError {
  return new CorruptFileSystemError('ntfs', message);
}

export interface NtfsGeometry {
  bytesPerSector: number;
  clusterSize: number;
  totalSectors: number;
  clusters: number;
  mftLcn: number;
  mftMirrLcn: number;
  recordSize: number;
}

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} ${v} is out of range`);
  return Number(v);
}

export function parseNtfsBoot(b: Buffer, deviceSize: number): NtfsGeometry {
  if (b.toString('latin1', 3, 11) !== 'NTFS    ') throw corrupt('no NTFS signature in the boot sector');
  if (b[510] !== 0x55 || b[511] !== 0xaa) throw corrupt('the boot sector has no 0x55aa signature');
  const bps = b.readUInt16LE(11);
  if (![512, 1024, 2048, 4096].includes(bps)) throw corrupt(`bytes per sector ${bps} is impossible`);
  const spcRaw = b[13]!;
  // Above 0x80 the field is a negative power of two (clusters of 128 KiB and more).
  const spc = spcRaw <= 0x80 ? spcRaw : 2 ** (256 - spcRaw);
  if (spc < 1 || !Number.isInteger(Math.log2(spc)) || spc * bps > 2 << 20) throw corrupt(`sectors per cluster ${spcRaw} is impossible`);
  const clusterSize = spc * bps;
  const totalSectors = u64(b, 0x28, 'total sectors');
  if (totalSectors === 0) throw corrupt('total sectors is 0');
  if (totalSectors * bps > deviceSize) throw corrupt(`the volume (${totalSectors} sectors of ${bps} bytes) is larger than the device (${deviceSize} bytes)`);
  const clusters = Math.floor(totalSectors / spc);
  const mftLcn = u64(b, 0x30, 'MFT cluster');
  const mftMirrLcn = u64(b, 0x38, 'MFT mirror cluster');
  if (mftLcn >= clusters || mftMirrLcn >= clusters) throw corrupt(`the MFT (cluster ${mftLcn}) or its mirror (cluster ${mftMirrLcn}) lies past the ${clusters} clusters`);
  const cpr = b.readInt8(0x40);
  const recordSize = cpr > 0 ? cpr * clusterSize : 2 ** -cpr;
  if (!Number.isInteger(Math.log2(recordSize)) || recordSize < 512 || recordSize > 65536 || recordSize % bps !== 0) throw corrupt(`MFT record size ${recordSize} is impossible`);
  return { bytesPerSector: bps, clusterSize, totalSectors, clusters, mftLcn, mftMirrLcn, recordSize };
}

/** Applies the update sequence fixups of a multi-sector record in place. */
export function applyFixups(rec: Buffer, what: string, sector = 512): void {
  if (rec.toString('latin1', 0, 4) !== 'FILE') throw corrupt(`${what}: no FILE magic`);
  const usaOfs = rec.readUInt16LE(4);
  const usaCount = rec.readUInt16LE(6);
  if (usaCount !== rec.length / sector + 1 || usaOfs < 42 || usaOfs % 2 !== 0 || usaOfs + usaCount * 2 > rec.length) throw corrupt(`${what}: update sequence array (${usaCount} entries at ${usaOfs}) is impossible`);
  const usn = rec.readUInt16LE(usaOfs);
  for (let i = 1; i < usaCount; i++) {
    const end = i * sector - 2;
    if (rec.readUInt16LE(end) !== usn) throw corrupt(`${what}: sector ${i - 1} was torn (update sequence mismatch)`);
    rec.writeUInt16LE(rec.readUInt16LE(usaOfs + 2 * i), end);
  }
}

interface Attribute {
  type: number;
  nameLength: number;
  nonResident: boolean;
  /** Resident: the value. */
  value?: Buffer;
  /** Non-resident: runs and sizes. */
  runs?: Array<{ vcn: number; lcn: number | undefined; length: number }>;
  lowestVcn?: number;
  dataSize?: number;
  allocatedSize?: number;
}

/** Decodes a mapping-pairs array: (length, signed LCN delta) pairs; a delta of no bytes = sparse run. */
export function decodeRuns(b: Buffer, start: number, end: number, firstVcn: number, clusters: number, what: string): Array<{ vcn: number; lcn: number | undefined; length: number }> {
  const out: Array<{ vcn: number; lcn: number | undefined; length: number }> = [];
  let p = start;
  let vcn = firstVcn;
  let lcn = 0;
  for (;;) {
    if (p >= end) throw corrupt(`${what}: data runs are not terminated`);
    const h = b[p]!;
    if (h === 0) break;
    const lenBytes = h % 16;
    const offBytes = Math.floor(h / 16);
    if (lenBytes === 0 || lenBytes > 8 || offBytes > 8 || p + 1 + lenBytes + offBytes > end) throw corrupt(`${what}: malformed data run header 0x${h.toString(16)}`);
    let length = 0;
    for (let k = lenBytes - 1; k >= 0; k--) length = length * 256 + b[p + 1 + k]!;
    if (!Number.isSafeInteger(length) || length === 0) throw corrupt(`${what}: data run length is impossible`);
    let cur: number | undefined;
    if (offBytes > 0) {
      let delta = 0;
      for (let k = offBytes - 1; k >= 0; k--) delta = delta * 256 + b[p + 1 + lenBytes + k]!;
      if (b[p + lenBytes + offBytes]! >= 0x80) delta -= 2 ** (8 * offBytes);
      lcn += delta;
      if (!Number.isSafeInteger(lcn) || lcn < 0 || lcn + length > clusters) throw corrupt(`${what}: data run of ${length} clusters at cluster ${lcn} lies outside the ${clusters} clusters`);
      cur = lcn;
    }
    out.push({ vcn, lcn: cur, length });
    vcn += length;
    p += 1 + lenBytes + offBytes;
  }
  return out;
}

/** The attributes of a fixed-up MFT record. */
function attributes(rec: Buffer, clusters: number, what: string): Attribute[] {
  const flags = rec.readUInt16LE(0x16);
  if (flags % 2 === 0) throw corrupt(`${what}: the record is not in use`);
  const inUse = rec.readUInt32LE(0x18);
  if (inUse > rec.length || inUse < 56) throw corrupt(`${what}: ${inUse} bytes in use in a ${rec.length}-byte record`);
  let p = rec.readUInt16LE(0x14);
  const out: Attribute[] = [];
  for (let guard = 0; guard < 256; guard++) {
    if (p + 8 > inUse) throw corrupt(`${what}: attributes run past the record`);
    const type = rec.readUInt32LE(p);
    if (type === ATTR_END) return out;
    const len = rec.readUInt32LE(p + 4);
    if (len < 24 || len % 8 !== 0 || p + len > inUse) throw corrupt(`${what}: attribute 0x${type.toString(16)} of ${len} bytes runs past the record`);
    const nonResident = rec[p + 8]! !== 0;
    const nameLength = rec[p + 9]!;
    const a: Attribute = { type, nameLength, nonResident };
    if (!nonResident) {
      const vlen = rec.readUInt32LE(p + 16);
      const voff = rec.readUInt16LE(p + 20);
      if (voff + vlen > len) throw corrupt(`${what}: resident attribute 0x${type.toString(16)} value runs past the attribute`);
      a.value = rec.subarray(p + voff, p + voff + vlen);
    } else {
      if (len < 64) throw corrupt(`${what}: non-resident attribute 0x${type.toString(16)} is too short`);
      const lowest = u64(rec, p + 16, `${what}: lowest VCN`);
      const mp = rec.readUInt16LE(p + 32);
      if (mp < 64 || mp >= len) throw corrupt(`${what}: attribute 0x${type.toString(16)} data runs start outside it`);
      a.lowestVcn = lowest;
      a.allocatedSize = u64(rec, p + 40, `${what}: allocated size`);
      a.dataSize = u64(rec, p + 48, `${what}: data size`);
      a.runs = decodeRuns(rec, p + mp, p + len, lowest, clusters, `${what}: attribute 0x${type.toString(16)}`);
    }
    out.push(a);
    p += len;
  }
  throw corrupt(`${what}: too many attributes`);
}

/** Reads `length` bytes at `offset` in batched chunks. */
async function readLarge(reader: BlockReader, ranges: Array<{ offset: number; length: number }>): Promise<Buffer[]> {
  const pieces: Array<{ offset: number; length: number; i: number; at: number }> = [];
  ranges.forEach((r, i) => { for (let q = 0; q < r.length; q += READ_CHUNK) pieces.push({ offset: r.offset + q, length: Math.min(READ_CHUNK, r.length - q), i, at: q }); });
  const out = ranges.map((r) => Buffer.alloc(r.length));
  for (let k = 0; k < pieces.length; k += BATCH) {
    const part = pieces.slice(k, k + BATCH);
    const bufs = await reader.readMany(part.map((p) => ({ offset: p.offset, length: p.length })));
    part.forEach((p, j) => bufs[j]!.copy(out[p.i]!, p.at));
  }
  return out;
}

export interface NtfsUsage {
  g: NtfsGeometry;
  /** Cluster bitmap (bit i = cluster i in use). */
  used: Bitset;
  notes: string[];
  dirty: boolean;
}

export async function readNtfsUsage(reader: BlockReader): Promise<NtfsUsage> {
  if (reader.size < 512) throw corrupt(`the device (${reader.size} bytes) is too small for NTFS`);
  const g = parseNtfsBoot(await reader.read(0, 512), reader.size);
  const rs = g.recordSize;
  const readRecord = async (offset: number, what: string) => {
    if (offset + rs > g.clusters * g.clusterSize) throw corrupt(`${what} lies past the volume`);
    const rec = Buffer.from(await reader.read(offset, rs));
    applyFixups(rec, what);
    return rec;
  };
  // $MFT: where the MFT's own records are (record 6 may be beyond its first run).
  const mftRec = await readRecord(g.mftLcn * g.clusterSize, 'MFT record 0 ($MFT)');
  const mftData = attributes(mftRec, g.clusters, 'MFT record 0 ($MFT)').find((a) => a.type === ATTR_DATA && a.nameLength === 0);
  if (!mftData?.runs) throw corrupt('MFT record 0 ($MFT) has no non-resident $DATA');
  if (mftData.lowestVcn !== 0) throw corrupt('the $MFT data runs do not start at VCN 0');
  const recordAt = (n: number): number => {
    const byte = n * rs;
    const vcn = Math.floor(byte / g.clusterSize);
    const run = mftData.runs!.find((r) => vcn >= r.vcn && vcn < r.vcn + r.length);
    if (!run || run.lcn === undefined) throw corrupt(`MFT record ${n} is not mapped by the $MFT data runs`);
    return (run.lcn + (vcn - run.vcn)) * g.clusterSize + (byte % g.clusterSize);
  };
  if (recordAt(0) !== g.mftLcn * g.clusterSize) throw corrupt('the $MFT data runs do not start at the MFT cluster named by the boot sector');
  const notes: string[] = [];
  // $Volume: a dirty volume is replayed from $LogFile at its next mount.
  const volAttrs = attributes(await readRecord(recordAt(MFT_RECORD_VOLUME), 'MFT record 3 ($Volume)'), g.clusters, 'MFT record 3 ($Volume)');
  const vi = volAttrs.find((a) => a.type === ATTR_VOLUME_INFORMATION);
  if (!vi?.value || vi.value.length < 12) throw corrupt('MFT record 3 ($Volume) has no volume information');
  const dirty = vi.value.readUInt16LE(10) % 2 === VOLUME_IS_DIRTY;
  const ver = `${vi.value[8]}.${vi.value[9]}`;

  const bmpRec = await readRecord(recordAt(MFT_RECORD_BITMAP), 'MFT record 6 ($Bitmap)');
  const bmpAttrs = attributes(bmpRec, g.clusters, 'MFT record 6 ($Bitmap)');
  if (bmpAttrs.some((a) => a.type === ATTR_ATTRIBUTE_LIST)) throw corrupt('$Bitmap has an attribute list (its runs are spread over several records): not supported by this reader');
  const data = bmpAttrs.find((a) => a.type === ATTR_DATA && a.nameLength === 0);
  if (!data) throw corrupt('MFT record 6 ($Bitmap) has no $DATA');
  const need = Math.ceil(g.clusters / 8);
  let bits: Buffer;
  if (!data.nonResident) {
    bits = data.value!;
  } else {
    if (data.lowestVcn !== 0) throw corrupt('the $Bitmap data runs do not start at VCN 0');
    const size = data.dataSize!;
    if (size < need) throw corrupt(`$Bitmap holds ${size} bytes, ${need} are needed for ${g.clusters} clusters`);
    const ranges: Array<{ offset: number; length: number }> = [];
    let covered = 0;
    for (const r of data.runs!) {
      if (covered >= need) break;
      if (r.lcn === undefined) throw corrupt('$Bitmap has a sparse run');
      const len = Math.min(r.length * g.clusterSize, need - covered);
      ranges.push({ offset: r.lcn * g.clusterSize, length: len });
      covered += len;
    }
    if (covered < need) throw corrupt(`the $Bitmap data runs cover ${covered} bytes, ${need} are needed`);
    bits = Buffer.concat(await readLarge(reader, ranges));
  }
  if (bits.length < need) throw corrupt(`$Bitmap holds ${bits.length} bytes, ${need} are needed`);
  const used = new Bitset(g.clusters);
  used.orBytes(bits, 0, g.clusters);
  // The allocator's own structures must be allocated in it.
  const mustBeUsed = (runs: Attribute['runs'], what: string) => {
    for (const r of runs ?? []) {
      if (r.lcn === undefined) continue;
      if (used.count(r.lcn, r.lcn + r.length) !== r.length) throw corrupt(`${what} occupies clusters ${r.lcn}..${r.lcn + r.length - 1}, which $Bitmap calls free`);
    }
  };
  mustBeUsed(mftData.runs, '$MFT');
  if (data.nonResident) mustBeUsed(data.runs, '$Bitmap');
  if (!used.get(0)) throw corrupt('cluster 0 (the boot sector) is free in $Bitmap');
  notes.push(`NTFS ${ver}, ${g.clusters} clusters of ${g.clusterSize} bytes, ${used.count()} in use`);
  return { g, used, notes, dirty };
}

export const ntfsReader: FileSystemReader = {
  kind: 'ntfs',

  async probe(reader: BlockReader): Promise<boolean> {
    if (reader.size < 512) return false;
    return (await reader.read(3, 8)).toString('latin1') === 'NTFS    ';
  },

  async read(reader: BlockReader): Promise<UsedBlockMap> {
    const u = await readNtfsUsage(reader);
    const bs = u.g.clusterSize;
    const totalBlocks = Math.ceil(reader.size / bs);
    if (u.dirty) {
      return {
        filesystem: 'ntfs', blockSize: bs, totalBlocks, usedBlocks: totalBlocks, bitmap: new Bitset(totalBlocks, true), allBlocks: true,
        notes: [...u.notes, 'the volume is marked dirty (not cleanly unmounted, or Windows fast startup): $LogFile is replayed at its next mount, so every block is copied'],
      };
    }
    const bitmap = new Bitset(totalBlocks);
    for (const [s, e] of u.used.runs()) bitmap.setRange(s, e);
    // Sectors past the last whole cluster (the backup boot sector) and the device past the volume.
    bitmap.setRange(u.g.clusters, totalBlocks);
    const notes = [...u.notes];
    const volumeBytes = (u.g.totalSectors + 1) * u.g.bytesPerSector;
    if (volumeBytes < reader.size) notes.push(`the device is ${reader.size - volumeBytes} bytes larger than the volume and its backup boot sector: the tail is copied`);
    return { filesystem: 'ntfs', blockSize: bs, totalBlocks, usedBlocks: bitmap.count(), bitmap, notes, allBlocks: false };
  },
};
