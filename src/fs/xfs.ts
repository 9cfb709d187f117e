// XFS used-block map (seed 001, FIG. 13 step 1306), read straight from the device: the superblock,
// every allocation group's AGF, and each AG's by-block-number free-space B+tree (bnobt). Every
// block starts "used"; each free extent in a bnobt is cleared. Anything that does not add up throws
// CorruptFileSystemError, and the caller copies every block instead.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import { CorruptFileSystemError, type FileSystemReader, type UsedBlockMap } from './used-map';
import { checkInternalLog, walkShortBtrees, xfsChecksumOk, type ShortBtreeRoot, type ShortBtreeType, SHORT_BTREE_MAX_LEVELS } from './xfs-btree';

export { crc32c, xfsChecksum, checkInternalLog } from './xfs-btree';

const XFS_SB_MAGIC = 0x58465342; // 'XFSB'
const XFS_AGF_MAGIC = 0x58414746; // 'XAGF'
const XFS_ABTB_MAGIC = 0x41425442; // 'ABTB' v4 bnobt
const XFS_ABTB_CRC_MAGIC = 0x41423342; // 'AB3B' v5 bnobt

const SB_CRC_OFF = 224;
const AGF_CRC_OFF = 216;
const MAX_LEVELS = SHORT_BTREE_MAX_LEVELS;

// sb_features_incompat bits (v5)
const INCOMPAT_FTYPE = 1 << 0;
const INCOMPAT_SPINODES = 1 << 1;
const INCOMPAT_META_UUID = 1 << 2;
const INCOMPAT_BIGTIME = 1 << 3;
const INCOMPAT_NEEDSREPAIR = 1 << 4;
const INCOMPAT_NREXT64 = 1 << 5;
const INCOMPAT_EXCHRANGE = 1 << 6;
const INCOMPAT_PARENT = 1 << 7;
/** Incompat features that do not change the AGF / bnobt layout. */
const INCOMPAT_KNOWN =
  INCOMPAT_FTYPE | INCOMPAT_SPINODES | INCOMPAT_META_UUID | INCOMPAT_BIGTIME | INCOMPAT_NEEDSREPAIR |
  INCOMPAT_NREXT64 | INCOMPAT_EXCHRANGE | INCOMPAT_PARENT;

export function corrupt(message: string): CorruptFileSystemError {
  return new CorruptFileSystemError('xfs', message);
}

export function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0; // 32-bit-ok: only for sizes checked <= 2^16
}

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

function readU64(buf: Buffer, off: number, what: string): number {
  const v = buf.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`superblock ${what} ${v} is out of range`);
  return Number(v);
}

export interface XfsGeometry {
  version: 4 | 5;
  crc: boolean;
  blockSize: number;
  sectSize: number;
  dblocks: number;
  agblocks: number;
  agcount: number;
  agblklog: number;
  logstart: number; // fs block number (agno << agblklog | agbno); 0 = external log
  logblocks: number;
  rblocks: number;
  /** uuid stamped in v5 metadata blocks: sb_meta_uuid with the META_UUID feature, else sb_uuid. */
  metaUuid: Buffer;
  incompat: number;
}

/** Parses and checks the primary superblock (`sb` holds at least the first sector). */
export function parseSuperblock(sb: Buffer, deviceSize: number): XfsGeometry {
  if (sb.length < 512) throw corrupt('device too small for an XFS superblock');
  if (sb.readUInt32BE(0) !== XFS_SB_MAGIC) throw corrupt('superblock magic is not XFSB');
  const versionnum = sb.readUInt16BE(100);
  const v = versionnum & 0xf;
  if (v !== 4 && v !== 5) throw corrupt(`superblock version ${v} is not supported (4 or 5)`);
  const version = v as 4 | 5;
  const crc = version === 5;
  const sectSize = sb.readUInt16BE(102);
  if (!isPow2(sectSize) || sectSize < 512 || sectSize > 32768) {
    throw corrupt(`superblock sector size ${sectSize} is not a power of two between 512 and 32768`);
  }
  if (sb.length < sectSize) throw corrupt('superblock sector was not read whole');
  // v5: the checksum first, so a random bit flip is reported as what it is.
  if (crc && !xfsChecksumOk(sb.subarray(0, sectSize), SB_CRC_OFF)) throw corrupt('superblock CRC mismatch');
  if (sb[121] !== log2(sectSize)) throw corrupt(`superblock sectlog ${sb[121]} does not match sector size ${sectSize}`);
  const blockSize = sb.readUInt32BE(4);
  if (!isPow2(blockSize) || blockSize < 512 || blockSize > 65536) {
    throw corrupt(`superblock block size ${blockSize} is not a power of two between 512 and 65536`);
  }
  if (sb[120] !== log2(blockSize)) throw corrupt(`superblock blocklog ${sb[120]} does not match block size ${blockSize}`);
  if (sectSize > blockSize) throw corrupt(`superblock sector size ${sectSize} is larger than the block size ${blockSize}`);
  if (sb[126] !== 0) throw corrupt('superblock says mkfs did not finish (sb_inprogress set)');
  const dblocks = readU64(sb, 8, 'dblocks');
  const rblocks = readU64(sb, 16, 'rblocks');
  const logstart = readU64(sb, 48, 'logstart');
  const agblocks = sb.readUInt32BE(84);
  const agcount = sb.readUInt32BE(88);
  const logblocks = sb.readUInt32BE(96);
  const agblklog = sb[124]!;
  if (agcount === 0) throw corrupt('superblock agcount is 0');
  if (agblocks < 64 || agblocks > 0x7fffffff) throw corrupt(`superblock agblocks ${agblocks} is out of range`);
  if (agblklog !== Math.ceil(Math.log2(agblocks)) || agblklog > 31) {
    throw corrupt(`superblock agblklog ${agblklog} does not match agblocks ${agblocks}`);
  }
  if (dblocks === 0 || dblocks <= (agcount - 1) * agblocks || dblocks > agcount * agblocks) {
    throw corrupt(`superblock dblocks ${dblocks} does not match ${agcount} AGs of ${agblocks} blocks`);
  }
  const deviceBlocks = Math.floor(deviceSize / blockSize);
  if (dblocks > deviceBlocks) {
    throw corrupt(`file system has ${dblocks} blocks of ${blockSize} bytes but the device holds only ${deviceBlocks}: truncated device`);
  }
  let incompat = 0;
  let metaUuid = sb.subarray(32, 48);
  if (crc) {
    incompat = sb.readUInt32BE(216);
    if (incompat & ~INCOMPAT_KNOWN) {
      throw corrupt(`superblock has unknown incompatible features 0x${(incompat & ~INCOMPAT_KNOWN).toString(16)}`);
    }
    if (incompat & INCOMPAT_NEEDSREPAIR) throw corrupt('superblock says the file system needs xfs_repair (NEEDSREPAIR)');
    if (incompat & INCOMPAT_META_UUID) metaUuid = sb.subarray(248, 264);
  }
  if (logstart !== 0) {
    const agno = Math.floor(logstart / 2 ** agblklog);
    const agbno = logstart % 2 ** agblklog;
    if (agno >= agcount || agbno + logblocks > agblocks) throw corrupt(`internal log at block ${logstart} (${logblocks} blocks) lies outside its AG`);
  }
  return { version, crc, blockSize, sectSize, dblocks, agblocks, agcount, agblklog, logstart, logblocks, rblocks, metaUuid: Buffer.from(metaUuid), incompat };
}

export interface AgInfo {
  agno: number;
  length: number;
  bnoRoot: number;
  bnoLevel: number;
  freeblks: number;
  flcount: number;
  // Read but not checked here (the used map does not use them): xfs-metadata.ts checks them.
  cntRoot: number;
  cntLevel: number;
  rmapRoot: number;
  rmapLevel: number;
  flfirst: number;
  fllast: number;
  refcountRoot: number;
  refcountLevel: number;
}

/** Parses and checks an AGF sector (the fields the used map needs are checked; the rest are read for the metadata map). */
export function parseAgf(buf: Buffer, g: XfsGeometry, agno: number): AgInfo {
  const what = `AGF of AG ${agno}`;
  if (buf.readUInt32BE(0) !== XFS_AGF_MAGIC) throw corrupt(`${what}: magic is not XAGF`);
  if (buf.readUInt32BE(4) !== 1) throw corrupt(`${what}: version ${buf.readUInt32BE(4)} is not 1`);
  if (g.crc) {
    if (!xfsChecksumOk(buf, AGF_CRC_OFF)) throw corrupt(`${what}: CRC mismatch`);
    if (!buf.subarray(64, 80).equals(g.metaUuid)) throw corrupt(`${what}: uuid does not match the superblock`);
  }
  const seqno = buf.readUInt32BE(8);
  if (seqno !== agno) throw corrupt(`${what}: sequence number ${seqno} does not match`);
  const expectLen = agno < g.agcount - 1 ? g.agblocks : g.dblocks - agno * g.agblocks;
  const length = buf.readUInt32BE(12);
  if (length !== expectLen) throw corrupt(`${what}: length ${length} blocks, expected ${expectLen}`);
  const bnoRoot = buf.readUInt32BE(16);
  const bnoLevel = buf.readUInt32BE(28);
  if (bnoLevel < 1 || bnoLevel > MAX_LEVELS) throw corrupt(`${what}: free-space btree height ${bnoLevel} is out of range`);
  if (bnoRoot === 0 || bnoRoot >= length) throw corrupt(`${what}: free-space btree root ${bnoRoot} is past the AG end (${length} blocks)`);
  const flcount = buf.readUInt32BE(48);
  const freeblks = buf.readUInt32BE(52);
  if (freeblks > length) throw corrupt(`${what}: ${freeblks} free blocks in an AG of ${length}`);
  return {
    agno, length, bnoRoot, bnoLevel, freeblks, flcount,
    cntRoot: buf.readUInt32BE(20), cntLevel: buf.readUInt32BE(32), rmapRoot: buf.readUInt32BE(24), rmapLevel: buf.readUInt32BE(36),
    flfirst: buf.readUInt32BE(40), fllast: buf.readUInt32BE(44), refcountRoot: buf.readUInt32BE(88), refcountLevel: buf.readUInt32BE(92),
  };
}

/** The bnobt as walkShortBtrees checks it. */
const BNOBT_V4: ShortBtreeType = { name: 'free-space btree', magic: XFS_ABTB_MAGIC, magicName: 'ABTB', recSize: 8, keySize: 8, sortOffset: 0, uniqueKeys: true };
const BNOBT_V5: ShortBtreeType = { ...BNOBT_V4, magic: XFS_ABTB_CRC_MAGIC, magicName: 'AB3B' };

/** Free extents of every AG, as [linear start, linear end) pairs in ascending order. */
export interface XfsFreeSpace {
  geometry: XfsGeometry;
  /** Per AG: free extents (AG-relative block numbers) from the bnobt, ascending. */
  extents: Array<Array<[number, number]>>;
  agflBlocks: number;
  btreeBlocksRead: number;
}

/** Walks every AG's bnobt breadth-first, one batched read per tree level (all AGs together). */
export async function readFreeSpace(reader: BlockReader, g: XfsGeometry): Promise<XfsFreeSpace> {
  const agfBufs = await reader.readMany(
    Array.from({ length: g.agcount }, (_, agno) => ({ offset: (agno * g.agblocks * g.blockSize) + g.sectSize, length: g.sectSize })),
  );
  const ags = agfBufs.map((b, agno) => parseAgf(b, g, agno));
  const extents: Array<Array<[number, number]>> = ags.map(() => []);
  const roots: ShortBtreeRoot[] = ags.map((ag) => ({
    type: g.crc ? BNOBT_V5 : BNOBT_V4, agno: ag.agno, agLength: ag.length, root: ag.bnoRoot, levels: ag.bnoLevel, keyLimit: ag.length,
  }));
  const blocksRead = await walkShortBtrees(reader, g, roots, (leaf) => {
    const { buf: b, hdr, what } = leaf;
    const out = extents[leaf.tree.agno]!;
    for (let r = 0; r < leaf.numrecs; r++) {
      const start = b.readUInt32BE(hdr + r * 8);
      const count = b.readUInt32BE(hdr + r * 8 + 4);
      if (count === 0) throw corrupt(`${what}: record ${r} has length 0`);
      if (start < leaf.lowKey || start >= leaf.highKey || start + count > leaf.tree.agLength) {
        throw corrupt(`${what}: free extent ${start}+${count} lies outside its key range or past the AG end (${leaf.tree.agLength} blocks)`);
      }
      const prev = out[out.length - 1];
      if (prev && start < prev[1]) throw corrupt(`${what}: free extent ${start}+${count} overlaps or precedes the previous one (records out of order)`);
      if (r === 0 && !leaf.isRoot && start !== leaf.lowKey) throw corrupt(`${what}: first record ${start} does not match its parent key ${leaf.lowKey}`);
      out.push([start, start + count]);
    }
  });
  let agflBlocks = 0;
  for (const ag of ags) {
    let sum = 0;
    for (const [s, e] of extents[ag.agno]!) sum += e - s;
    if (sum !== ag.freeblks) throw corrupt(`AG ${ag.agno}: free-space btree holds ${sum} free blocks but the AGF says ${ag.freeblks}`);
    agflBlocks += ag.flcount;
  }
  return { geometry: g, extents, agflBlocks, btreeBlocksRead: blocksRead };
}

/** The primary superblock's first sector (all of it when the sector is larger than 512 bytes). */
export async function readSuperblock(reader: BlockReader): Promise<Buffer> {
  if (reader.size < 512) throw corrupt(`device of ${reader.size} bytes is too small for XFS`);
  const [head] = await reader.readMany([{ offset: 0, length: 512 }]);
  const sect = head!.readUInt16BE(102);
  if (sect <= 512 || !isPow2(sect) || sect > 32768 || sect > reader.size) return head!;
  const [full] = await reader.readMany([{ offset: 0, length: sect }]);
  return full!;
}

export const xfsReader: FileSystemReader = {
  kind: 'xfs',

  async probe(reader: BlockReader): Promise<boolean> {
    if (reader.size < 512) return false;
    const [b] = await reader.readMany([{ offset: 0, length: 512 }]);
    return b!.readUInt32BE(0) === XFS_SB_MAGIC;
  },

  async read(reader: BlockReader): Promise<UsedBlockMap> {
    const g = parseSuperblock(await readSuperblock(reader), reader.size);
    const totalBlocks = Math.ceil(reader.size / g.blockSize);
    const notes = [`xfs v${g.version}, ${g.blockSize}-byte blocks, ${g.agcount} AG${g.agcount === 1 ? '' : 's'}`];
    if (g.rblocks > 0) notes.push('realtime device: not included (it is a separate device)');
    if (g.logstart === 0) {
      // The log lives elsewhere: its clean/dirty state cannot be read from this device. The free-space
      // btrees are trusted as they are on disk; the user is told.
      notes.push('log on an external device: not included, and whether it needs recovery could not be checked');
    } else {
      const agno = Math.floor(g.logstart / 2 ** g.agblklog);
      const agbno = g.logstart % 2 ** g.agblklog;
      const logOffset = (agno * g.agblocks + agbno) * g.blockSize;
      const state = await checkInternalLog(reader, logOffset, g.logblocks * (g.blockSize / 512));
      if (!state.clean) {
        // Replaying the log may allocate blocks the on-disk btrees still call free: copy everything.
        return {
          filesystem: 'xfs', blockSize: g.blockSize, totalBlocks, usedBlocks: totalBlocks,
          bitmap: new Bitset(totalBlocks, true),
          notes: [...notes, `XFS log needs recovery (${state.reason}): copying every block`],
          allBlocks: true,
        };
      }
      if (state.covered) notes.push('XFS log not unmounted but covered (frozen or idle): only superblock updates to replay, free-space btrees used');
    }
    const free = await readFreeSpace(reader, g);
    const bitmap = new Bitset(totalBlocks, true);
    for (let agno = 0; agno < g.agcount; agno++) {
      const base = agno * g.agblocks;
      for (const [s, e] of free.extents[agno]!) bitmap.clearRange(base + s, base + e);
    }
    // AGFL blocks are not in the bnobt. They hold no file data (they are a reserve for btree
    // growth), so skipping them would be correct, but they are few (at most a handful per AG) and
    // copying them means we never have to trust the AGFL's first/last/count indices: counted as used.
    if (free.agflBlocks > 0) notes.push(`${free.agflBlocks} AG free-list block${free.agflBlocks === 1 ? '' : 's'} copied as used`);
    const usedBlocks = bitmap.count();
    return { filesystem: 'xfs', blockSize: g.blockSize, totalBlocks, usedBlocks, bitmap, notes, allBlocks: false };
  },
};
