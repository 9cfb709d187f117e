// On-disk layout of ext2/3/4 (superblock, group descriptors, inodes) and the two checksums the
// format uses: crc32c (metadata_csum, jbd2 csum v2/v3) and crc16 (gdt_csum / uninit_bg).
// Offsets follow the kernel's fs/ext4/ext4.h; everything on disk is little-endian.

export const SUPERBLOCK_OFFSET = 1024;
export const SUPERBLOCK_SIZE = 1024;
export const EXT_MAGIC = 0xef53;

export const COMPAT = {
  HAS_JOURNAL: 0x4,
  RESIZE_INODE: 0x10,
  SPARSE_SUPER2: 0x200,
  FAST_COMMIT: 0x400,
} as const;

export const INCOMPAT = {
  COMPRESSION: 0x1,
  FILETYPE: 0x2,
  RECOVER: 0x4,
  JOURNAL_DEV: 0x8,
  META_BG: 0x10,
  EXTENTS: 0x40,
  BIT64: 0x80,
  MMP: 0x100,
  FLEX_BG: 0x200,
  EA_INODE: 0x400,
  DIRDATA: 0x1000,
  CSUM_SEED: 0x2000,
  LARGEDIR: 0x4000,
  INLINE_DATA: 0x8000,
  ENCRYPT: 0x10000,
  CASEFOLD: 0x20000,
} as const;
/** Incompatible features whose layout this reader understands (any other one: copy every block). */
export const INCOMPAT_KNOWN = 0x2 | 0x4 | 0x8 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000;

export const RO_COMPAT = {
  SPARSE_SUPER: 0x1,
  LARGE_FILE: 0x2,
  BTREE_DIR: 0x4,
  HUGE_FILE: 0x8,
  GDT_CSUM: 0x10,
  DIR_NLINK: 0x20,
  EXTRA_ISIZE: 0x40,
  QUOTA: 0x100,
  BIGALLOC: 0x200,
  METADATA_CSUM: 0x400,
} as const;

/** Features only ext4 has: any of them makes the file system "ext4". */
export const EXT4_ONLY_INCOMPAT = INCOMPAT.EXTENTS | INCOMPAT.BIT64 | INCOMPAT.FLEX_BG | INCOMPAT.MMP | INCOMPAT.EA_INODE
  | INCOMPAT.CSUM_SEED | INCOMPAT.LARGEDIR | INCOMPAT.INLINE_DATA | INCOMPAT.ENCRYPT | INCOMPAT.CASEFOLD;
export const EXT4_ONLY_RO_COMPAT = RO_COMPAT.HUGE_FILE | RO_COMPAT.GDT_CSUM | RO_COMPAT.DIR_NLINK | RO_COMPAT.EXTRA_ISIZE
  | RO_COMPAT.BIGALLOC | RO_COMPAT.METADATA_CSUM;

/** bg_flags */
export const BG_INODE_UNINIT = 0x1;
export const BG_BLOCK_UNINIT = 0x2;

/** Superblock field offsets (relative to the superblock, i.e. byte 1024 of the device). */
export const SB = {
  inodesCount: 0x0,
  blocksCountLo: 0x4,
  firstDataBlock: 0x14,
  logBlockSize: 0x18,
  logClusterSize: 0x1c,
  blocksPerGroup: 0x20,
  clustersPerGroup: 0x24,
  inodesPerGroup: 0x28,
  mtime: 0x2c,
  magic: 0x38,
  revLevel: 0x4c,
  inodeSize: 0x58,
  featureCompat: 0x5c,
  featureIncompat: 0x60,
  featureRoCompat: 0x64,
  uuid: 0x68,
  reservedGdtBlocks: 0xce,
  journalInum: 0xe0,
  journalDev: 0xe4,
  descSize: 0xfe,
  firstMetaBg: 0x104,
  blocksCountHi: 0x150,
  logGroupsPerFlex: 0x174,
  checksumType: 0x175,
  backupBgs: 0x24c,
  checksumSeed: 0x270,
  checksum: 0x3fc,
} as const;

/** Group descriptor field offsets; the _hi halves exist only when the descriptor is >= 64 bytes. */
export const GD = {
  blockBitmapLo: 0x0,
  inodeBitmapLo: 0x4,
  inodeTableLo: 0x8,
  freeBlocksLo: 0xc,
  flags: 0x12,
  blockBitmapCsumLo: 0x18,
  itableUnusedLo: 0x1c,
  checksum: 0x1e,
  blockBitmapHi: 0x20,
  inodeBitmapHi: 0x24,
  inodeTableHi: 0x28,
  itableUnusedHi: 0x32,
  blockBitmapCsumHi: 0x38,
} as const;

/** Inode field offsets. */
export const INODE = {
  mode: 0x0,
  sizeLo: 0x4,
  flags: 0x20,
  block: 0x28,
  sizeHigh: 0x6c,
} as const;
export const INODE_EXTENTS_FL = 0x80000;
export const INODE_INLINE_DATA_FL = 0x10000000;
export const EXTENT_MAGIC = 0xf30a;

export interface RawSuperblock {
  inodesCount: number;
  blocksCount: number;
  firstDataBlock: number;
  logBlockSize: number;
  logClusterSize: number;
  blocksPerGroup: number;
  clustersPerGroup: number;
  inodesPerGroup: number;
  magic: number;
  revLevel: number;
  inodeSize: number;
  compat: number;
  incompat: number;
  roCompat: number;
  uuid: Buffer;
  reservedGdtBlocks: number;
  journalInum: number;
  journalDev: number;
  descSize: number;
  firstMetaBg: number;
  checksumType: number;
  backupBgs: [number, number];
  checksumSeed: number;
  checksum: number;
}

const TWO32 = 0x100000000;

/** Decodes the fields this reader uses; no validation. `b` is the 1024-byte superblock. */
export function parseSuperblock(b: Buffer): RawSuperblock {
  const incompat = b.readUInt32LE(SB.featureIncompat);
  const is64 = (incompat & INCOMPAT.BIT64) !== 0;
  return {
    inodesCount: b.readUInt32LE(SB.inodesCount),
    blocksCount: b.readUInt32LE(SB.blocksCountLo) + (is64 ? b.readUInt32LE(SB.blocksCountHi) * TWO32 : 0),
    firstDataBlock: b.readUInt32LE(SB.firstDataBlock),
    logBlockSize: b.readUInt32LE(SB.logBlockSize),
    logClusterSize: b.readUInt32LE(SB.logClusterSize),
    blocksPerGroup: b.readUInt32LE(SB.blocksPerGroup),
    clustersPerGroup: b.readUInt32LE(SB.clustersPerGroup),
    inodesPerGroup: b.readUInt32LE(SB.inodesPerGroup),
    magic: b.readUInt16LE(SB.magic),
    revLevel: b.readUInt32LE(SB.revLevel),
    inodeSize: b.readUInt16LE(SB.inodeSize),
    compat: b.readUInt32LE(SB.featureCompat),
    incompat,
    roCompat: b.readUInt32LE(SB.featureRoCompat),
    uuid: Buffer.from(b.subarray(SB.uuid, SB.uuid + 16)),
    reservedGdtBlocks: b.readUInt16LE(SB.reservedGdtBlocks),
    journalInum: b.readUInt32LE(SB.journalInum),
    journalDev: b.readUInt32LE(SB.journalDev),
    descSize: b.readUInt16LE(SB.descSize),
    firstMetaBg: b.readUInt32LE(SB.firstMetaBg),
    checksumType: b.readUInt8(SB.checksumType),
    backupBgs: [b.readUInt32LE(SB.backupBgs), b.readUInt32LE(SB.backupBgs + 4)],
    checksumSeed: b.readUInt32LE(SB.checksumSeed),
    checksum: b.readUInt32LE(SB.checksum),
  };
}

// ---- crc32c (Castagnoli, reflected 0x82F63B78), slicing-by-8 --------------------------------
// "Raw" form as the kernel's crc32c(seed, buf, len): no inversion in or out; callers pass ~0 as
// the first seed exactly as ext4 and jbd2 do.

const CRC32C_TABLES: Uint32Array[] = (() => {
  const t: Uint32Array[] = [];
  for (let k = 0; k < 8; k++) t.push(new Uint32Array(256));
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let j = 0; j < 8; j++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[0]![i] = c >>> 0;
  }
  for (let i = 0; i < 256; i++) {
    for (let k = 1; k < 8; k++) t[k]![i] = (t[k - 1]![i]! >>> 8) ^ t[0]![t[k - 1]![i]! & 0xff]!; // 32-bit-ok: crc words
  }
  return t;
})();

export function crc32c(seed: number, buf: Uint8Array, start = 0, end = buf.length): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = CRC32C_TABLES as [Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array];
  let crc = seed >>> 0;
  let i = start;
  for (; i + 8 <= end; i += 8) {
    const a = (buf[i]! | (buf[i + 1]! << 8) | (buf[i + 2]! << 16) | (buf[i + 3]! << 24)) ^ crc;
    crc = t7[a & 0xff]! ^ t6[(a >>> 8) & 0xff]! ^ t5[(a >>> 16) & 0xff]! ^ t4[a >>> 24]!
      ^ t3[buf[i + 4]!]! ^ t2[buf[i + 5]!]! ^ t1[buf[i + 6]!]! ^ t0[buf[i + 7]!]!;
  }
  for (; i < end; i++) crc = t0[(crc ^ buf[i]!) & 0xff]! ^ (crc >>> 8);
  return crc >>> 0;
}

// ---- crc16 (the kernel's lib/crc16.c: poly 0x8005 reflected = 0xA001, no inversion) -----------

const CRC16_TABLE = (() => {
  const t = new Uint16Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let j = 0; j < 8; j++) c = c & 1 ? (c >>> 1) ^ 0xa001 : c >>> 1;
    t[i] = c;
  }
  return t;
})();

export function crc16(seed: number, buf: Uint8Array, start = 0, end = buf.length): number {
  let crc = seed & 0xffff;
  for (let i = start; i < end; i++) crc = (crc >>> 8) ^ CRC16_TABLE[(crc ^ buf[i]!) & 0xff]!;
  return crc;
}

/** ext4's test_root: is `a` a power of `b`? */
function isPowerOf(a: number, b: number): boolean {
  for (;;) {
    if (a < b) return false;
    if (a === b) return true;
    if (a % b !== 0) return false;
    a = a / b;
  }
}

/** ext4_bg_has_super: does group `g` hold a superblock (primary or backup)? */
export function groupHasSuper(sb: RawSuperblock, g: number): boolean {
  if (g === 0) return true;
  if (sb.compat & COMPAT.SPARSE_SUPER2) return g === sb.backupBgs[0] || g === sb.backupBgs[1];
  if (g <= 1 || !(sb.roCompat & RO_COMPAT.SPARSE_SUPER)) return true;
  if (!(g & 1)) return false;
  return isPowerOf(g, 3) || isPowerOf(g, 5) || isPowerOf(g, 7);
}
