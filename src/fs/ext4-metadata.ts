// ext2/3/4 metadata blocks for --hold metadata (seed 004, claim 10): the static structure
// (superblocks, descriptors, reserved GDT, bitmaps, inode tables), the journal, and the dynamic
// structure found through the inodes in use: every block of directories, symlinks, xattr blocks and
// the special inodes (quota, orphan file, resize), and the extent-tree / indirect blocks of every
// file (never a regular file's data). With a journal that needs recovery, every block it holds a
// copy of is metadata too (the checkpoint will write it in place). A superset is safe; a missed block
// would let the structure drift past the instant.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import {
  baseMetaBlocks, corrupt, type Desc, type Geometry, geometry, groupFirstBlock, readBlockSet, readDescriptors, scanJournal,
} from './ext4';
import {
  BG_INODE_UNINIT, COMPAT, EXTENT_MAGIC, INCOMPAT, INODE, INODE_EXTENTS_FL, INODE_INLINE_DATA_FL, RO_COMPAT,
  SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE,
} from './ext4-layout';
import { JournalError } from './jbd2';
import type { MetadataMap } from './metadata-map';

const TWO32 = 0x100000000;
/** Superblock fields only this reader needs (offsets in the superblock, fs/ext4/ext4.h). */
const SB_FIRST_INO = 0x54;
const SB_QUOTA_INUMS = [0x240, 0x244, 0x26c];
const SB_ORPHAN_FILE_INUM = 0x280;
const COMPAT_ORPHAN_FILE = 0x1000;
const INODE_FILE_ACL_LO = 0x68;
const INODE_FILE_ACL_HI = 0x76;
const INODE_EA_INODE_FL = 0x200000;
const S_IFMT = 0xf000;
const S_IFDIR = 0x4000;
const S_IFLNK = 0xa000;
/** Tree nodes per level read at once (bounded memory on huge file systems). */
const LEVEL_BATCH = 4096;

/** An inode whose blocks are walked: `all` = every block is metadata, `tree` = only the mapping blocks. */
interface Walk { ino: number; all: boolean; iblock: Buffer; extents: boolean }

export async function readExtMetadata(reader: BlockReader): Promise<MetadataMap> {
  if (reader.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE) throw corrupt(`the device (${reader.size} bytes) is too small to hold an ext2/3/4 superblock`);
  const raw = await reader.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE);
  const g = geometry(raw, reader.size);
  const { sb, blockSize } = g;
  if (sb.incompat & INCOMPAT.JOURNAL_DEV) throw corrupt('this is an external journal device, not a file system');
  if (sb.roCompat & RO_COMPAT.BIGALLOC) throw corrupt('bigalloc (cluster allocation) is not supported by the metadata reader');
  const totalBlocks = Math.ceil(reader.size / blockSize);
  const meta = new Bitset(totalBlocks);
  const { gdtLoc, descs } = await readDescriptors(reader, g);

  // Static structure.
  meta.setRange(0, Math.ceil(2048 / blockSize));
  for (const loc of gdtLoc) meta.set(loc);
  for (let i = 0; i < g.groups; i++) {
    const d = descs[i]!;
    const start = groupFirstBlock(g, i);
    meta.setRange(start, Math.min(start + baseMetaBlocks(g, i), g.blocksCount));
    meta.set(d.blockBitmap);
    meta.set(d.inodeBitmap);
    meta.setRange(d.inodeTable, d.inodeTable + g.itableBlocks);
  }
  const staticBlocks = meta.setCount;

  // Inodes in use: the inode bitmaps say which; tables are read only up to their never-used tail.
  const csum = g.csum !== 'none';
  const ipg = sb.inodesPerGroup;
  const bitmaps = new Map<number, Buffer>();
  const live: number[] = [];
  for (let i = 0; i < g.groups; i++) if (!(csum && descs[i]!.flags & BG_INODE_UNINIT)) live.push(i);
  await readBlockSet(reader, blockSize, live.map((i) => descs[i]!.inodeBitmap), (block, data) => bitmaps.set(block, Buffer.from(data)));
  const special = specialInodes(raw, sb.journalInum, sb.compat);
  const firstIno = sb.revLevel === 0 ? 11 : raw.readUInt32LE(SB_FIRST_INO);
  const walks: Walk[] = [];
  const counts = { directories: 0, symlinks: 0, xattrBlocks: 0, treeBlocks: 0, dirBlocks: 0 };
  for (const i of live) {
    const d = descs[i]!;
    const usedInodes = csum ? Math.max(0, ipg - d.itableUnused) : ipg;
    if (usedInodes === 0) continue;
    const bm = bitmaps.get(d.inodeBitmap)!;
    const tableBlocks = Math.ceil((usedInodes * g.inodeSize) / blockSize);
    const blocks: number[] = [];
    for (let k = 0; k < tableBlocks; k++) blocks.push(d.inodeTable + k);
    const perBlock = blockSize / g.inodeSize;
    await readBlockSet(reader, blockSize, blocks, (block, data) => {
      const base = (block - d.inodeTable) * perBlock;
      for (let k = 0; k < perBlock; k++) {
        const idx = base + k;
        if (idx >= usedInodes) break;
        if (!(bm[idx >>> 3]! & (1 << (idx & 7)))) continue; // 32-bit-ok: idx < inodes per group <= 2^19
        const ino = i * ipg + idx + 1;
        const inode = data.subarray(k * g.inodeSize, (k + 1) * g.inodeSize);
        const w = inodeWalk(g, ino, inode, firstIno, special, meta, counts);
        if (w) walks.push(w);
      }
    });
  }
  await walkTrees(reader, g, walks, meta, counts);
  const notes = [`${g.kind} metadata: ${staticBlocks} blocks of fixed structure, ${counts.dirBlocks} blocks of ${counts.directories} directories, ${counts.symlinks} symlinks, the journal and other special inodes, ${counts.treeBlocks} extent-tree or indirect blocks, ${counts.xattrBlocks} xattr blocks`];

  // A journal that needs recovery: every block it holds a copy of will be written in place.
  if (sb.incompat & INCOMPAT.RECOVER && sb.compat & COMPAT.HAS_JOURNAL && sb.journalInum !== 0) {
    const copies = await journalCopyBlocks(reader, g, descs).catch((e: unknown) => {
      if (e instanceof JournalError) throw corrupt(`the journal needs recovery and could not be read (${e.message})`);
      throw e;
    });
    for (const b of copies) if (b < g.blocksCount) meta.set(b);
    notes.push(`journal needs recovery: its ${copies.length} copied blocks count as metadata`);
  }
  return { filesystem: g.kind, blockSize, totalBlocks, bitmap: meta, notes };
}

/** Inodes whose every block is metadata: the journal, the quota files, the orphan file. */
function specialInodes(raw: Buffer, journalInum: number, compat: number): Set<number> {
  const s = new Set<number>();
  if (journalInum) s.add(journalInum);
  for (const off of SB_QUOTA_INUMS) { const n = raw.readUInt32LE(off); if (n) s.add(n); }
  if (compat & COMPAT_ORPHAN_FILE) { const n = raw.readUInt32LE(SB_ORPHAN_FILE_INUM); if (n) s.add(n); }
  return s;
}

/** Marks what the inode itself names (its xattr block) and says how its block map is to be walked. */
function inodeWalk(g: Geometry, ino: number, inode: Buffer, firstIno: number, special: Set<number>, meta: Bitset,
  counts: { directories: number; symlinks: number; xattrBlocks: number }): Walk | undefined {
  const mode = inode.readUInt16LE(INODE.mode);
  const flags = inode.readUInt32LE(INODE.flags);
  const acl = inode.readUInt32LE(INODE_FILE_ACL_LO) + (inode.length > INODE_FILE_ACL_HI + 1 ? inode.readUInt16LE(INODE_FILE_ACL_HI) * TWO32 : 0);
  if (acl) {
    if (acl >= g.blocksCount) throw corrupt(`inode ${ino} names xattr block ${acl}, past the end of the file system (${g.blocksCount} blocks)`);
    meta.set(acl);
    counts.xattrBlocks++;
  }
  if (flags & INODE_INLINE_DATA_FL) return undefined; // its data is inside the inode (table)
  const type = mode & S_IFMT;
  const isDir = type === S_IFDIR;
  const isLink = type === S_IFLNK;
  if (isDir) counts.directories++;
  if (isLink) counts.symlinks++;
  const iblock = inode.subarray(INODE.block, INODE.block + 60);
  const extents = (flags & INODE_EXTENTS_FL) !== 0;
  // A fast symlink keeps its target in i_block: no blocks at all.
  if (isLink && !extents && inode.readUInt32LE(INODE.sizeLo) < 60) return undefined;
  const all = isDir || isLink || ino < firstIno || special.has(ino) || (flags & INODE_EA_INODE_FL) !== 0;
  if (!all && extents && iblock.readUInt16LE(6) === 0) return undefined; // depth 0: the tree is inside the inode
  return { ino, all, iblock, extents };
}

/**
 * Walks every inode's block map level by level, all inodes at once (few large reads): tree and
 * indirect blocks are always metadata, the blocks they map only for `all` inodes.
 */
async function walkTrees(reader: BlockReader, g: Geometry, walks: Walk[], meta: Bitset, counts: { treeBlocks: number; dirBlocks: number }): Promise<void> {
  const check = (ino: number, p: number, len: number, what: string) => {
    if (p === 0 || p + len > g.blocksCount) throw corrupt(`inode ${ino} has ${what} at block ${p} (+${len}), outside the file system (${g.blocksCount} blocks)`);
  };
  const data = (w: Walk, p: number, len: number) => {
    if (!w.all) return;
    meta.setRange(p, p + len);
    counts.dirBlocks += len;
  };
  const tree = (p: number) => { if (!meta.get(p)) counts.treeBlocks++; meta.set(p); };

  // Extent trees: nodes of one level, each with its owner and the depth it must have.
  type Node = { w: Walk; buf: Buffer; depth: number };
  let level: Node[] = walks.filter((w) => w.extents).map((w) => ({ w, buf: w.iblock, depth: -1 }));
  for (let round = 0; level.length; round++) {
    if (round > 5) throw corrupt(`inode ${level[0]!.w.ino} has an extent tree deeper than 5 levels`);
    const next: Array<{ w: Walk; block: number; depth: number }> = [];
    for (const { w, buf, depth: want } of level) {
      if (buf.readUInt16LE(0) !== EXTENT_MAGIC) throw corrupt(`inode ${w.ino} has a bad extent header (magic 0x${buf.readUInt16LE(0).toString(16)})`);
      const entries = buf.readUInt16LE(2);
      const depth = buf.readUInt16LE(6);
      if (want >= 0 && depth !== want) throw corrupt(`inode ${w.ino} has an extent node of depth ${depth} where ${want} belongs`);
      if (12 + entries * 12 > buf.length) throw corrupt(`inode ${w.ino} has an extent node whose ${entries} entries overflow it`);
      for (let k = 0; k < entries; k++) {
        const o = 12 + k * 12;
        if (depth === 0) {
          let len = buf.readUInt16LE(o + 4);
          if (len > 32768) len -= 32768;
          const p = buf.readUInt16LE(o + 6) * TWO32 + buf.readUInt32LE(o + 8);
          if (len === 0) continue;
          check(w.ino, p, len, 'an extent');
          data(w, p, len);
        } else {
          const p = buf.readUInt32LE(o + 4) + buf.readUInt16LE(o + 8) * TWO32;
          check(w.ino, p, 1, 'an extent index');
          tree(p);
          next.push({ w, block: p, depth: depth - 1 });
        }
      }
    }
    level = [];
    for (let i = 0; i < next.length; i += LEVEL_BATCH) {
      const part = next.slice(i, i + LEVEL_BATCH);
      const bufs = await reader.readMany(part.map((n) => ({ offset: n.block * g.blockSize, length: g.blockSize })));
      part.forEach((n, k) => level.push({ w: n.w, buf: bufs[k]!, depth: n.depth }));
    }
  }

  // Classic block maps: 12 direct pointers, then single, double and triple indirect blocks.
  const per = g.blockSize / 4;
  let ind: Array<{ w: Walk; block: number; height: number }> = [];
  for (const w of walks) {
    if (w.extents) continue;
    for (let i = 0; i < 12; i++) {
      const p = w.iblock.readUInt32LE(i * 4);
      if (p) { check(w.ino, p, 1, 'a direct block'); data(w, p, 1); }
    }
    for (let k = 0; k < 3; k++) {
      const p = w.iblock.readUInt32LE((12 + k) * 4);
      if (p) { check(w.ino, p, 1, 'an indirect block'); tree(p); ind.push({ w, block: p, height: k + 1 }); }
    }
  }
  while (ind.length) {
    const next: typeof ind = [];
    for (let i = 0; i < ind.length; i += LEVEL_BATCH) {
      const part = ind.slice(i, i + LEVEL_BATCH);
      const bufs = await reader.readMany(part.map((n) => ({ offset: n.block * g.blockSize, length: g.blockSize })));
      part.forEach((n, k) => {
        const b = bufs[k]!;
        for (let e = 0; e < per; e++) {
          const p = b.readUInt32LE(e * 4);
          if (!p) continue;
          check(n.w.ino, p, 1, n.height === 1 ? 'a data block' : 'an indirect block');
          if (n.height === 1) data(n.w, p, 1);
          else { tree(p); next.push({ w: n.w, block: p, height: n.height - 1 }); }
        }
      });
    }
    ind = next;
  }
}

/** The blocks a journal replay would write (the newest committed copies). */
async function journalCopyBlocks(reader: BlockReader, g: Geometry, descs: Desc[]): Promise<number[]> {
  const { scan } = await scanJournal(reader, g, descs);
  return scan.empty ? [] : [...scan.copies.keys()];
}
