// btrfs used-block map, read straight from one device: the superblock (its checksum), the system
// chunks in sys_chunk_array, the chunk tree (logical -> physical, every stripe), the root tree, and
// the extent tree (EXTENT_ITEM, METADATA_ITEM; BLOCK_GROUP_ITEM checked against the chunks). Every
// allocated extent is mapped to every copy (DUP keeps metadata twice on one device); the
// superblock and its mirrors (64 KiB, 64 MiB, 256 GiB) and the boot area before the first are kept.
// A log tree (fsync'ed changes not yet committed) is walked too: its blocks and the data extents it
// references are kept. Every tree block is checked (checksum, fsid, bytenr, level, generation).
import { createHash } from 'node:crypto';
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import { CorruptFileSystemError, type FileSystemReader, type UsedBlockMap } from './used-map';
import { crc32c } from './xfs-btree';

const SUPER_OFFSET = 0x10000;
const SUPER_SIZE = 4096;
const MIRRORS = [0x10000, 64 << 20, 256 * 2 ** 30];
const MAGIC = '_BHRfS_M';
const HEADER = 101;
const ITEM = 25;
const KEY_PTR = 33;
const MAX_LEVEL = 8;
const BATCH = 256;

const KEY = { ROOT_ITEM: 132, EXTENT_DATA: 108, EXTENT_ITEM: 168, METADATA_ITEM: 169, BLOCK_GROUP_ITEM: 192, CHUNK_ITEM: 228 } as const;
const OBJ = { EXTENT_TREE: 2n, BLOCK_GROUP_TREE: 11n, TREE_LOG: 0xfffffffffffffffan } as const;

const BG_DATA = 1, BG_SYSTEM = 2, BG_METADATA = 4, BG_DUP = 32;

// Feature bits whose meaning for the on-disk layout this reader knows.
const INCOMPAT = { METADATA_UUID: 1024, ZONED: 4096 };
const COMPAT_RO_KNOWN = 0xf; // FREE_SPACE_TREE, _VALID, VERITY, BLOCK_GROUP_TREE
const COMPAT_RO_BLOCK_GROUP_TREE = 8;

function corrupt(message: string): CorruptFileSystemError {
  return new CorruptFileSystemError('btrfs', message);
}

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} ${v} is out of range`);
  return Number(v);
}

/** Bits of a flags word given as a JS number (< 2^53), without 32-bit operators. */
const hasBit = (flags: number, bit: number) => Math.floor(flags / bit) % 2 === 1;

export interface BtrfsSuper {
  fsid: Buffer;
  metaUuid: Buffer;
  generation: number;
  root: number;
  rootLevel: number;
  chunkRoot: number;
  chunkRootLevel: number;
  logRoot: number;
  logRootLevel: number;
  totalBytes: number;
  bytesUsed: number;
  numDevices: number;
  sectorSize: number;
  nodeSize: number;
  csumType: number;
  compatRo: number;
  incompat: number;
  devid: number;
  devTotalBytes: number;
  sysChunks: Buffer;
}

function checksum(csumType: number, buf: Buffer, start: number, end: number): Buffer {
  if (csumType === 0) {
    const out = Buffer.alloc(4);
    out.writeUInt32LE(crc32c(buf.subarray(start, end)));
    return out;
  }
  return createHash('sha256').update(buf.subarray(start, end)).digest();
}

const csumLen = (t: number) => (t === 0 ? 4 : 32);

export function parseBtrfsSuper(b: Buffer, deviceSize: number): BtrfsSuper {
  if (b.toString('latin1', 0x40, 0x48) !== MAGIC) throw corrupt('no btrfs magic in the superblock');
  const csumType = b.readUInt16LE(0xc4);
  if (csumType !== 0 && csumType !== 2) throw corrupt(`checksum type ${csumType} (${['crc32c', 'xxhash64', 'sha256', 'blake2b'][csumType] ?? 'unknown'}) is not supported by this reader`);
  const want = checksum(csumType, b, 0x20, SUPER_SIZE);
  if (!b.subarray(0, csumLen(csumType)).equals(want)) throw corrupt('superblock checksum mismatch');
  if (u64(b, 0x30, 'superblock bytenr') !== SUPER_OFFSET) throw corrupt('the superblock at 64 KiB says it belongs elsewhere');
  const sb: BtrfsSuper = {
    fsid: Buffer.from(b.subarray(0x20, 0x30)),
    metaUuid: Buffer.from(b.subarray(0x20, 0x30)),
    generation: u64(b, 0x48, 'generation'),
    root: u64(b, 0x50, 'root tree address'),
    chunkRoot: u64(b, 0x58, 'chunk tree address'),
    logRoot: u64(b, 0x60, 'log tree address'),
    totalBytes: u64(b, 0x70, 'total bytes'),
    bytesUsed: u64(b, 0x78, 'bytes used'),
    numDevices: u64(b, 0x88, 'number of devices'),
    sectorSize: b.readUInt32LE(0x90),
    nodeSize: b.readUInt32LE(0x94),
    compatRo: u64(b, 0xb4, 'compat_ro flags'),
    incompat: u64(b, 0xbc, 'incompat flags'),
    csumType,
    rootLevel: b[0xc6]!,
    chunkRootLevel: b[0xc7]!,
    logRootLevel: b[0xc8]!,
    devid: u64(b, 0xc9, 'device id'),
    devTotalBytes: u64(b, 0xc9 + 8, 'device size'),
    sysChunks: Buffer.alloc(0),
  };
  const sysSize = b.readUInt32LE(0xa0);
  if (sysSize > 2048) throw corrupt(`sys_chunk_array size ${sysSize} is larger than its 2048 bytes`);
  sb.sysChunks = Buffer.from(b.subarray(0x32b, 0x32b + sysSize));
  const pow2 = (n: number) => n > 0 && Number.isInteger(Math.log2(n));
  if (!pow2(sb.sectorSize) || sb.sectorSize < 4096 || sb.sectorSize > 65536) throw corrupt(`sector size ${sb.sectorSize} is impossible`);
  if (!pow2(sb.nodeSize) || sb.nodeSize < sb.sectorSize || sb.nodeSize > 65536) throw corrupt(`node size ${sb.nodeSize} is impossible`);
  if (hasBit(sb.incompat, INCOMPAT.METADATA_UUID)) sb.metaUuid = Buffer.from(b.subarray(0x23b, 0x24b));
  for (const [what, v] of [['root tree', sb.rootLevel], ['chunk tree', sb.chunkRootLevel], ['log tree', sb.logRootLevel]] as const) {
    if (v > MAX_LEVEL) throw corrupt(`${what} level ${v} is impossible`);
  }
  if (sb.devTotalBytes > deviceSize) throw corrupt(`the file system's device is ${sb.devTotalBytes} bytes, larger than this one (${deviceSize}): truncated`);
  if (sb.devTotalBytes < 1 << 20) throw corrupt(`device size ${sb.devTotalBytes} in the superblock is impossible`);
  return sb;
}

interface Chunk {
  logical: number;
  length: number;
  type: number;
  /** Physical offsets of every copy (one per stripe) on this device. */
  physical: number[];
}

/** Parses one CHUNK_ITEM; `at` is its offset in `b`; returns the chunk and its byte length. */
function parseChunk(b: Buffer, at: number, end: number, logical: number, sb: BtrfsSuper, where: string): { chunk: Chunk; size: number } {
  if (at + 48 + 32 > end) throw corrupt(`${where}: chunk item runs past its end`);
  const length = u64(b, at, `${where}: chunk length`);
  const type = u64(b, at + 24, `${where}: chunk type`);
  const numStripes = b.readUInt16LE(at + 44);
  const size = 48 + numStripes * 32;
  if (numStripes < 1 || at + size > end) throw corrupt(`${where}: chunk at logical ${logical} has ${numStripes} stripes that do not fit its item`);
  if (length === 0 || length % sb.sectorSize !== 0) throw corrupt(`${where}: chunk at logical ${logical} has length ${length}`);
  if (logical % sb.sectorSize !== 0) throw corrupt(`${where}: chunk at logical ${logical} is not sector-aligned`);
  // Bits 0..2: what the chunk holds; 3..10: its profile; nothing else is ever written.
  const kind = type % 8;
  const profile = Math.floor(type / 8) % 256;
  if (![BG_DATA, BG_SYSTEM, BG_METADATA, BG_DATA + BG_METADATA].includes(kind) || Math.floor(type / 2048) !== 0) {
    throw corrupt(`${where}: chunk at logical ${logical} has type 0x${type.toString(16)}`);
  }
  const dup = profile === BG_DUP / 8;
  if (profile !== 0 && !dup) throw corrupt(`${where}: chunk at logical ${logical} uses profile 0x${type.toString(16)}, which needs more than one device`);
  if ((dup && numStripes !== 2) || (!dup && numStripes !== 1)) throw corrupt(`${where}: chunk at logical ${logical} has ${numStripes} stripes for its profile`);
  const physical: number[] = [];
  for (let i = 0; i < numStripes; i++) {
    const s = at + 48 + i * 32;
    const devid = u64(b, s, `${where}: stripe device id`);
    const off = u64(b, s + 8, `${where}: stripe offset`);
    if (devid !== sb.devid) throw corrupt(`${where}: chunk at logical ${logical} lives on device ${devid}, not on this one (${sb.devid})`);
    if (off + length > sb.devTotalBytes) throw corrupt(`${where}: chunk at logical ${logical} (stripe at ${off}, ${length} bytes) runs past the end of the device (${sb.devTotalBytes})`);
    if (off < 1 << 20) throw corrupt(`${where}: chunk at logical ${logical} is placed in the first MiB (byte ${off})`);
    physical.push(off);
  }
  return { chunk: { logical, length, type, physical }, size };
}

/** The chunk map: logical -> physical for every copy. Lookups by binary search. */
class ChunkMap {
  private chunks: Chunk[] = [];

  add(c: Chunk): void {
    const i = this.indexOf(c.logical);
    const at = i >= 0 ? this.chunks[i] : undefined;
    if (at && at.logical === c.logical) {
      if (at.length !== c.length || at.physical.join() !== c.physical.join()) throw corrupt(`two different chunks at logical ${c.logical}`);
      return;
    }
    this.chunks.push(c);
    this.chunks.sort((a, b) => a.logical - b.logical);
    for (let k = 1; k < this.chunks.length; k++) {
      const p = this.chunks[k - 1]!, q = this.chunks[k]!;
      if (q.logical < p.logical + p.length) throw corrupt(`chunks at logical ${p.logical} and ${q.logical} overlap`);
    }
  }

  /** Index of the last chunk starting at or before `logical`, or -1. */
  private indexOf(logical: number): number {
    let lo = 0, hi = this.chunks.length - 1, ans = -1;
    while (lo <= hi) {
      const mid = Math.floor((lo + hi) / 2);
      if (this.chunks[mid]!.logical <= logical) { ans = mid; lo = mid + 1; } else hi = mid - 1;
    }
    return ans;
  }

  find(logical: number, length: number): Chunk | undefined {
    const c = this.chunks[this.indexOf(logical)];
    return c && logical + length <= c.logical + c.length ? c : undefined;
  }

  /** Physical ranges of every copy of logical [start, start+length). */
  copies(start: number, length: number, what: string): Array<[number, number]> {
    const c = this.find(start, length);
    if (!c) throw corrupt(`${what} at logical ${start} (${length} bytes) lies in no chunk`);
    return c.physical.map((p) => [p + (start - c.logical), p + (start - c.logical) + length]);
  }

  all(): readonly Chunk[] {
    return this.chunks;
  }

  checkPhysical(): void {
    const ranges = this.chunks.flatMap((c) => c.physical.map((p) => [p, p + c.length, c.logical] as const)).sort((a, b) => a[0] - b[0]);
    for (let k = 1; k < ranges.length; k++) {
      if (ranges[k]![0] < ranges[k - 1]![1]) throw corrupt(`chunks at logical ${ranges[k - 1]![2]} and ${ranges[k]![2]} share physical bytes at ${ranges[k]![0]}`);
    }
  }
}

interface Item {
  objectid: bigint;
  type: number;
  offset: bigint;
  data: Buffer;
}

interface PendingNode {
  logical: number;
  level: number;
  generation?: number;
  /** Key range the node's keys must fall in. */
  low?: [bigint, number, bigint];
  owner: string;
}

const cmpKey = (a: [bigint, number, bigint], b: [bigint, number, bigint]) =>
  a[0] !== b[0] ? (a[0] < b[0] ? -1 : 1) : a[1] !== b[1] ? a[1] - b[1] : a[2] === b[2] ? 0 : a[2] < b[2] ? -1 : 1;

class TreeReader {
  /** Logical addresses of every tree block read (they are all kept). */
  readonly blocks = new Set<number>();

  constructor(private readonly reader: BlockReader, private readonly sb: BtrfsSuper, private readonly chunks: ChunkMap) {}

  /** Reads one tree block from its first good copy and checks its header. */
  private check(buf: Buffer, n: PendingNode): string | undefined {
    const sb = this.sb;
    const want = checksum(sb.csumType, buf, 0x20, sb.nodeSize);
    if (!buf.subarray(0, csumLen(sb.csumType)).equals(want)) return 'checksum mismatch';
    if (!buf.subarray(0x20, 0x30).equals(sb.metaUuid)) return 'fsid does not match the superblock';
    if (buf.readBigUInt64LE(0x30) !== BigInt(n.logical)) return `bytenr ${buf.readBigUInt64LE(0x30)} does not match (misplaced write)`;
    if (buf[0x64] !== n.level) return `level ${buf[0x64]}, expected ${n.level}`;
    const gen = buf.readBigUInt64LE(0x50);
    if (n.generation !== undefined && gen !== BigInt(n.generation)) return `generation ${gen}, its parent expects ${n.generation}`;
    if (gen > BigInt(sb.generation) + 1n) return `generation ${gen} is newer than the superblock's ${sb.generation}`;
    return undefined;
  }

  /** Walks a whole tree breadth-first, one batched read per level; calls `leaf` for every item. */
  async walk(root: number, level: number, owner: string, leaf: (it: Item) => void): Promise<void> {
    let frontier: PendingNode[] = [{ logical: root, level, owner }];
    const ns = this.sb.nodeSize;
    while (frontier.length) {
      const next: PendingNode[] = [];
      for (let i = 0; i < frontier.length; i += BATCH) {
        const part = frontier.slice(i, i + BATCH);
        for (const n of part) {
          if (this.blocks.has(n.logical)) throw corrupt(`${n.owner}: tree block at logical ${n.logical} is referenced twice (loop)`);
          this.blocks.add(n.logical);
        }
        const copies = part.map((n) => this.chunks.copies(n.logical, ns, `${n.owner}: tree block`));
        const bufs = await this.reader.readMany(part.map((_, k) => ({ offset: copies[k]![0]![0], length: ns })));
        for (let k = 0; k < part.length; k++) {
          const n = part[k]!;
          let buf = bufs[k]!;
          let why = this.check(buf, n);
          // A damaged first copy: the DUP mirror.
          for (let m = 1; why && m < copies[k]!.length; m++) {
            const alt = await this.reader.read(copies[k]![m]![0], ns);
            if (!this.check(alt, n)) { buf = alt; why = undefined; }
          }
          if (why) throw corrupt(`${n.owner}: tree block at logical ${n.logical}: ${why}`);
          this.parse(buf, n, leaf, next);
        }
      }
      frontier = next;
    }
  }

  private parse(b: Buffer, n: PendingNode, leaf: (it: Item) => void, next: PendingNode[]): void {
    const ns = this.sb.nodeSize;
    const nritems = b.readUInt32LE(0x60);
    const where = `${n.owner}: tree block at logical ${n.logical}`;
    let prev: [bigint, number, bigint] | undefined;
    const key = (at: number): [bigint, number, bigint] => [b.readBigUInt64LE(at), b[at + 8]!, b.readBigUInt64LE(at + 9)];
    const ordered = (k: [bigint, number, bigint]) => {
      if (prev && cmpKey(prev, k) >= 0) throw corrupt(`${where}: keys out of order`);
      if (!prev && n.low && cmpKey(k, n.low) < 0) throw corrupt(`${where}: first key is below its parent's key`);
      prev = k;
    };
    if (n.level === 0) {
      if (nritems > Math.floor((ns - HEADER) / ITEM)) throw corrupt(`${where}: ${nritems} items cannot fit`);
      let dataFloor = ns - HEADER;
      for (let i = 0; i < nritems; i++) {
        const at = HEADER + i * ITEM;
        const k = key(at);
        ordered(k);
        const off = b.readUInt32LE(at + 17);
        const size = b.readUInt32LE(at + 21);
        if (off + size > dataFloor || HEADER + off < HEADER + nritems * ITEM) throw corrupt(`${where}: item ${i} data (${size} bytes at ${off}) overlaps other items or runs past the block`);
        dataFloor = off;
        leaf({ objectid: k[0], type: k[1], offset: k[2], data: b.subarray(HEADER + off, HEADER + off + size) });
      }
    } else {
      if (nritems < 1 || nritems > Math.floor((ns - HEADER) / KEY_PTR)) throw corrupt(`${where}: ${nritems} pointers is impossible`);
      for (let i = 0; i < nritems; i++) {
        const at = HEADER + i * KEY_PTR;
        const k = key(at);
        ordered(k);
        next.push({ logical: u64(b, at + 17, `${where}: child pointer`), generation: u64(b, at + 25, `${where}: child generation`), level: n.level - 1, low: k, owner: n.owner });
      }
    }
  }
}

/** Items of the sys_chunk_array: (key, chunk) pairs. */
function sysChunks(sb: BtrfsSuper, map: ChunkMap): void {
  const b = sb.sysChunks;
  let p = 0;
  while (p < b.length) {
    if (p + 17 > b.length) throw corrupt('sys_chunk_array ends inside a key');
    const type = b[p + 8]!;
    const logical = u64(b, p + 9, 'system chunk address');
    if (type !== KEY.CHUNK_ITEM) throw corrupt(`sys_chunk_array holds key type ${type}, not a chunk`);
    p += 17;
    const { chunk, size } = parseChunk(b, p, b.length, logical, sb, 'sys_chunk_array');
    if (!hasBit(chunk.type, BG_SYSTEM)) throw corrupt(`sys_chunk_array holds a non-system chunk at logical ${logical}`);
    map.add(chunk);
    p += size;
  }
  if (map.all().length === 0) throw corrupt('sys_chunk_array holds no chunk');
}

export interface BtrfsUsage {
  sb: BtrfsSuper;
  /** Physical byte ranges to keep, unsorted. */
  ranges: Array<[number, number]>;
  notes: string[];
  /** Logical bytes the extent tree accounts for (data + one copy of metadata). */
  extentBytes: number;
  chunks: number;
  treeBlocks: number;
}

export async function readBtrfsUsage(reader: BlockReader): Promise<BtrfsUsage> {
  if (reader.size < SUPER_OFFSET + SUPER_SIZE) throw corrupt(`the device (${reader.size} bytes) is too small for btrfs`);
  const sb = parseBtrfsSuper(await reader.read(SUPER_OFFSET, SUPER_SIZE), reader.size);
  const notes: string[] = [];
  if (sb.numDevices !== 1) throw corrupt(`the file system spans ${sb.numDevices} devices; only one of them is here`);
  // Incompat bits 0..11 (mixed backrefs .. raid1c34) keep the layout read here; zoned (12), extent
  // tree v2 (13) and anything newer do not.
  if (sb.incompat >= INCOMPAT.ZONED) throw corrupt(`incompatible features 0x${sb.incompat.toString(16)} (zoned, extent tree v2 or newer) are not supported by this reader`);
  if (sb.compatRo > COMPAT_RO_KNOWN) throw corrupt(`unknown read-only-compatible features 0x${sb.compatRo.toString(16)}`);
  const chunks = new ChunkMap();
  sysChunks(sb, chunks);
  const trees = new TreeReader(reader, sb, chunks);
  // The chunk tree: every chunk (system chunks again, checked against sys_chunk_array).
  await trees.walk(sb.chunkRoot, sb.chunkRootLevel, 'chunk tree', (it) => {
    if (it.type !== KEY.CHUNK_ITEM) return;
    if (it.offset > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`chunk tree: chunk address ${it.offset} is out of range`);
    const { chunk } = parseChunk(it.data, 0, it.data.length, Number(it.offset), sb, 'chunk tree');
    chunks.add(chunk);
  });
  chunks.checkPhysical();
  // The root tree: where the extent tree (and the block group tree) are.
  let extentRoot: { bytenr: number; level: number } | undefined;
  let bgRoot: { bytenr: number; level: number } | undefined;
  await trees.walk(sb.root, sb.rootLevel, 'root tree', (it) => {
    if (it.type !== KEY.ROOT_ITEM || it.data.length < 239) return;
    const r = { bytenr: u64(it.data, 176, 'root tree: root address'), level: it.data[238]! };
    if (r.level > MAX_LEVEL) throw corrupt(`root tree: tree ${it.objectid} has level ${r.level}`);
    if (it.objectid === OBJ.EXTENT_TREE) extentRoot = r;
    if (it.objectid === OBJ.BLOCK_GROUP_TREE) bgRoot = r;
  });
  if (!extentRoot) throw corrupt('the root tree has no extent tree');
  const ranges: Array<[number, number]> = [];
  const keep = (logical: number, length: number, what: string) => {
    for (const r of chunks.copies(logical, length, what)) ranges.push(r);
  };
  let extentBytes = 0;
  const groups = new Map<number, number>();
  const onExtentItem = (it: Item) => {
    if (it.type === KEY.EXTENT_ITEM || it.type === KEY.METADATA_ITEM) {
      if (it.objectid > BigInt(Number.MAX_SAFE_INTEGER) || it.offset > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`extent tree: key (${it.objectid}, ${it.type}, ${it.offset}) is out of range`);
      const start = Number(it.objectid);
      const length = it.type === KEY.METADATA_ITEM ? sb.nodeSize : Number(it.offset);
      if (length === 0 || start % sb.sectorSize !== 0 || length % sb.sectorSize !== 0) throw corrupt(`extent tree: extent ${start} of ${length} bytes is not sector-aligned`);
      keep(start, length, 'extent');
      extentBytes += length;
    } else if (it.type === KEY.BLOCK_GROUP_ITEM) {
      if (it.objectid > BigInt(Number.MAX_SAFE_INTEGER) || it.offset > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt('block group key out of range');
      groups.set(Number(it.objectid), Number(it.offset));
    }
  };
  await trees.walk(extentRoot.bytenr, extentRoot.level, 'extent tree', onExtentItem);
  if (hasBit(sb.compatRo, COMPAT_RO_BLOCK_GROUP_TREE)) {
    if (!bgRoot) throw corrupt('the block group tree feature is on but the root tree has no block group tree');
    await trees.walk(bgRoot.bytenr, bgRoot.level, 'block group tree', onExtentItem);
  }
  // Every chunk has its block group, and nothing else has one.
  for (const c of chunks.all()) {
    const len = groups.get(c.logical);
    if (len !== c.length) throw corrupt(`the chunk at logical ${c.logical} (${c.length} bytes) has ${len === undefined ? 'no block group' : `a block group of ${len} bytes`}`);
  }
  if (groups.size !== chunks.all().length) throw corrupt(`${groups.size} block groups for ${chunks.all().length} chunks`);

  // Fsync'ed changes not yet committed: the log tree, its log trees, and the data they reference.
  if (sb.logRoot !== 0) {
    const logs: Array<{ bytenr: number; level: number; root: bigint }> = [];
    const dataExtents: Array<[number, number]> = [];
    await trees.walk(sb.logRoot, sb.logRootLevel, 'log root tree', (it) => {
      if (it.type === KEY.ROOT_ITEM && it.objectid === OBJ.TREE_LOG && it.data.length >= 239) {
        logs.push({ bytenr: u64(it.data, 176, 'log root tree: root address'), level: it.data[238]!, root: it.offset });
      }
    });
    for (const l of logs) {
      if (l.level > MAX_LEVEL) throw corrupt(`log tree of subvolume ${l.root} has level ${l.level}`);
      await trees.walk(l.bytenr, l.level, `log tree of subvolume ${l.root}`, (it) => {
        if (it.type !== KEY.EXTENT_DATA || it.data.length < 53) return;
        const type = it.data[20]!;
        if (type !== 1 && type !== 2) return;
        const at = u64(it.data, 21, 'log tree: data extent address');
        const len = u64(it.data, 29, 'log tree: data extent length');
        if (at !== 0 && len > 0) dataExtents.push([at, len]);
      });
    }
    for (const [at, len] of dataExtents) keep(at, len, 'data extent named in the log tree');
    notes.push(`log tree present (fsync'ed changes not yet committed, replayed at the next mount): its ${logs.length} log tree${logs.length === 1 ? '' : 's'} and the ${dataExtents.length} data extents they name are kept`);
  }
  for (const logical of trees.blocks) keep(logical, sb.nodeSize, 'tree block');
  return { sb, ranges, notes, extentBytes, chunks: chunks.all().length, treeBlocks: trees.blocks.size };
}

export const btrfsReader: FileSystemReader = {
  kind: 'btrfs',

  async probe(reader: BlockReader): Promise<boolean> {
    if (reader.size < SUPER_OFFSET + SUPER_SIZE) return false;
    return (await reader.read(SUPER_OFFSET + 0x40, 8)).toString('latin1') === MAGIC;
  },

  async read(reader: BlockReader): Promise<UsedBlockMap> {
    const u = await readBtrfsUsage(reader);
    const bs = u.sb.sectorSize;
    const totalBlocks = Math.ceil(reader.size / bs);
    const bitmap = new Bitset(totalBlocks);
    const mark = (a: number, b: number) => bitmap.setRange(Math.floor(a / bs), Math.ceil(Math.min(b, reader.size) / bs));
    // The boot area before the superblock, the superblock and its mirrors that fit.
    mark(0, SUPER_OFFSET + SUPER_SIZE);
    for (const m of MIRRORS) if (m + SUPER_SIZE <= u.sb.devTotalBytes) mark(m, m + SUPER_SIZE);
    for (const [a, b] of u.ranges) mark(a, b);
    // Past the file system's end of the device.
    mark(u.sb.devTotalBytes, reader.size);
    const notes = [`btrfs, ${bs}-byte sectors, ${u.sb.nodeSize}-byte nodes, ${u.chunks} chunks, ${u.treeBlocks} tree blocks read`, ...u.notes];
    if (u.extentBytes !== u.sb.bytesUsed) notes.push(`the extent tree accounts for ${u.extentBytes} bytes, the superblock says ${u.sb.bytesUsed}`);
    if (u.sb.devTotalBytes < reader.size) notes.push(`the device is ${reader.size - u.sb.devTotalBytes} bytes larger than the file system: the tail is copied`);
    return { filesystem: 'btrfs', blockSize: bs, totalBlocks, usedBlocks: bitmap.count(), bitmap, notes, allBlocks: false };
  },
};
