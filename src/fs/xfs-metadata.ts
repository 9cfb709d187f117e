// XFS metadata-block map (seed 004, claim 10) for `--hold metadata`: every block of the data device
// that holds file-system structure rather than file data, read straight from the device. Static
// metadata: each AG's header sectors, AGFL blocks and per-AG btrees (bnobt, cntbt, inobt, finobt,
// rmapbt, refcountbt), the inode chunks and the internal log. Dynamic metadata, from the in-use
// inodes: every block of directories, symlinks, the realtime bitmap/summary and quota inodes, every
// attribute-fork block, and the bmbt blocks of every btree-format fork. A superset is safe; a
// missed block is a bug, so anything that does not add up throws CorruptFileSystemError.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import { formatBytes } from '../util/size';
import type { MetadataMap } from './metadata-map';
import { corrupt, isPow2, parseAgf, parseSuperblock, readSuperblock, type AgInfo, type XfsGeometry } from './xfs';
import {
  checkInternalLog, readBlocks, SHORT_BTREE_MAX_LEVELS, walkShortBtrees, xfsChecksumOk,
  type ShortBtreeLeaf, type ShortBtreeRoot, type ShortBtreeType,
} from './xfs-btree';

const XFS_AGI_MAGIC = 0x58414749; // 'XAGI'
const XFS_AGFL_MAGIC = 0x5841464c; // 'XAFL'
const XFS_DINODE_MAGIC = 0x494e; // 'IN'
const XFS_BMAP_MAGIC = 0x424d4150; // 'BMAP' v4 bmbt
const XFS_BMAP_CRC_MAGIC = 0x424d4133; // 'BMA3' v5 bmbt
const NULLAGBLOCK = 0xffffffff;
const NULLWORD = 0xffffffff;

// sb_features_ro_compat (v5)
const RO_COMPAT_FINOBT = 1;
const RO_COMPAT_RMAPBT = 2;
const RO_COMPAT_REFLINK = 4;
const INCOMPAT_SPINODES = 2;
/** di_flags2: the data/attr extent counters are the 64/32-bit ones (NREXT64). */
const DIFLAG2_NREXT64 = 16;
const DIFLAG_REALTIME = 1;

const FMT_DEV = 0;
const FMT_LOCAL = 1;
const FMT_EXTENTS = 2;
const FMT_BTREE = 3;

const S_IFMT = 0xf000;
const S_IFDIR = 0x4000;
const S_IFLNK = 0xa000;
const S_IFREG = 0x8000;

const INODES_PER_CHUNK = 64;
const INODES_PER_HOLEMASK_BIT = 4;
/** bmbt height bound: 2^48 extents at the smallest fan-out still fit in far fewer levels. */
const BMBT_MAX_LEVELS = 12;
const TWO32 = 2 ** 32;

function tree(name: string, magic: number, magicName: string, recSize: number, keySize: number, uniqueKeys: boolean, sortOffset = 0): ShortBtreeType {
  return { name, magic, magicName, recSize, keySize, sortOffset, uniqueKeys };
}

/** Per-AG btree kinds, v4 and v5 (rmapbt and refcountbt exist on v5 only). */
const TREES = {
  bno: [tree('free-space btree', 0x41425442, 'ABTB', 8, 8, true), tree('free-space btree', 0x41423342, 'AB3B', 8, 8, true)],
  // cntbt sorts by blockcount (the record's and key's second word), with duplicates.
  cnt: [tree('free-space by-size btree', 0x41425443, 'ABTC', 8, 8, false, 4), tree('free-space by-size btree', 0x41423343, 'AB3C', 8, 8, false, 4)],
  ino: [tree('inode btree', 0x49414254, 'IABT', 16, 4, true), tree('inode btree', 0x49414233, 'IAB3', 16, 4, true)],
  fino: [tree('free-inode btree', 0x46494254, 'FIBT', 16, 4, true), tree('free-inode btree', 0x46494233, 'FIB3', 16, 4, true)],
  // rmapbt nodes hold a low and a high key (20 bytes each) per child; records may share a start.
  rmap: [undefined, tree('reverse-mapping btree', 0x524d4233, 'RMB3', 24, 40, false)],
  refc: [undefined, tree('reference-count btree', 0x52334643, 'R3FC', 12, 4, true)],
} as const;

/** What the superblock says about inodes, beyond XfsGeometry. */
interface InodeGeometry {
  inodeSize: number;
  inopblock: number;
  inopblog: number;
  /** Bytes of the inode core: the forks follow it. */
  coreSize: number;
  sparse: boolean;
  roCompat: number;
  /** Inodes whose every block is metadata: realtime bitmap/summary, quota files; per AG. */
  special: Map<number, Set<number>>;
}

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

function parseInodeGeometry(sb: Buffer, g: XfsGeometry): InodeGeometry {
  const inodeSize = sb.readUInt16BE(104);
  const inopblock = sb.readUInt16BE(106);
  const inopblog = sb[123]!;
  if (!isPow2(inodeSize) || inodeSize < 256 || inodeSize > 2048 || (g.crc && inodeSize < 512)) {
    throw corrupt(`superblock inode size ${inodeSize} is not a power of two between ${g.crc ? 512 : 256} and 2048`);
  }
  if (sb[122] !== log2(inodeSize)) throw corrupt(`superblock inodelog ${sb[122]} does not match inode size ${inodeSize}`);
  if (inodeSize * inopblock !== g.blockSize || inopblog !== log2(inopblock)) {
    throw corrupt(`superblock says ${inopblock} inodes of ${inodeSize} bytes per ${g.blockSize}-byte block (inopblog ${inopblog})`);
  }
  if (g.agblklog + inopblog > 32) throw corrupt(`superblock agblklog ${g.agblklog} + inopblog ${inopblog} exceed 32 bits of AG inode number`);
  const special = new Map<number, Set<number>>();
  const inos: Array<[string, number]> = [['rbmino', 64], ['rsumino', 72], ['uquotino', 160], ['gquotino', 168]];
  if (g.crc) inos.push(['pquotino', 232]);
  const shift = 2n ** BigInt(g.agblklog + inopblog);
  for (const [what, off] of inos) {
    const ino = sb.readBigUInt64BE(off);
    if (ino === 0n || ino === 0xffffffffffffffffn) continue; // none (NULLFSINO; v4 may leave 0)
    const agno = Number(ino / shift);
    const agino = Number(ino % shift);
    if (agno >= g.agcount) throw corrupt(`superblock ${what} ${ino} is past the last AG`);
    let set = special.get(agno);
    if (!set) special.set(agno, (set = new Set()));
    set.add(agino);
  }
  return {
    inodeSize, inopblock, inopblog, coreSize: g.crc ? 176 : 100,
    sparse: g.crc && (g.incompat & INCOMPAT_SPINODES) !== 0,
    roCompat: g.crc ? sb.readUInt32BE(212) : 0,
    special,
  };
}

interface AgiInfo {
  root: number;
  level: number;
  freeRoot: number;
  freeLevel: number;
}

function parseAgi(buf: Buffer, g: XfsGeometry, ig: InodeGeometry, ag: AgInfo): AgiInfo {
  const what = `AGI of AG ${ag.agno}`;
  if (buf.readUInt32BE(0) !== XFS_AGI_MAGIC) throw corrupt(`${what}: magic is not XAGI`);
  if (buf.readUInt32BE(4) !== 1) throw corrupt(`${what}: version ${buf.readUInt32BE(4)} is not 1`);
  if (g.crc) {
    if (!xfsChecksumOk(buf, 312)) throw corrupt(`${what}: CRC mismatch`);
    if (!buf.subarray(296, 312).equals(g.metaUuid)) throw corrupt(`${what}: uuid does not match the superblock`);
  }
  if (buf.readUInt32BE(8) !== ag.agno) throw corrupt(`${what}: sequence number ${buf.readUInt32BE(8)} does not match`);
  if (buf.readUInt32BE(12) !== ag.length) throw corrupt(`${what}: length ${buf.readUInt32BE(12)} blocks, the AGF says ${ag.length}`);
  const root = buf.readUInt32BE(20);
  const level = buf.readUInt32BE(24);
  checkRoot(what, 'inode btree', root, level, ag.length);
  let freeRoot = 0, freeLevel = 0;
  if (ig.roCompat & RO_COMPAT_FINOBT) {
    freeRoot = buf.readUInt32BE(328);
    freeLevel = buf.readUInt32BE(332);
    checkRoot(what, 'free-inode btree', freeRoot, freeLevel, ag.length);
  }
  return { root, level, freeRoot, freeLevel };
}

function checkRoot(what: string, name: string, root: number, level: number, agLength: number): void {
  if (level < 1 || level > SHORT_BTREE_MAX_LEVELS) throw corrupt(`${what}: ${name} height ${level} is out of range`);
  if (root === 0 || root >= agLength) throw corrupt(`${what}: ${name} root ${root} is past the AG end (${agLength} blocks)`);
}

/** The AGFL's live entries, flfirst..fllast circularly (a stale slot may name a free or data block). */
function agflBlocks(buf: Buffer, g: XfsGeometry, ag: AgInfo): number[] {
  const what = `AGFL of AG ${ag.agno}`;
  let hdr = 0;
  if (g.crc) {
    if (buf.readUInt32BE(0) !== XFS_AGFL_MAGIC) throw corrupt(`${what}: magic is not XAFL`);
    if (!xfsChecksumOk(buf, 32)) throw corrupt(`${what}: CRC mismatch`);
    if (buf.readUInt32BE(4) !== ag.agno) throw corrupt(`${what}: sequence number ${buf.readUInt32BE(4)} does not match`);
    if (!buf.subarray(8, 24).equals(g.metaUuid)) throw corrupt(`${what}: uuid does not match the superblock`);
    hdr = 36;
  }
  if (ag.flcount === 0) return [];
  let slots = Math.floor((g.sectSize - hdr) / 4);
  const span = (n: number) => ((ag.fllast - ag.flfirst + n) % n) + 1;
  // Kernels 4.5-4.16 padded the v5 header to 40 bytes (one slot fewer); a list they wrapped still reads right.
  if (g.crc && span(slots) !== ag.flcount && ag.fllast < slots - 1 && ag.flfirst < slots - 1 && span(slots - 1) === ag.flcount) slots--;
  if (ag.flcount > slots || ag.flfirst >= slots || ag.fllast >= slots || span(slots) !== ag.flcount) {
    throw corrupt(`${what}: free list first ${ag.flfirst}, last ${ag.fllast}, count ${ag.flcount} do not fit its ${slots} slots`);
  }
  const out: number[] = [];
  for (let k = 0, i = ag.flfirst; k < ag.flcount; k++, i = (i + 1) % slots) {
    const bno = buf.readUInt32BE(hdr + i * 4);
    if (bno === NULLAGBLOCK || bno === 0 || bno >= ag.length) throw corrupt(`${what}: entry ${i} (block ${bno}) is not a block of the AG (${ag.length} blocks)`);
    out.push(bno);
  }
  return out;
}

/** An inode chunk from the inobt: which of its inodes exist (not a sparse hole) and which are in use. */
interface Chunk {
  agno: number;
  startino: number;
  /** Bit i of the 64: the inode exists (hi word: inodes 32..63). */
  presentLo: number;
  presentHi: number;
  usedLo: number;
  usedHi: number;
  /** Some of its inodes are sparse holes (holemask not 0). */
  sparse: boolean;
}

function bit(lo: number, hi: number, i: number): boolean {
  return i < 32 ? ((lo >>> i) & 1) === 1 : ((hi >>> (i - 32)) & 1) === 1; // 32-bit-ok: i < 64 is a bit of a 64-bit mask, split in words
}

function popcount32(v: number): number {
  let n = 0;
  for (let x = v >>> 0; x !== 0; x = Math.floor(x / 2)) n += x % 2;
  return n;
}

type Counter = 'dir' | 'lnk' | 'attr' | 'special';

/** A btree-format fork to walk: whose it is, and whether the extents its leaves map are metadata too. */
interface Fork {
  what: string;
  /** Inode number as two 32-bit words (the v5 bmbt owner). */
  inoHi: number;
  inoLo: number;
  wantExtents: boolean;
  counter: Counter;
  seen: Set<number>;
}

interface PendingBmbt {
  fork: Fork;
  block: number; // linear
  level: number;
  leftsib: number; // linear, -1 = none
  rightsib: number;
  lowKey: number;
}

/** Counts for the note and the tests. */
export interface XfsMetadataCounts {
  ags: number;
  headerBlocks: number;
  agflBlocks: number;
  btreeBlocks: number;
  inodeChunks: number;
  sparseChunks: number;
  inodeChunkBlocks: number;
  inodesInUse: number;
  directories: number;
  directoryBlocks: number;
  symlinkBlocks: number;
  attrBlocks: number;
  bmbtBlocks: number;
  specialBlocks: number;
  logBlocks: number;
}

/** Reads the metadata map of the XFS file system on `reader` (throws CorruptFileSystemError). */
export async function readXfsMetadata(reader: BlockReader): Promise<MetadataMap> {
  return (await readXfsMetadataCounted(reader)).map;
}

/** readXfsMetadata, with its counts. */
export async function readXfsMetadataCounted(reader: BlockReader): Promise<{ map: MetadataMap; counts: XfsMetadataCounts }> {
  const sb = await readSuperblock(reader);
  const g = parseSuperblock(sb, reader.size);
  const ig = parseInodeGeometry(sb, g);
  const bs = g.blockSize;
  const totalBlocks = Math.ceil(reader.size / bs);
  const bitmap = new Bitset(totalBlocks);
  const notes: string[] = [];
  const c: XfsMetadataCounts = {
    ags: g.agcount, headerBlocks: 0, agflBlocks: 0, btreeBlocks: 0, inodeChunks: 0, sparseChunks: 0, inodeChunkBlocks: 0, inodesInUse: 0, directories: 0,
    directoryBlocks: 0, symlinkBlocks: 0, attrBlocks: 0, bmbtBlocks: 0, specialBlocks: 0, logBlocks: 0,
  };
  const agLen = (agno: number) => (agno < g.agcount - 1 ? g.agblocks : g.dblocks - agno * g.agblocks);

  // The log: held whole (every write to it is a metadata change).
  if (g.logstart === 0) {
    notes.push('xfs log on an external device: not in this map (hold that device too)');
  } else {
    const agno = Math.floor(g.logstart / 2 ** g.agblklog);
    const start = agno * g.agblocks + (g.logstart % 2 ** g.agblklog);
    bitmap.setRange(start, start + g.logblocks);
    c.logBlocks = g.logblocks;
    const state = await checkInternalLog(reader, start * bs, g.logblocks * (bs / 512));
    // A dirty log means structures changed since their blocks on disk were written: the map is of
    // the on-disk structures, and blocks allocated only in the log are not in it.
    if (!state.clean) notes.push(`xfs log needs recovery (${state.reason}): metadata allocated since the last checkpoint may be missing from the map`);
  }
  if (g.rblocks > 0) notes.push(`realtime subvolume (${g.rblocks} blocks) is on another device: not in this map; its bitmap and summary inodes are`);

  // AG headers: sb, AGF, AGI, AGFL sectors, in one read.
  const hdrBlocks = Math.ceil((4 * g.sectSize) / bs);
  const heads = await reader.readMany(Array.from({ length: g.agcount }, (_, agno) => ({ offset: agno * g.agblocks * bs + g.sectSize, length: 3 * g.sectSize })));
  const ags: AgInfo[] = [];
  const roots: ShortBtreeRoot[] = [];
  const v = g.crc ? 1 : 0;
  for (let agno = 0; agno < g.agcount; agno++) {
    const h = heads[agno]!;
    const ag = parseAgf(h.subarray(0, g.sectSize), g, agno);
    ags.push(ag);
    const agi = parseAgi(h.subarray(g.sectSize, 2 * g.sectSize), g, ig, ag);
    const base = agno * g.agblocks;
    bitmap.setRange(base, base + hdrBlocks);
    c.headerBlocks += hdrBlocks;
    for (const bno of agflBlocks(h.subarray(2 * g.sectSize, 3 * g.sectSize), g, ag)) bitmap.set(base + bno);
    c.agflBlocks += ag.flcount;
    const what = `AGF of AG ${agno}`;
    const add = (type: ShortBtreeType, root: number, levels: number, keyLimit: number) => {
      roots.push({ type, agno, agLength: ag.length, root, levels, keyLimit });
    };
    add(TREES.bno[v], ag.bnoRoot, ag.bnoLevel, ag.length);
    checkRoot(what, 'free-space by-size btree', ag.cntRoot, ag.cntLevel, ag.length);
    add(TREES.cnt[v], ag.cntRoot, ag.cntLevel, ag.length + 1);
    const inoLimit = Math.min(TWO32, ag.length * ig.inopblock);
    add(TREES.ino[v], agi.root, agi.level, inoLimit);
    if (ig.roCompat & RO_COMPAT_FINOBT) add(TREES.fino[v], agi.freeRoot, agi.freeLevel, inoLimit);
    if (g.crc && ig.roCompat & RO_COMPAT_RMAPBT) {
      checkRoot(what, 'reverse-mapping btree', ag.rmapRoot, ag.rmapLevel, ag.length);
      add(TREES.rmap[1]!, ag.rmapRoot, ag.rmapLevel, ag.length);
    }
    if (g.crc && ig.roCompat & RO_COMPAT_REFLINK) {
      checkRoot(what, 'reference-count btree', ag.refcountRoot, ag.refcountLevel, ag.length);
      // CoW staging records carry bit 31 in their start block: keys reach 2^32.
      add(TREES.refc[1]!, ag.refcountRoot, ag.refcountLevel, TWO32);
    }
  }

  // Every per-AG btree, walked together; the inobt's leaves give the inode chunks.
  const chunks: Chunk[] = [];
  const lastRec = new Map<ShortBtreeRoot, number>();
  c.btreeBlocks = await walkShortBtrees(reader, g, roots, (leaf) => {
    checkLeafKeys(leaf, lastRec);
    if (leaf.tree.type === TREES.ino[v]) chunks.push(...inobtChunks(leaf, ig));
  }, (t, agbno) => bitmap.set(t.agno * g.agblocks + agbno));

  // Inode chunks: the blocks of the inodes that exist (not the holes of a sparse chunk).
  const reads: Array<{ block: number; count: number; chunk: Chunk; firstIno: number }> = [];
  for (const ch of chunks) {
    c.inodeChunks++;
    if (ch.sparse) c.sparseChunks++;
    const base = ch.agno * g.agblocks;
    let used0 = -1, used1 = -1;
    for (let b = 0; b < INODES_PER_CHUNK / INODES_PER_HOLEMASK_BIT; b++) {
      const i0 = b * INODES_PER_HOLEMASK_BIT;
      if (!bit(ch.presentLo, ch.presentHi, i0)) continue;
      const first = Math.floor((ch.startino + i0) / ig.inopblock);
      const end = Math.ceil((ch.startino + i0 + INODES_PER_HOLEMASK_BIT) / ig.inopblock);
      if (end > ags[ch.agno]!.length) throw corrupt(`inode chunk at AG inode ${ch.startino} of AG ${ch.agno} lies past the AG end`);
      if (first < hdrBlocks) throw corrupt(`inode chunk at AG inode ${ch.startino} of AG ${ch.agno} overlaps the AG headers`);
      c.inodeChunkBlocks += end - first - bitmap.count(base + first, base + end);
      bitmap.setRange(base + first, base + end);
      for (let i = i0; i < i0 + INODES_PER_HOLEMASK_BIT; i++) {
        if (!bit(ch.usedLo, ch.usedHi, i)) continue;
        if (used0 < 0) used0 = ch.startino + i;
        used1 = ch.startino + i;
      }
    }
    if (used0 < 0) continue;
    const fb = Math.floor(used0 / ig.inopblock);
    reads.push({ block: base + fb, count: Math.floor(used1 / ig.inopblock) - fb + 1, chunk: ch, firstIno: fb * ig.inopblock });
  }

  // The in-use inodes: their forks name the dynamic metadata.
  const forks: PendingBmbt[] = [];
  const markExtent = (what: string, fsb: number, count: number): number => {
    const agno = Math.floor(fsb / 2 ** g.agblklog);
    const agbno = fsb % 2 ** g.agblklog;
    if (count === 0 || agno >= g.agcount || agbno + count > agLen(agno)) throw corrupt(`${what}: extent at block ${agno}/${agbno} (${count} blocks) is outside the file system`);
    bitmap.setRange(agno * g.agblocks + agbno, agno * g.agblocks + agbno + count);
    return count;
  };
  const counters: Record<Counter, number> = { dir: 0, lnk: 0, attr: 0, special: 0 };
  // Batches of about 32 MiB of inode blocks: one inode table is read once, never held whole.
  for (let r0 = 0; r0 < reads.length;) {
    let r1 = r0, bytes = 0;
    while (r1 < reads.length && (r1 === r0 || bytes + reads[r1]!.count * bs <= 32 * 1024 * 1024)) bytes += reads[r1++]!.count * bs;
    const part = reads.slice(r0, r1);
    r0 = r1;
    const bufs = await readBlocks(reader, bs, part);
    part.forEach((rd, k) => {
      const buf = bufs[k]!;
      const ch = rd.chunk;
      const special = ig.special.get(ch.agno);
      // Inode number words: ino = agno * 2^S + agino, S = agblklog + inopblog <= 32.
      const S = g.agblklog + ig.inopblog;
      const inoHi = Math.floor(ch.agno / 2 ** (32 - S));
      const loBase = (ch.agno % 2 ** (32 - S)) * 2 ** S;
      for (let i = 0; i < INODES_PER_CHUNK; i++) {
        if (!bit(ch.usedLo, ch.usedHi, i)) continue;
        const agino = ch.startino + i;
        const off = (agino - rd.firstIno) * ig.inodeSize;
        const d = buf.subarray(off, off + ig.inodeSize);
        const what = `inode ${agino} of AG ${ch.agno}`;
        c.inodesInUse++;
        const kind = readInode(d, what, g, ig, inoHi, loBase + agino, special?.has(agino) ?? false);
        if (kind.isDir) c.directories++;
        for (const f of kind.forks) {
          if (f.format === FMT_EXTENTS) {
            for (let e = 0; e < f.nextents; e++) {
              const x = decodeExtent(d, f.offset + e * 16);
              if (f.wantExtents) counters[f.counter] += markExtent(`${what} ${f.name} fork`, x.startblock, x.blockcount);
            }
          } else {
            const fork: Fork = { what: `${what} ${f.name} fork`, inoHi, inoLo: loBase + agino, wantExtents: f.wantExtents, counter: f.counter, seen: new Set() };
            for (const p of bmdrRoot(d, f.offset, f.size, fork.what)) {
              forks.push({ fork, block: fsbToLinear(g, agLen, p.ptr, fork.what), level: p.level, leftsib: -1, rightsib: -1, lowKey: p.key });
            }
          }
        }
      }
    });
  }

  // bmbt blocks of every btree-format fork, walked together level by level.
  c.bmbtBlocks = await walkBmbt(reader, g, agLen, forks, (block) => bitmap.set(block), (fork, fsb, count) => {
    counters[fork.counter] += markExtent(fork.what, fsb, count);
  });
  c.directoryBlocks = counters.dir;
  c.symlinkBlocks = counters.lnk;
  c.attrBlocks = counters.attr;
  c.specialBlocks = counters.special;

  const n = (x: number) => x.toLocaleString('en-US');
  notes.unshift(
    `xfs metadata: ${n(g.agcount)} AG${g.agcount === 1 ? '' : 's'}, ${n(c.btreeBlocks)} btree blocks, ${n(c.inodeChunks)} inode chunks ` +
    `(${c.sparseChunks ? `${n(c.sparseChunks)} sparse, ` : ''}${n(c.inodesInUse)} inodes in use), ${n(c.directoryBlocks)} directory blocks, ${n(c.bmbtBlocks)} extent-tree blocks, ` +
    `${n(c.attrBlocks)} attribute blocks, ${n(c.symlinkBlocks)} symlink blocks, ${n(c.specialBlocks)} quota/realtime-bitmap blocks, ` +
    `${n(c.agflBlocks)} free-list blocks, ` + (g.logstart === 0 ? 'external log' : `log ${formatBytes(g.logblocks * bs)}`),
  );
  return { map: { filesystem: 'xfs', blockSize: bs, totalBlocks, bitmap, notes }, counts: c };
}

/** Leaf records sort by the tree's key across leaves and lie in the leaf's key range. */
function checkLeafKeys(leaf: ShortBtreeLeaf, lastRec: Map<ShortBtreeRoot, number>): void {
  const { type } = leaf.tree;
  let prev = lastRec.get(leaf.tree) ?? -1;
  for (let r = 0; r < leaf.numrecs; r++) {
    const k = leaf.buf.readUInt32BE(leaf.hdr + r * type.recSize + type.sortOffset);
    if (type.uniqueKeys ? k <= prev : k < prev) throw corrupt(`${leaf.what}: records out of order`);
    if (k < leaf.lowKey || k > leaf.highKey || (k === leaf.highKey && !leaf.highInclusive)) throw corrupt(`${leaf.what}: record ${r} (key ${k}) lies outside its parent's key range`);
    if (r === 0 && !leaf.isRoot && k !== leaf.lowKey) throw corrupt(`${leaf.what}: first record ${k} does not match its parent key ${leaf.lowKey}`);
    prev = k;
  }
  lastRec.set(leaf.tree, prev);
}

/** inobt leaf records as chunks: startino, holemask (sparse), free mask. */
function inobtChunks(leaf: ShortBtreeLeaf, ig: InodeGeometry): Chunk[] {
  const out: Chunk[] = [];
  const b = leaf.buf;
  for (let r = 0; r < leaf.numrecs; r++) {
    const o = leaf.hdr + r * 16;
    const startino = b.readUInt32BE(o);
    const what = `${leaf.what}: record ${r} (AG inode ${startino})`;
    if (startino % INODES_PER_CHUNK !== 0) throw corrupt(`${what} does not start a 64-inode chunk`);
    if (startino + INODES_PER_CHUNK > leaf.tree.keyLimit) throw corrupt(`${what} lies past the AG end`);
    let holemask = 0, count = INODES_PER_CHUNK, freecount: number;
    if (ig.sparse) {
      holemask = b.readUInt16BE(o + 4);
      count = b[o + 6]!;
      freecount = b[o + 7]!;
    } else {
      freecount = b.readUInt32BE(o + 4);
    }
    const freeHi = b.readUInt32BE(o + 8);
    const freeLo = b.readUInt32BE(o + 12);
    // Each holemask bit stands for 4 inodes; a hole is never allocated.
    let presentLo = 0, presentHi = 0;
    for (let hb = 0; hb < 16; hb++) {
      if ((holemask >>> hb) & 1) continue; // 32-bit-ok: holemask is 16 bits, hb < 16
      const nib = 0xf * 2 ** ((hb % 8) * 4);
      if (hb < 8) presentLo += nib; else presentHi += nib;
    }
    const present = popcount32(presentLo) + popcount32(presentHi);
    if (count !== present) throw corrupt(`${what}: count ${count} does not match its holemask (${present} inodes)`);
    if ((~presentLo & ~freeLo) !== 0 || (~presentHi & ~freeHi) !== 0) throw corrupt(`${what}: a sparse hole is marked in use`);
    const usedLo = (presentLo & ~freeLo) >>> 0;
    const usedHi = (presentHi & ~freeHi) >>> 0;
    if (freecount !== present - popcount32(usedLo) - popcount32(usedHi)) throw corrupt(`${what}: free count ${freecount} does not match its free mask`);
    out.push({ agno: leaf.tree.agno, startino, presentLo: presentLo >>> 0, presentHi: presentHi >>> 0, usedLo, usedHi, sparse: holemask !== 0 });
  }
  return out;
}

interface ForkRef {
  name: 'data' | 'attribute';
  format: number;
  offset: number;
  size: number;
  nextents: number;
  wantExtents: boolean;
  counter: Counter;
}

/** Checks an in-use inode and names its extent-list and btree forks. */
function readInode(d: Buffer, what: string, g: XfsGeometry, ig: InodeGeometry, inoHi: number, inoLo: number, special: boolean): { isDir: boolean; forks: ForkRef[] } {
  if (d.readUInt16BE(0) !== XFS_DINODE_MAGIC) throw corrupt(`${what}: magic 0x${d.readUInt16BE(0).toString(16)} is not IN (the inode btree says it is in use)`);
  const version = d[4]!;
  if (g.crc ? version !== 3 : version !== 1 && version !== 2) throw corrupt(`${what}: inode version ${version} on a v${g.version} file system`);
  if (g.crc) {
    if (!xfsChecksumOk(d, 100)) throw corrupt(`${what}: CRC mismatch`);
    if (d.readUInt32BE(152) !== inoHi || d.readUInt32BE(156) !== inoLo) throw corrupt(`${what}: stamped inode number ${d.readBigUInt64BE(152)} is wrong (misplaced write)`);
    if (!d.subarray(160, 176).equals(g.metaUuid)) throw corrupt(`${what}: uuid does not match the superblock`);
  }
  const mode = d.readUInt16BE(2);
  const type = mode & S_IFMT;
  if (type === 0) throw corrupt(`${what}: mode 0 but the inode btree says it is in use`);
  const isDir = type === S_IFDIR;
  const isLnk = type === S_IFLNK;
  const format = d[5]!;
  const forkoff = d[82]!;
  const aformat = d[83]!;
  const literal = ig.inodeSize - ig.coreSize;
  if (forkoff * 8 >= literal) throw corrupt(`${what}: attribute fork offset ${forkoff * 8} is past the inode's ${literal}-byte literal area`);
  const nrext64 = g.crc && d.readUInt32BE(124) % 32 >= DIFLAG2_NREXT64; // low word of di_flags2, bit 4
  const hi = nrext64 ? d.readUInt32BE(24) : 0;
  if (hi >= 2 ** 21) throw corrupt(`${what}: data extent count is out of range`);
  const nextents = nrext64 ? hi * TWO32 + d.readUInt32BE(28) : d.readUInt32BE(76);
  const anextents = nrext64 ? d.readUInt32BE(76) : d.readUInt16BE(80);
  const dsize = forkoff ? forkoff * 8 : literal;
  const forks: ForkRef[] = [];
  const realtime = (d.readUInt16BE(90) & DIFLAG_REALTIME) !== 0;
  const dataIsMeta = isDir || isLnk || special;
  if (format > FMT_BTREE) throw corrupt(`${what}: data fork format ${format} is unknown`);
  if (format === FMT_DEV ? type === S_IFDIR || type === S_IFREG || type === S_IFLNK : type !== S_IFDIR && type !== S_IFREG && type !== S_IFLNK) {
    throw corrupt(`${what}: data fork format ${format} does not fit file type 0${(type / 4096).toString(8)}`);
  }
  if (format === FMT_EXTENTS || format === FMT_BTREE) {
    if (format === FMT_EXTENTS && nextents * 16 > dsize) throw corrupt(`${what}: ${nextents} data extents do not fit the ${dsize}-byte fork`);
    forks.push({
      name: 'data', format, offset: ig.coreSize, size: dsize, nextents, wantExtents: dataIsMeta && !realtime,
      counter: isDir ? 'dir' : isLnk ? 'lnk' : 'special',
    });
  }
  if (forkoff) {
    const asize = literal - forkoff * 8;
    if (aformat !== FMT_LOCAL && aformat !== FMT_EXTENTS && aformat !== FMT_BTREE) throw corrupt(`${what}: attribute fork format ${aformat} is unknown`);
    if (aformat === FMT_EXTENTS && anextents * 16 > asize) throw corrupt(`${what}: ${anextents} attribute extents do not fit the ${asize}-byte fork`);
    if (aformat !== FMT_LOCAL) forks.push({ name: 'attribute', format: aformat, offset: ig.coreSize + forkoff * 8, size: asize, nextents: anextents, wantExtents: true, counter: 'attr' });
  }
  return { isDir, forks };
}

/** A packed 128-bit extent record: startoff (54 bits), startblock (52), blockcount (21). */
function decodeExtent(b: Buffer, o: number): { startoff: number; startblock: number; blockcount: number } {
  const w0 = b.readUInt32BE(o), w1 = b.readUInt32BE(o + 4), w2 = b.readUInt32BE(o + 8), w3 = b.readUInt32BE(o + 12);
  return {
    // Offsets past 2^53 blocks lose precision here; they are only compared for order.
    startoff: (w0 % 2 ** 31) * 2 ** 23 + Math.floor(w1 / 512),
    startblock: (w1 % 512) * 2 ** 43 + w2 * 2048 + Math.floor(w3 / 2 ** 21),
    blockcount: w3 % 2 ** 21,
  };
}

/** A 64-bit fs block number (agno << agblklog | agbno) as a linear device block, checked. */
function fsbToLinear(g: XfsGeometry, agLen: (agno: number) => number, fsb: number, what: string): number {
  const agno = Math.floor(fsb / 2 ** g.agblklog);
  const agbno = fsb % 2 ** g.agblklog;
  if (!Number.isSafeInteger(fsb) || fsb < 0 || agno >= g.agcount || agbno === 0 || agbno >= agLen(agno)) throw corrupt(`${what}: btree pointer ${fsb} is not a block of the file system`);
  return agno * g.agblocks + agbno;
}

function readU64Words(b: Buffer, o: number): number {
  const hi = b.readUInt32BE(o);
  // Past 2^53 cannot be a block of any file system this reads; NULLFSBLOCK is all ones.
  if (hi >= 2 ** 21) return hi === NULLWORD && b.readUInt32BE(o + 4) === NULLWORD ? -1 : Number.NaN;
  return hi * TWO32 + b.readUInt32BE(o + 4);
}

/** The bmbt root held in an inode fork (xfs_bmdr_block): its children as (level, key, pointer). */
function bmdrRoot(d: Buffer, off: number, size: number, what: string): Array<{ level: number; key: number; ptr: number }> {
  const level = d.readUInt16BE(off);
  const numrecs = d.readUInt16BE(off + 2);
  const maxrecs = Math.floor((size - 4) / 16);
  if (level < 1 || level >= BMBT_MAX_LEVELS) throw corrupt(`${what}: extent btree root level ${level} is out of range`);
  if (numrecs < 1 || numrecs > maxrecs) throw corrupt(`${what}: extent btree root has ${numrecs} keys, expected 1..${maxrecs}`);
  const out: Array<{ level: number; key: number; ptr: number }> = [];
  for (let r = 0; r < numrecs; r++) {
    const key = readU64Words(d, off + 4 + r * 8);
    const ptr = readU64Words(d, off + 4 + maxrecs * 8 + r * 8);
    if (!(key >= 0) || (r > 0 && key <= out[r - 1]!.key)) throw corrupt(`${what}: extent btree root keys out of order`);
    out.push({ level: level - 1, key, ptr: Number.isNaN(ptr) ? -1 : ptr });
  }
  return out;
}

/**
 * Walks the bmbts (long-form btrees) below the roots in `pending`, all together, one batched read
 * per level: magic, v5 CRC / block stamp / uuid / owner inode, level, siblings, key order, no block
 * twice in a fork. `onBlock` sees every bmbt block; `onExtent` the mapped extents of forks that want them.
 */
async function walkBmbt(
  reader: BlockReader, g: XfsGeometry, agLen: (agno: number) => number, pending: PendingBmbt[],
  onBlock: (block: number) => void, onExtent: (fork: Fork, fsb: number, count: number) => void,
): Promise<number> {
  const hdr = g.crc ? 72 : 24;
  const magic = g.crc ? XFS_BMAP_CRC_MAGIC : XFS_BMAP_MAGIC;
  const maxrecs = Math.floor((g.blockSize - hdr) / 16);
  const sectorsPerBlock = g.blockSize / 512;
  // Siblings of the roots' children: neighbours within one fork.
  const link = (level: PendingBmbt[]) => {
    for (let i = 1; i < level.length; i++) {
      if (level[i - 1]!.fork === level[i]!.fork) { level[i]!.leftsib = level[i - 1]!.block; level[i - 1]!.rightsib = level[i]!.block; }
    }
  };
  for (const p of pending) {
    if (p.fork.seen.has(p.block)) throw corrupt(`${p.fork.what}: extent btree block ${p.block} is referenced twice (loop)`);
    p.fork.seen.add(p.block);
  }
  link(pending);
  let frontier = pending;
  let blocksRead = 0;
  const lastOff = new Map<Fork, number>();
  while (frontier.length > 0) {
    const bufs = await readBlocks(reader, g.blockSize, frontier.map((n) => ({ block: n.block, count: 1 })));
    blocksRead += bufs.length;
    const next: PendingBmbt[] = [];
    for (let i = 0; i < frontier.length; i++) {
      const n = frontier[i]!;
      const b = bufs[i]!;
      const what = `${n.fork.what}: extent btree block ${n.block}`;
      if (b.readUInt32BE(0) !== magic) throw corrupt(`${what}: magic 0x${b.readUInt32BE(0).toString(16)} is not ${g.crc ? 'BMA3' : 'BMAP'}`);
      if (g.crc) {
        if (!xfsChecksumOk(b, 64)) throw corrupt(`${what}: CRC mismatch`);
        if (b.readBigUInt64BE(24) !== BigInt(n.block * sectorsPerBlock)) throw corrupt(`${what}: block number stamp ${b.readBigUInt64BE(24)} is wrong (misplaced write)`);
        if (!b.subarray(40, 56).equals(g.metaUuid)) throw corrupt(`${what}: uuid does not match the superblock`);
        if (b.readUInt32BE(56) !== n.fork.inoHi || b.readUInt32BE(60) !== n.fork.inoLo) throw corrupt(`${what}: owner ${b.readBigUInt64BE(56)} is not this inode`);
      }
      onBlock(n.block);
      const level = b.readUInt16BE(4);
      const numrecs = b.readUInt16BE(6);
      const sib = (o: number) => {
        const f = readU64Words(b, o);
        return f === -1 ? -1 : Number.isNaN(f) ? -2 : fsbToLinear(g, agLen, f, what);
      };
      const left = sib(8), right = sib(16);
      if (level !== n.level) throw corrupt(`${what}: level ${level}, expected ${n.level}`);
      if (left !== n.leftsib || right !== n.rightsib) throw corrupt(`${what}: sibling pointers do not match the tree`);
      if (numrecs === 0 || numrecs > maxrecs) throw corrupt(`${what}: ${numrecs} records, expected 1..${maxrecs}`);
      if (level === 0) {
        let prev = lastOff.get(n.fork) ?? -1;
        for (let r = 0; r < numrecs; r++) {
          const x = decodeExtent(b, hdr + r * 16);
          if (x.startoff < prev || (r === 0 && x.startoff !== n.lowKey)) throw corrupt(`${what}: extent records out of order or not matching the parent key`);
          prev = x.startoff + x.blockcount;
          if (n.fork.wantExtents) onExtent(n.fork, x.startblock, x.blockcount);
        }
        lastOff.set(n.fork, prev);
        continue;
      }
      let prevKey = -1;
      for (let r = 0; r < numrecs; r++) {
        const key = readU64Words(b, hdr + r * 8);
        const ptr = readU64Words(b, hdr + maxrecs * 8 + r * 8);
        if (!(key > prevKey) || (r === 0 && key !== n.lowKey)) throw corrupt(`${what}: keys out of order or not matching the parent key`);
        prevKey = key;
        if (!(ptr >= 0)) throw corrupt(`${what}: child pointer is not a block of the file system`);
        const child = fsbToLinear(g, agLen, ptr, what);
        if (n.fork.seen.has(child)) throw corrupt(`${what}: child pointer ${ptr} is referenced twice (loop)`);
        n.fork.seen.add(child);
        next.push({ fork: n.fork, block: child, level: level - 1, leftsib: -1, rightsib: -1, lowKey: key });
      }
    }
    link(next);
    frontier = next;
  }
  return blocksRead;
}
