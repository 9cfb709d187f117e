// ext2/3/4 used-block map, read straight from the device (seed 001, FIG. 13 step 1306): superblock,
// group descriptors (32/64-byte, meta_bg), block bitmaps (anywhere with flex_bg; computed for
// BLOCK_UNINIT groups), and, when the superblock says the journal needs recovery, the newest
// committed journal copies of the bitmaps and descriptors. Anything that does not add up throws
// CorruptFileSystemError: a backup must never skip a block because a bitmap lied.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import {
  BG_BLOCK_UNINIT, COMPAT, crc16, crc32c, EXT4_ONLY_INCOMPAT, EXT4_ONLY_RO_COMPAT, EXT_MAGIC, GD, groupHasSuper, INCOMPAT,
  INCOMPAT_KNOWN, parseSuperblock, RO_COMPAT, SB, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, type RawSuperblock,
} from './ext4-layout';
import { Journal, JournalError, type JournalScan, mapInodeBlocks } from './jbd2';
import { CorruptFileSystemError, type FileSystemKind, type FileSystemReader, type UsedBlockMap } from './used-map';

const TWO32 = 0x100000000;
/** Bitmap reads: at most this many ranges per native batch, and runs merged up to this many bytes. */
const BATCH_RANGES = 1024;
const MAX_RUN_BYTES = 1 << 20;

type ExtKind = 'ext2' | 'ext3' | 'ext4';

export function corrupt(message: string): CorruptFileSystemError {
  return new CorruptFileSystemError('ext4', message);
}

/** Geometry derived from a validated superblock. */
export interface Geometry {
  sb: RawSuperblock;
  kind: ExtKind;
  blockSize: number;
  blocksCount: number;
  firstDataBlock: number;
  blocksPerGroup: number;
  groups: number;
  descSize: number;
  descPerBlock: number;
  gdtBlocks: number;
  inodeSize: number;
  itableBlocks: number;
  /** Block holding the primary superblock (1 for 1 KiB blocks, else 0). */
  sbBlock: number;
  metaBg: boolean;
  flexBg: boolean;
  csum: 'metadata' | 'gdt' | 'none';
  csumSeed: number;
  deviceBlocks: number;
}

function fsKind(sb: RawSuperblock): ExtKind {
  if ((sb.incompat & EXT4_ONLY_INCOMPAT) || (sb.roCompat & EXT4_ONLY_RO_COMPAT)) return 'ext4';
  if (sb.compat & COMPAT.HAS_JOURNAL) return 'ext3';
  return 'ext2';
}

const isPow2 = (n: number) => n > 0 && (n & (n - 1)) === 0; // 32-bit-ok: only for sizes checked <= 2^16

export function geometry(raw: Buffer, deviceSize: number): Geometry {
  const sb = parseSuperblock(raw);
  if (sb.magic !== EXT_MAGIC) throw corrupt(`no ext2/3/4 magic number in the superblock (found 0x${sb.magic.toString(16)})`);
  if (sb.logBlockSize > 6) throw corrupt(`superblock block size field s_log_block_size=${sb.logBlockSize} is out of range (0..6, i.e. 1 KiB..64 KiB)`);
  const blockSize = 1024 << sb.logBlockSize; // 32-bit-ok: logBlockSize checked <= 6
  const kind = fsKind(sb);
  const metadataCsum = (sb.roCompat & RO_COMPAT.METADATA_CSUM) !== 0;
  if (metadataCsum) {
    if (sb.checksumType !== 1) throw corrupt(`superblock checksum type ${sb.checksumType} is unknown (only crc32c = 1 exists)`);
    const got = crc32c(0xffffffff, raw, 0, SB.checksum);
    if (got !== sb.checksum) throw corrupt(`superblock checksum mismatch (stored 0x${sb.checksum.toString(16)}, computed 0x${got.toString(16)})`);
  }
  if (sb.incompat & ~INCOMPAT_KNOWN) throw corrupt(`superblock has unknown incompatible features 0x${(sb.incompat & ~INCOMPAT_KNOWN).toString(16)}: its layout cannot be trusted`);
  const deviceBlocks = Math.floor(deviceSize / blockSize);
  if (sb.blocksCount === 0) throw corrupt('superblock says the file system has 0 blocks');
  if (sb.blocksCount > deviceBlocks) {
    throw corrupt(`the file system (${sb.blocksCount} blocks of ${blockSize} bytes) is larger than the device (${deviceBlocks} blocks): a truncated image or a corrupt superblock`);
  }
  const wantFirst = blockSize === 1024 && !(sb.roCompat & RO_COMPAT.BIGALLOC) ? 1 : 0;
  if (sb.firstDataBlock !== wantFirst && !(blockSize === 1024 && sb.firstDataBlock === 0)) {
    throw corrupt(`superblock first data block ${sb.firstDataBlock} is impossible for ${blockSize}-byte blocks`);
  }
  if (sb.firstDataBlock >= sb.blocksCount) throw corrupt(`superblock first data block ${sb.firstDataBlock} is past the block count ${sb.blocksCount}`);
  const bpg = sb.blocksPerGroup;
  let ratio = 1;
  if (sb.roCompat & RO_COMPAT.BIGALLOC) {
    if (sb.logClusterSize < sb.logBlockSize || sb.logClusterSize - sb.logBlockSize > 16) throw corrupt(`superblock cluster size field ${sb.logClusterSize} is impossible`);
    ratio = 2 ** (sb.logClusterSize - sb.logBlockSize);
    if (sb.clustersPerGroup * ratio !== bpg) throw corrupt(`superblock blocks per group ${bpg} is not ${sb.clustersPerGroup} clusters of ${ratio} blocks`);
  }
  const bitsPerGroup = bpg / ratio;
  if (bitsPerGroup < 8 || bitsPerGroup > blockSize * 8 || bitsPerGroup % 8 !== 0) throw corrupt(`superblock blocks per group ${bpg} is out of range (8..${blockSize * 8 * ratio}, a multiple of 8)`);
  if (sb.inodesPerGroup < 1 || sb.inodesPerGroup > blockSize * 8) throw corrupt(`superblock inodes per group ${sb.inodesPerGroup} is out of range`);
  const inodeSize = sb.revLevel === 0 ? 128 : sb.inodeSize;
  if (inodeSize < 128 || inodeSize > blockSize || !isPow2(inodeSize)) throw corrupt(`superblock inode size ${inodeSize} is impossible`);
  if (sb.reservedGdtBlocks > blockSize / 4) throw corrupt(`superblock reserved GDT blocks ${sb.reservedGdtBlocks} is more than ${blockSize / 4}`);
  const groups = Math.ceil((sb.blocksCount - sb.firstDataBlock) / bpg);
  if (groups * sb.inodesPerGroup !== sb.inodesCount) {
    throw corrupt(`superblock inode count ${sb.inodesCount} does not match ${groups} groups of ${sb.inodesPerGroup} inodes`);
  }
  let descSize = 32;
  if (sb.incompat & INCOMPAT.BIT64) {
    descSize = sb.descSize;
    if (descSize < 64 || descSize > 1024 || !isPow2(descSize)) throw corrupt(`superblock group descriptor size ${sb.descSize} is impossible for a 64bit file system`);
  }
  const descPerBlock = blockSize / descSize;
  const gdtBlocks = Math.ceil(groups / descPerBlock);
  const metaBg = (sb.incompat & INCOMPAT.META_BG) !== 0;
  const sbBlock = Math.floor(SUPERBLOCK_OFFSET / blockSize);
  if (metaBg) {
    if (sb.firstMetaBg > gdtBlocks) throw corrupt(`superblock first meta block group ${sb.firstMetaBg} is past the ${gdtBlocks} descriptor blocks`);
  } else if (sbBlock + 1 + gdtBlocks > sb.blocksCount) {
    throw corrupt(`the ${gdtBlocks} group descriptor blocks do not fit in the file system`);
  }
  let csumSeed = 0;
  if (metadataCsum) csumSeed = sb.incompat & INCOMPAT.CSUM_SEED ? sb.checksumSeed : crc32c(0xffffffff, sb.uuid);
  return {
    sb, kind, blockSize, blocksCount: sb.blocksCount, firstDataBlock: sb.firstDataBlock, blocksPerGroup: bpg, groups,
    descSize, descPerBlock, gdtBlocks, inodeSize, itableBlocks: Math.ceil((sb.inodesPerGroup * inodeSize) / blockSize), sbBlock,
    metaBg, flexBg: (sb.incompat & INCOMPAT.FLEX_BG) !== 0,
    csum: metadataCsum ? 'metadata' : sb.roCompat & RO_COMPAT.GDT_CSUM ? 'gdt' : 'none',
    csumSeed, deviceBlocks,
  };
}

export const groupFirstBlock = (g: Geometry, group: number) => g.firstDataBlock + group * g.blocksPerGroup;

/** ext4 descriptor_loc: where descriptor block `d` lives. */
export function descriptorBlock(g: Geometry, d: number): number {
  if (!g.metaBg || d < g.sb.firstMetaBg) return g.sbBlock + d + 1;
  const bg = g.descPerBlock * d;
  let has = groupHasSuper(g.sb, bg) ? 1 : 0;
  if (g.blockSize === 1024 && d === 0 && g.firstDataBlock === 0) has++;
  return groupFirstBlock(g, bg) + has;
}

/** ext4_num_base_meta_blocks: superblock backup, descriptor blocks, reserved GDT at the start of a group. */
export function baseMetaBlocks(g: Geometry, group: number): number {
  const hasSuper = groupHasSuper(g.sb, group);
  let n = hasSuper ? 1 : 0;
  if (!g.metaBg || group < g.sb.firstMetaBg * g.descPerBlock) {
    if (hasSuper) n += (g.metaBg ? g.sb.firstMetaBg : g.gdtBlocks) + g.sb.reservedGdtBlocks;
  } else {
    const r = group % g.descPerBlock;
    if (r === 0 || r === 1 || r === g.descPerBlock - 1) n += 1;
  }
  return n;
}

export interface Desc {
  blockBitmap: number;
  inodeBitmap: number;
  inodeTable: number;
  flags: number;
  bitmapCsum: number;
  bitmapCsumBits: 16 | 32;
  /** Inodes at the end of the group's table never used (valid with group checksums only). */
  itableUnused: number;
}

function readDesc(g: Geometry, gdt: Buffer, group: number): Desc {
  const o = group * g.descSize;
  const big = g.descSize >= 64;
  return {
    blockBitmap: gdt.readUInt32LE(o + GD.blockBitmapLo) + (big ? gdt.readUInt32LE(o + GD.blockBitmapHi) * TWO32 : 0),
    inodeBitmap: gdt.readUInt32LE(o + GD.inodeBitmapLo) + (big ? gdt.readUInt32LE(o + GD.inodeBitmapHi) * TWO32 : 0),
    inodeTable: gdt.readUInt32LE(o + GD.inodeTableLo) + (big ? gdt.readUInt32LE(o + GD.inodeTableHi) * TWO32 : 0),
    flags: gdt.readUInt16LE(o + GD.flags),
    bitmapCsum: gdt.readUInt16LE(o + GD.blockBitmapCsumLo) + (big ? gdt.readUInt16LE(o + GD.blockBitmapCsumHi) * 0x10000 : 0),
    bitmapCsumBits: big ? 32 : 16,
    itableUnused: gdt.readUInt16LE(o + GD.itableUnusedLo) + (big ? gdt.readUInt16LE(o + GD.itableUnusedHi) * 0x10000 : 0),
  };
}

function descChecksum(g: Geometry, gdt: Buffer, group: number): number {
  const o = group * g.descSize;
  const le = Buffer.alloc(4);
  le.writeUInt32LE(group);
  if (g.csum === 'metadata') {
    let c = crc32c(g.csumSeed, le);
    c = crc32c(c, gdt, o, o + GD.checksum);
    c = crc32c(c, ZERO2);
    c = crc32c(c, gdt, o + GD.checksum + 2, o + g.descSize);
    return c & 0xffff;
  }
  let c = crc16(0xffff, g.sb.uuid);
  c = crc16(c, le);
  c = crc16(c, gdt, o, o + GD.checksum);
  if ((g.sb.incompat & INCOMPAT.BIT64) && g.descSize > 32) c = crc16(c, gdt, o + GD.checksum + 2, o + g.descSize);
  return c;
}
const ZERO2 = Buffer.alloc(2);

/** ext4_check_descriptors, plus the checksum: every pointer inside the file system (and its group without flex_bg). */
export function checkDesc(g: Geometry, gdt: Buffer, group: number, where = ''): Desc {
  const d = readDesc(g, gdt, group);
  const first = g.flexBg ? g.firstDataBlock : groupFirstBlock(g, group);
  const last = g.flexBg ? g.blocksCount - 1 : Math.min(groupFirstBlock(g, group) + g.blocksPerGroup, g.blocksCount) - 1;
  const scope = g.flexBg ? `the file system (blocks ${first}..${last})` : `its group (blocks ${first}..${last})`;
  const check = (what: string, b: number, n: number) => {
    if (b < first || b + n - 1 > last) {
      const past = b + n - 1 >= g.blocksCount ? `, past the end of the file system (${g.blocksCount} blocks)` : '';
      throw corrupt(`group descriptor ${group}${where} points its ${what} to block ${b}, outside ${scope}${past}`);
    }
    if (!g.metaBg && b <= g.sbBlock + g.gdtBlocks && b + n - 1 >= g.sbBlock) {
      throw corrupt(`group descriptor ${group}${where} points its ${what} to block ${b}, on top of the superblock or group descriptors`);
    }
  };
  check('block bitmap', d.blockBitmap, 1);
  check('inode bitmap', d.inodeBitmap, 1);
  check('inode table', d.inodeTable, g.itableBlocks);
  if (g.csum !== 'none') {
    const stored = gdt.readUInt16LE(group * g.descSize + GD.checksum);
    const got = descChecksum(g, gdt, group);
    if (stored !== got) throw corrupt(`group descriptor ${group}${where} checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${got.toString(16)})`);
  }
  return d;
}

/** Byte ranges for sorted unique block numbers: contiguous blocks merged up to MAX_RUN_BYTES. */
function runsOf(blocks: number[], blockSize: number): Array<{ first: number; count: number }> {
  const maxRun = Math.max(1, Math.floor(MAX_RUN_BYTES / blockSize));
  const runs: Array<{ first: number; count: number }> = [];
  for (const b of blocks) {
    const last = runs[runs.length - 1];
    if (last && last.first + last.count === b && last.count < maxRun) last.count++;
    else runs.push({ first: b, count: 1 });
  }
  return runs;
}

/** Reads the given blocks (any order, duplicates allowed) in few large batched reads. */
export async function readBlockSet(reader: BlockReader, blockSize: number, blocks: number[], onBlock: (block: number, data: Buffer) => void): Promise<void> {
  const sorted = [...new Set(blocks)].sort((a, b) => a - b);
  const runs = runsOf(sorted, blockSize);
  for (let i = 0; i < runs.length; i += BATCH_RANGES) {
    const part = runs.slice(i, i + BATCH_RANGES);
    const bufs = await reader.readMany(part.map((r) => ({ offset: r.first * blockSize, length: r.count * blockSize })));
    part.forEach((r, k) => {
      const b = bufs[k]!;
      for (let j = 0; j < r.count; j++) onBlock(r.first + j, b.subarray(j * blockSize, (j + 1) * blockSize));
    });
  }
}

function allBlocksMap(filesystem: FileSystemKind, blockSize: number, deviceSize: number, notes: string[]): UsedBlockMap {
  const totalBlocks = Math.ceil(deviceSize / blockSize);
  return { filesystem, blockSize, totalBlocks, usedBlocks: totalBlocks, bitmap: new Bitset(totalBlocks, true), notes, allBlocks: true };
}

/** Group descriptors: all descriptor blocks, in as few reads as possible, into one buffer, each descriptor checked. */
export async function readDescriptors(reader: BlockReader, g: Geometry): Promise<{ gdt: Buffer; gdtLoc: number[]; descs: Desc[] }> {
  const { blockSize } = g;
  const gdt = Buffer.alloc(g.gdtBlocks * blockSize);
  const gdtLoc: number[] = [];
  for (let d = 0; d < g.gdtBlocks; d++) {
    const loc = descriptorBlock(g, d);
    if (loc >= g.blocksCount) throw corrupt(`group descriptor block ${d} would be at block ${loc}, past the end of the file system (${g.blocksCount} blocks)`);
    gdtLoc.push(loc);
  }
  const gdtIndex = new Map<number, number>();
  gdtLoc.forEach((loc, d) => gdtIndex.set(loc, d));
  await readBlockSet(reader, blockSize, gdtLoc, (block, data) => data.copy(gdt, gdtIndex.get(block)! * blockSize));
  const descs: Desc[] = [];
  for (let i = 0; i < g.groups; i++) descs.push(checkDesc(g, gdt, i));
  return { gdt, gdtLoc, descs };
}

export async function probe(reader: BlockReader): Promise<boolean> {
  if (reader.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE) return false;
  const b = await reader.read(SUPERBLOCK_OFFSET + SB.magic, 2);
  return b.readUInt16LE(0) === EXT_MAGIC;
}

async function read(reader: BlockReader): Promise<UsedBlockMap> {
  if (reader.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE) throw corrupt(`the device (${reader.size} bytes) is too small to hold an ext2/3/4 superblock`);
  const raw = await reader.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE);
  const g = geometry(raw, reader.size);
  const { sb, blockSize } = g;
  const summary = `${g.kind}, ${blockSize}-byte blocks, ${g.groups} groups`;

  if (sb.incompat & INCOMPAT.JOURNAL_DEV) {
    return allBlocksMap(g.kind, blockSize, reader.size, [`${summary}: this is an external journal device, not a file system: every block is copied`]);
  }
  if (sb.roCompat & RO_COMPAT.BIGALLOC) {
    return allBlocksMap(g.kind, blockSize, reader.size, [`${summary}: bigalloc (cluster allocation) is not supported by the block map reader: every block is copied`]);
  }

  const d0 = await readDescriptors(reader, g);
  const { gdt, gdtLoc } = d0;
  let descs = d0.descs;

  // A journal that needs recovery: the replay will overwrite bitmaps (and descriptors) with its copies.
  const notes: string[] = [summary];
  let journalBitmaps: Map<number, Buffer> | undefined;
  let journalNote: string | undefined;
  if (sb.incompat & INCOMPAT.RECOVER) {
    const fallback = (why: string) => allBlocksMap(g.kind, blockSize, reader.size, [summary, `journal needs recovery: ${why}: copying every block`]);
    if (!(sb.compat & COMPAT.HAS_JOURNAL)) return fallback('but the file system has no journal');
    if (sb.journalInum === 0) return fallback(`the journal is on an external device (${sb.journalDev ? `device 0x${sb.journalDev.toString(16)}` : 'by UUID'}) that cannot be read from here`);
    try {
      const r = await journalCopies(reader, g, gdt, gdtLoc, descs);
      if ('fallback' in r) return fallback(r.fallback);
      descs = r.descs;
      journalBitmaps = r.bitmaps;
      journalNote = r.note;
    } catch (e) {
      if (e instanceof JournalError || e instanceof CorruptFileSystemError) return fallback(`could not parse the journal (${e.message})`);
      throw e;
    }
  }

  const totalBlocks = Math.ceil(reader.size / blockSize);
  const bitmap = new Bitset(totalBlocks);
  const uninitAllowed = g.csum !== 'none';
  const groupsByBitmap = new Map<number, number[]>();
  let uninit = 0;
  for (let i = 0; i < g.groups; i++) {
    const d = descs[i]!;
    if (uninitAllowed && d.flags & BG_BLOCK_UNINIT) { uninit++; continue; }
    const list = groupsByBitmap.get(d.blockBitmap);
    if (list) list.push(i); else groupsByBitmap.set(d.blockBitmap, [i]);
  }
  const badCsum: number[] = [];
  const bitmapBytes = g.blocksPerGroup / 8;
  const apply = (block: number, data: Buffer) => {
    for (const grp of groupsByBitmap.get(block) ?? []) {
      const start = groupFirstBlock(g, grp);
      const n = Math.min(g.blocksPerGroup, g.blocksCount - start);
      if (g.csum === 'metadata') {
        const c = crc32c(g.csumSeed, data, 0, bitmapBytes);
        const want = descs[grp]!.bitmapCsum;
        if ((descs[grp]!.bitmapCsumBits === 32 ? c : c & 0xffff) !== want) {
          badCsum.push(grp);
          bitmap.setRange(start, start + n);
          continue;
        }
      }
      bitmap.orBytes(data, start, n);
    }
  };
  const fromDisk = [...groupsByBitmap.keys()].filter((b) => !journalBitmaps?.has(b));
  await readBlockSet(reader, blockSize, fromDisk, apply);
  let fromJournal = 0;
  for (const [block, data] of journalBitmaps ?? []) {
    if (groupsByBitmap.has(block)) { apply(block, data); fromJournal++; }
  }

  // Metadata the on-disk bitmaps of BLOCK_UNINIT groups would hold (ext4_init_block_bitmap), and
  // for safety everything any descriptor points to, wherever it lives (flex_bg).
  for (let i = 0; i < g.groups; i++) {
    const d = descs[i]!;
    if (uninitAllowed && d.flags & BG_BLOCK_UNINIT) {
      const start = groupFirstBlock(g, i);
      bitmap.setRange(start, Math.min(start + baseMetaBlocks(g, i), g.blocksCount));
    }
    bitmap.set(d.blockBitmap);
    bitmap.set(d.inodeBitmap);
    bitmap.setRange(d.inodeTable, d.inodeTable + g.itableBlocks);
  }
  // The boot block and superblock (the first 2 KiB), the descriptors, and the device tail.
  bitmap.setRange(0, Math.ceil(2048 / blockSize));
  for (const loc of gdtLoc) bitmap.set(loc);
  bitmap.setRange(g.blocksCount, totalBlocks);

  if (uninit) notes.push(`${uninit} groups not initialised (BLOCK_UNINIT): their metadata blocks were computed`);
  if (badCsum.length) {
    notes.push(`block bitmap of ${badCsum.length === 1 ? 'group' : 'groups'} ${badCsum.slice(0, 10).join(', ')}${badCsum.length > 10 ? ', ...' : ''} fails its checksum: every block of ${badCsum.length === 1 ? 'that group' : 'those groups'} is copied`);
  }
  if (journalNote !== undefined) notes.push(journalNote.replace('%N', String(fromJournal)));
  if (g.blocksCount < totalBlocks) notes.push(`the device is ${totalBlocks - g.blocksCount} blocks larger than the file system: the tail is copied`);
  return { filesystem: g.kind, blockSize, totalBlocks, usedBlocks: bitmap.setCount, bitmap, notes, allBlocks: false };
}

/** Opens the internal journal (inode s_journal_inum) and scans what a replay would apply. */
export async function scanJournal(reader: BlockReader, g: Geometry, descs: Desc[]): Promise<{ journal: Journal; scan: JournalScan }> {
  const { sb, blockSize } = g;
  const ino = sb.journalInum;
  if (ino < 1 || ino > sb.inodesCount) throw new JournalError(`journal inode number ${ino} is out of range`);
  const group = Math.floor((ino - 1) / sb.inodesPerGroup);
  const index = (ino - 1) % sb.inodesPerGroup;
  const inode = await reader.read(descs[group]!.inodeTable * blockSize + index * g.inodeSize, Math.min(g.inodeSize, 256));
  const { extents } = await mapInodeBlocks(reader, blockSize, g.blocksCount, inode);
  const journal = await Journal.open(reader, blockSize, extents);
  return { journal, scan: await journal.scan() };
}

/**
 * Replays the journal in memory, for the blocks that matter: the superblock (geometry must not
 * change), the descriptor blocks (flags and checksums; a moved bitmap means "copy everything"),
 * and the block bitmaps.
 */
async function journalCopies(reader: BlockReader, g: Geometry, gdt: Buffer, gdtLoc: number[], descs: Desc[]):
  Promise<{ fallback: string } | { descs: Desc[]; bitmaps: Map<number, Buffer>; note: string }> {
  const { sb, blockSize } = g;
  const { journal, scan } = await scanJournal(reader, g, descs);
  const what = `jbd2 v${scan.version}${scan.features.length ? ` (${scan.features.join(', ')})` : ''}`;
  if (scan.empty) {
    return { descs, bitmaps: new Map(), note: 'journal needs recovery but holds no transactions: the on-disk bitmaps are current' };
  }
  // The superblock: the replay must not change the geometry.
  const sbCopy = (await journal.readCopies(scan, [g.sbBlock])).get(g.sbBlock);
  if (sbCopy) {
    const inner = sbCopy.subarray(SUPERBLOCK_OFFSET - g.sbBlock * blockSize, SUPERBLOCK_OFFSET - g.sbBlock * blockSize + SUPERBLOCK_SIZE);
    const j = parseSuperblock(Buffer.from(inner));
    if (j.magic !== EXT_MAGIC || j.blocksCount !== sb.blocksCount || j.blocksPerGroup !== sb.blocksPerGroup || j.incompat !== sb.incompat
      || j.descSize !== sb.descSize || j.firstMetaBg !== sb.firstMetaBg || j.reservedGdtBlocks !== sb.reservedGdtBlocks) {
      return { fallback: 'the journal changes the superblock geometry (an online resize?)' };
    }
  }
  // Descriptor blocks.
  const gdtCopies = await journal.readCopies(scan, gdtLoc);
  let newDescs = descs;
  if (gdtCopies.size) {
    const merged = Buffer.from(gdt);
    gdtLoc.forEach((loc, d) => gdtCopies.get(loc)?.copy(merged, d * blockSize));
    newDescs = [];
    for (let i = 0; i < g.groups; i++) {
      let d: Desc;
      try {
        d = checkDesc(g, merged, i, ' (journal copy)');
      } catch (e) {
        if (e instanceof CorruptFileSystemError) return { fallback: e.message };
        throw e;
      }
      if (d.blockBitmap !== descs[i]!.blockBitmap) return { fallback: `the journal moves the block bitmap of group ${i} (from block ${descs[i]!.blockBitmap} to ${d.blockBitmap})` };
      newDescs.push(d);
    }
  }
  const bitmapBlocks = newDescs.map((d) => d.blockBitmap).filter((b) => scan.copies.has(b));
  const bitmaps = await journal.readCopies(scan, bitmapBlocks);
  return {
    descs: newDescs,
    bitmaps,
    note: `journal needs recovery: used the newest committed journal copies of %N block bitmaps and ${gdtCopies.size} group descriptor blocks (${scan.transactions} committed transactions, ${scan.revoked} revoke records, ${what})`,
  };
}

export const extReader: FileSystemReader = { kind: 'ext', probe, read };
