// FAT12/16/32 (the EFI system partition, USB sticks) from the FAT itself: the reserved sectors, every
// FAT copy, the FAT12/16 root directory, and every cluster whose FAT entry is not free. Bad clusters
// hold no data and are skipped (as partclone.fat does); a chain pointer past the last cluster means
// the FAT cannot be trusted: CorruptFileSystemError, and the caller copies everything.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import { CorruptFileSystemError, type FileSystemReader, type UsedBlockMap } from './used-map';

type FatKind = 'fat12' | 'fat16' | 'fat32';
const READ_CHUNK = 1 << 20;
const BATCH = 64;

function corrupt(message: string): CorruptFileSystemError {
  return new CorruptFileSystemError('fat32', message);
}

export interface FatGeometry {
  kind: FatKind;
  bytesPerSector: number;
  sectorsPerCluster: number;
  reservedSectors: number;
  fats: number;
  fatSectors: number;
  rootDirSectors: number;
  totalSectors: number;
  /** First sector of cluster 2. */
  dataStart: number;
  clusters: number;
  rootCluster: number;
  /** FAT32: the only FAT in use when mirroring is off, else undefined (all copies are mirrors). */
  activeFat?: number;
  media: number;
}

const isPow2 = (n: number) => n > 0 && Number.isInteger(Math.log2(n));

/** Checks the boot sector's BPB; returns the geometry or a reason it is not a FAT boot sector. */
export function parseBpb(b: Buffer, deviceSize: number): FatGeometry | string {
  if (b.length < 512) return 'boot sector too short';
  if (!(b[0] === 0xeb && b[2] === 0x90) && b[0] !== 0xe9) return 'no jump instruction at the start of the boot sector';
  if (b[510] !== 0x55 || b[511] !== 0xaa) return 'no boot sector signature (0x55aa)';
  if (b.toString('latin1', 3, 11) === 'NTFS    ' || b.toString('latin1', 3, 11) === 'EXFAT   ') return 'an NTFS or exFAT boot sector';
  const bps = b.readUInt16LE(11);
  const spc = b[13]!;
  const reserved = b.readUInt16LE(14);
  const fats = b[16]!;
  const rootEntries = b.readUInt16LE(17);
  const tot16 = b.readUInt16LE(19);
  const media = b[21]!;
  const fat16 = b.readUInt16LE(22);
  const tot32 = b.readUInt32LE(32);
  if (![512, 1024, 2048, 4096].includes(bps)) return `bytes per sector ${bps} is not 512, 1024, 2048 or 4096`;
  if (!isPow2(spc) || spc > 128) return `sectors per cluster ${spc} is not a power of two up to 128`;
  if (reserved < 1) return 'no reserved sectors';
  if (fats < 1 || fats > 4) return `${fats} FATs`;
  if (media !== 0xf0 && media < 0xf8) return `media byte 0x${media.toString(16)} is not a FAT media descriptor`;
  const totalSectors = tot16 !== 0 ? tot16 : tot32;
  if (totalSectors === 0) return 'total sectors is 0';
  const fatSectors = fat16 !== 0 ? fat16 : b.readUInt32LE(36);
  if (fatSectors === 0) return 'sectors per FAT is 0';
  const rootDirSectors = Math.ceil((rootEntries * 32) / bps);
  const dataStart = reserved + fats * fatSectors + rootDirSectors;
  if (dataStart >= totalSectors) return `the FATs and root directory (${dataStart} sectors) fill the whole volume (${totalSectors} sectors)`;
  const clusters = Math.floor((totalSectors - dataStart) / spc);
  if (clusters < 1) return 'no data clusters';
  const kind: FatKind = clusters < 4085 ? 'fat12' : clusters < 65525 ? 'fat16' : 'fat32';
  if (totalSectors * bps > deviceSize) return `the file system (${totalSectors} sectors of ${bps} bytes) is larger than the device (${deviceSize} bytes)`;
  const entryBits = kind === 'fat12' ? 12 : kind === 'fat16' ? 16 : 32;
  if (Math.ceil(((clusters + 2) * entryBits) / 8) > fatSectors * bps) return `a FAT of ${fatSectors} sectors cannot hold ${clusters} ${kind.toUpperCase()} clusters`;
  let rootCluster = 0;
  let activeFat: number | undefined;
  if (kind === 'fat32') {
    if (rootEntries !== 0 || fat16 !== 0) return 'a FAT32 volume with a FAT12/16 root directory or FAT size';
    rootCluster = b.readUInt32LE(44);
    if (rootCluster < 2 || rootCluster >= clusters + 2) return `root directory cluster ${rootCluster} is outside the ${clusters} clusters`;
    const ext = b.readUInt16LE(40);
    if (ext & 0x80) {
      activeFat = ext & 0x0f;
      if (activeFat >= fats) return `active FAT ${activeFat} of ${fats}`;
    }
  } else if (rootEntries === 0) {
    return `a ${kind.toUpperCase()} volume without root directory entries`;
  }
  return { kind, bytesPerSector: bps, sectorsPerCluster: spc, reservedSectors: reserved, fats, fatSectors, rootDirSectors, totalSectors, dataStart, clusters, rootCluster, activeFat, media };
}

/** Reads `length` bytes at `offset` in batched chunks. */
async function readLarge(reader: BlockReader, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  const ranges: Array<{ offset: number; length: number }> = [];
  for (let p = 0; p < length; p += READ_CHUNK) ranges.push({ offset: offset + p, length: Math.min(READ_CHUNK, length - p) });
  for (let i = 0; i < ranges.length; i += BATCH) {
    const part = ranges.slice(i, i + BATCH);
    const bufs = await reader.readMany(part);
    part.forEach((r, k) => bufs[k]!.copy(out, r.offset - offset));
  }
  return out;
}

/** FAT entry `n` of a FAT copy. */
function entry(kind: FatKind, fat: Buffer, n: number): number {
  if (kind === 'fat16') return fat.readUInt16LE(n * 2);
  if (kind === 'fat32') return fat.readUInt32LE(n * 4) % 0x10000000;
  const at = Math.floor((n * 3) / 2);
  const v = fat.readUInt16LE(at);
  return n % 2 === 0 ? v % 0x1000 : Math.floor(v / 16);
}

export interface FatClusters {
  geometry: FatGeometry;
  /** Cluster i (2-based cluster numbers minus 2) holds data. */
  used: Bitset;
  bad: number;
  /** Entries where the FAT copies disagree (a cluster used in any copy counts as used). */
  mismatches: number;
  dirty: boolean;
}

/** Walks the FAT: which clusters are in use. */
export async function readFatClusters(reader: BlockReader, g: FatGeometry): Promise<FatClusters> {
  const kind = g.kind;
  const fatBytes = g.fatSectors * g.bytesPerSector;
  const copies: Buffer[] = [];
  const order = g.activeFat !== undefined ? [g.activeFat, ...[...Array(g.fats).keys()].filter((i) => i !== g.activeFat)] : [...Array(g.fats).keys()];
  for (const i of order) copies.push(await readLarge(reader, (g.reservedSectors + i * g.fatSectors) * g.bytesPerSector, fatBytes));
  const primary = copies[0]!;
  const bad = kind === 'fat12' ? 0xff7 : kind === 'fat16' ? 0xfff7 : 0x0ffffff7;
  const last = g.clusters + 1;
  const used = new Bitset(g.clusters);
  let nbad = 0;
  let mismatches = 0;
  for (let n = 2; n <= last; n++) {
    const v = entry(kind, primary, n);
    if (v === 0) continue;
    if (v === bad) { nbad++; continue; }
    if (v === 1 || (v > last && v < bad)) {
      throw corrupt(`${kind.toUpperCase()} entry of cluster ${n} points to cluster ${v}, outside clusters 2..${last}`);
    }
    used.set(n - 2);
  }
  for (let c = 1; c < copies.length; c++) {
    const other = copies[c]!;
    if (other.equals(primary)) continue;
    for (let n = 2; n <= last; n++) {
      const v = entry(kind, other, n);
      if (v !== entry(kind, primary, n)) {
        mismatches++;
        if (v !== 0 && v !== bad) used.set(n - 2);
      }
    }
  }
  if (kind === 'fat32' && !used.get(g.rootCluster - 2)) throw corrupt(`the root directory's cluster ${g.rootCluster} is free in the FAT`);
  let dirty = false;
  if (kind === 'fat16') dirty = (entry(kind, primary, 1) & 0x8000) === 0;
  if (kind === 'fat32') dirty = (primary.readUInt32LE(4) & 0x08000000) === 0;
  return { geometry: g, used, bad: nbad, mismatches, dirty };
}

export const fatReader: FileSystemReader = {
  kind: 'fat32',

  async probe(reader: BlockReader): Promise<boolean> {
    if (reader.size < 512) return false;
    return typeof parseBpb(await reader.read(0, 512), reader.size) !== 'string';
  },

  async read(reader: BlockReader): Promise<UsedBlockMap> {
    if (reader.size < 512) throw corrupt(`the device (${reader.size} bytes) is too small for FAT`);
    const head = await reader.read(0, 512);
    const g0 = parseBpb(head, reader.size);
    if (typeof g0 === 'string') throw corrupt(`not a FAT boot sector: ${g0}`);
    const g = g0;
    const err = (e: unknown) => (e instanceof CorruptFileSystemError ? new CorruptFileSystemError(g.kind, e.message) : e);
    let fc: FatClusters;
    try {
      fc = await readFatClusters(reader, g);
    } catch (e) {
      throw err(e);
    }
    const bs = g.bytesPerSector;
    const totalBlocks = Math.ceil(reader.size / bs);
    const bitmap = new Bitset(totalBlocks);
    // Reserved sectors (boot sector, FSInfo, the backup boot sector), the FATs and the root directory.
    bitmap.setRange(0, g.dataStart);
    for (const [s, e] of fc.used.runs()) {
      bitmap.setRange(g.dataStart + s * g.sectorsPerCluster, g.dataStart + e * g.sectorsPerCluster);
    }
    // Sectors after the last whole cluster, and the device past the file system.
    bitmap.setRange(g.dataStart + g.clusters * g.sectorsPerCluster, totalBlocks);
    const usedClusters = fc.used.count();
    const clusterBytes = bs * g.sectorsPerCluster;
    const notes = [`${g.kind.toUpperCase()}, ${g.clusters} clusters of ${clusterBytes} bytes, ${usedClusters} in use`];
    if (fc.bad) notes.push(`${fc.bad} clusters marked bad in the FAT: not copied`);
    if (fc.mismatches) notes.push(`the FAT copies disagree on ${fc.mismatches} entries: clusters in use in any copy are copied`);
    if (fc.dirty) notes.push('the volume was not cleanly unmounted (dirty bit set in the FAT)');
    if (g.totalSectors * bs < reader.size) notes.push(`the device is ${reader.size - g.totalSectors * bs} bytes larger than the file system: the tail is copied`);
    return { filesystem: g.kind, blockSize: bs, totalBlocks, usedBlocks: bitmap.count(), bitmap, notes, allBlocks: false };
  },
};
