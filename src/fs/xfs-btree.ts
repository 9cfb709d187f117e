// XFS on-disk helpers: crc32c (as XFS computes it) and the internal log's clean/dirty check.
// Everything here reads big-endian on-disk structures straight from the device.
import type { BlockReader } from '../device/device';
import { CorruptFileSystemError } from './used-map';

// ---------------------------------------------------------------------------------------------
// crc32c (Castagnoli, reflected polynomial 0x82F63B78), table-driven, slicing by 1.
// XFS (xfs_start_cksum / xfs_end_cksum): crc32c seeded with ~0 over the whole buffer with the
// 4-byte crc field treated as zero, finished with ~crc and stored little-endian.
const CRC32C_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

function crc32cUpdate(crc: number, buf: Uint8Array, start: number, end: number): number {
  let c = crc;
  for (let i = start; i < end; i++) c = CRC32C_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** Plain crc32c of `buf` (standard check value: crc32c("123456789") = 0xe3069283). */
export function crc32c(buf: Uint8Array): number {
  return ~crc32cUpdate(0xffffffff, buf, 0, buf.length) >>> 0;
}

/** The checksum XFS stores at `crcOffset` of `buf` (computed with that field as zero). */
export function xfsChecksum(buf: Uint8Array, crcOffset: number): number {
  let c = crc32cUpdate(0xffffffff, buf, 0, crcOffset);
  c = crc32cUpdate(c, new Uint8Array(4), 0, 4);
  c = crc32cUpdate(c, buf, crcOffset + 4, buf.length);
  return ~c >>> 0;
}

/** True when the little-endian crc stored at `crcOffset` matches the buffer. */
export function xfsChecksumOk(buf: Buffer, crcOffset: number): boolean {
  return buf.readUInt32LE(crcOffset) === xfsChecksum(buf, crcOffset);
}

// ---------------------------------------------------------------------------------------------
// Internal log state.
//
// XFS has no "clean" flag in the superblock: a file system was cleanly unmounted (or frozen, which
// on current kernels also writes an unmount record, see xfs_log_quiesce -> xfs_log_clean) exactly
// when the newest record in its log is an unmount record. This is what the kernel's
// xlog_find_head / xlog_find_tail / xlog_check_unmount_rec establish at mount time; we do the same,
// conservatively: anything unexpected (no record header where one must be, in-flight holes around
// the head, a head record that is not a lone unmount record) counts as "needs recovery", and the
// caller copies every block. A false "dirty" costs a full copy; a false "clean" could lose blocks
// that log replay would reference, so every doubt resolves to "dirty".

const XLOG_HEADER_MAGIC = 0xfeedbabe;
const XLOG_UNMOUNT_TRANS = 0x20;
const XLOG_HEADER_CYCLE_SIZE = 32 * 1024;
/** Blocks the kernel scans around the head for out-of-order in-flight writes: 8 iclogs x 256 KiB. */
const SCAN_BBS = (8 * 256 * 1024) / 512;
/** Samples per round of the k-ary search for the head (one batched read per round). */
const SEARCH_FANOUT = 64;

export interface LogState {
  clean: boolean;
  /** Clean because the log is covered (frozen / idle), not because of an unmount record. */
  covered?: boolean;
  /** Why the log is considered dirty (or facts about a clean one), for the user. */
  reason: string;
}

/** Cycle number of a 512-byte log block: h_cycle for a record header, else the stamped first word. */
function cycleOf(buf: Buffer, off: number): number {
  const w = buf.readUInt32BE(off);
  return w === XLOG_HEADER_MAGIC ? buf.readUInt32BE(off + 4) : w;
}

/**
 * Decides whether the internal log at byte offset `logOffset` (length `logBBs` 512-byte blocks) is
 * clean. Reads: 2 blocks, then at most ~4 batched rounds of SEARCH_FANOUT single blocks, then one
 * window of up to 2 x 2 MiB around the head.
 */
export async function checkInternalLog(reader: BlockReader, logOffset: number, logBBs: number): Promise<LogState> {
  if (!Number.isSafeInteger(logBBs) || logBBs < 2 || logOffset + logBBs * 512 > reader.size) {
    throw new CorruptFileSystemError('xfs', `internal log (${logBBs} sectors at byte ${logOffset}) does not fit on the device`);
  }
  const bb = (i: number) => ({ offset: logOffset + i * 512, length: 512 });
  const [first, last] = await reader.readMany([bb(0), bb(logBBs - 1)]);
  const c0 = cycleOf(first!, 0);
  const cL = cycleOf(last!, 0);
  let head: number;
  if (c0 === cL) {
    // The whole log carries one cycle: the newest record ends at the physical end of the log.
    head = logBBs;
  } else {
    if (cL > c0) return { clean: false, reason: `log cycles out of order (first block ${c0}, last ${cL})` };
    // First block whose cycle is cL: k-ary search, each round one batch.
    let lo = 0; // cycle != cL
    let hi = logBBs - 1; // cycle == cL
    while (hi - lo > 1) {
      const n = Math.min(SEARCH_FANOUT, hi - lo - 1);
      const pts: number[] = [];
      for (let k = 1; k <= n; k++) pts.push(lo + Math.floor(((hi - lo) * k) / (n + 1)));
      const uniq = [...new Set(pts)].filter((p) => p > lo && p < hi);
      const bufs = await reader.readMany(uniq.map(bb));
      let nlo = lo;
      let nhi = hi;
      for (let k = 0; k < uniq.length; k++) {
        if (cycleOf(bufs[k]!, 0) === cL) { nhi = uniq[k]!; break; }
        nlo = uniq[k]!;
      }
      lo = nlo;
      hi = nhi;
    }
    head = hi;
  }
  const C = c0; // the cycle of the newest writes (blocks physically before the head)

  // Window [head - W, head + W) in logical (wrapping) order, read in at most 3 contiguous pieces.
  const W = Math.min(SCAN_BBS, Math.floor(logBBs / 2));
  const startLogical = head - W;
  const pieces: Array<{ from: number; count: number }> = [];
  let pos = startLogical;
  let left = 2 * W;
  while (left > 0) {
    const phys = ((pos % logBBs) + logBBs) % logBBs;
    const count = Math.min(left, logBBs - phys);
    pieces.push({ from: phys, count });
    pos += count;
    left -= count;
  }
  const bufs = await reader.readMany(pieces.map((p) => ({ offset: logOffset + p.from * 512, length: p.count * 512 })));
  const blockAt = (logical: number): { buf: Buffer; off: number } => {
    let rel = logical - startLogical;
    for (let k = 0; k < pieces.length; k++) {
      if (rel < pieces[k]!.count) return { buf: bufs[k]!, off: rel * 512 };
      rel -= pieces[k]!.count;
    }
    throw new Error('log window index out of range');
  };
  const physOf = (logical: number) => ((logical % logBBs) + logBBs) % logBBs;
  for (let l = startLogical; l < head + W; l++) {
    const p = physOf(l);
    const { buf, off } = blockAt(l);
    const cyc = cycleOf(buf, off);
    const before = head === logBBs ? true : p < head;
    if (before ? cyc !== C : cyc === C) {
      return { clean: false, reason: `log block ${p} has cycle ${cyc} next to the head at ${physOf(head)} (cycle ${C}): writes were in flight` };
    }
  }
  // The newest record header: search backwards from the head within the window.
  let rhead = -1;
  for (let l = head - 1; l >= startLogical; l--) {
    const { buf, off } = blockAt(l);
    if (buf.readUInt32BE(off) === XLOG_HEADER_MAGIC) { rhead = l; break; }
  }
  if (rhead < 0) return { clean: false, reason: 'no log record header found before the log head' };
  const h = blockAt(rhead);
  const version = h.buf.readUInt32BE(h.off + 8);
  const len = h.buf.readUInt32BE(h.off + 12);
  const numOps = h.buf.readUInt32BE(h.off + 40);
  const hSize = h.buf.readUInt32BE(h.off + 320);
  const hblks = version & 2 && hSize > XLOG_HEADER_CYCLE_SIZE ? Math.ceil(hSize / XLOG_HEADER_CYCLE_SIZE) : 1;
  const after = rhead + hblks + Math.ceil(len / 512);
  if (after === head && numOps === 1 && rhead + hblks < head) {
    const d = blockAt(rhead + hblks);
    if ((d.buf[d.off + 9]! & XLOG_UNMOUNT_TRANS) !== 0) {
      return { clean: true, reason: `log clean (unmount record at log block ${physOf(rhead)}, cycle ${C})` };
    }
  }
  // Not unmounted: a frozen (or long idle) file system has a *covered* log instead: its tail has
  // caught up with the newest records, which hold only dummy transactions logging the superblock.
  // Replaying them rewrites block 0 alone, which is always copied; every other change is already in
  // place, so the free-space btrees are current. Walk every record from the tail to the head and
  // accept only that; anything else (another item, a continued transaction, a gap) means dirty.
  const tailLsn = h.buf.readBigUInt64BE(h.off + 24);
  const tailBlk = Number(tailLsn & 0xffffffffn);
  let l = -1;
  for (let x = head - 1; x >= startLogical; x--) if (physOf(x) === tailBlk) { l = x; break; }
  if (l < 0) return { clean: false, reason: `the newest log record is not an unmount record and the log tail (block ${tailBlk}) is far behind the head` };
  const txItemsLeft = new Map<number, number>(); // tid -> regions still to skip (-1: expect trans header)
  let little = true;
  while (l < head) {
    const rh = blockAt(l);
    if (rh.buf.readUInt32BE(rh.off) !== XLOG_HEADER_MAGIC) return { clean: false, reason: `no log record header at log block ${physOf(l)} (between tail and head)` };
    const rv = rh.buf.readUInt32BE(rh.off + 8);
    const rlen = rh.buf.readUInt32BE(rh.off + 12);
    const rops = rh.buf.readUInt32BE(rh.off + 40);
    const rsize = rh.buf.readUInt32BE(rh.off + 320);
    const rhb = rv & 2 && rsize > XLOG_HEADER_CYCLE_SIZE ? Math.ceil(rsize / XLOG_HEADER_CYCLE_SIZE) : 1;
    const nbb = Math.ceil(rlen / 512);
    if (rlen === 0 || l + rhb + nbb > head) return { clean: false, reason: `log record at block ${physOf(l)} runs past the head` };
    // Record payload, with each block's first word (overwritten by the cycle stamp) restored.
    const data = Buffer.alloc(nbb * 512);
    for (let j = 0; j < nbb; j++) {
      const src = blockAt(l + rhb + j);
      src.buf.copy(data, j * 512, src.off, src.off + 512);
      const saved = j < 64 ? blockAt(l) : blockAt(l + Math.floor(j / 64));
      const at = j < 64 ? 44 + 4 * j : 4 + 4 * (j % 64);
      if (j >= 64 && Math.floor(j / 64) >= rhb) return { clean: false, reason: 'log record header too short for its length' };
      data.writeUInt32BE(saved.buf.readUInt32BE(saved.off + at), j * 512);
    }
    let p = 0;
    for (let op = 0; op < rops; op++) {
      if (p + 12 > rlen) return { clean: false, reason: 'log record ops run past the record' };
      const tid = data.readUInt32BE(p);
      const olen = data.readUInt32BE(p + 4);
      const flags = data[p + 9]!;
      p += 12;
      if (p + olen > rlen) return { clean: false, reason: 'log op runs past the record' };
      const region = data.subarray(p, p + olen);
      p += olen;
      if (flags & 0x1c) return { clean: false, reason: 'the log holds transactions continued across records' };
      if (flags & (0x01 | 0x02 | XLOG_UNMOUNT_TRANS)) {
        if (flags & 0x01) txItemsLeft.set(tid, -1);
        if (flags & 0x02) txItemsLeft.delete(tid);
        if (olen !== 0 && !(flags & XLOG_UNMOUNT_TRANS)) return { clean: false, reason: 'unexpected log op payload' };
        continue;
      }
      const left = txItemsLeft.get(tid);
      if (left === undefined) return { clean: false, reason: 'log op outside a transaction' };
      if (left === -1) {
        if (olen < 4) return { clean: false, reason: 'short transaction header in the log' };
        if (region.readUInt32LE(0) === 0x5452414e) little = true;
        else if (region.readUInt32BE(0) === 0x5452414e) little = false;
        else return { clean: false, reason: 'bad transaction header in the log' };
        txItemsLeft.set(tid, 0);
        continue;
      }
      if (left > 0) { txItemsLeft.set(tid, left - 1); continue; }
      // First region of a log item: its format structure.
      if (olen < 16) return { clean: false, reason: 'short log item' };
      const type = little ? region.readUInt16LE(0) : region.readUInt16BE(0);
      const nregions = little ? region.readUInt16LE(2) : region.readUInt16BE(2);
      const blkno = little ? region.readBigInt64LE(8) : region.readBigInt64BE(8);
      if (type !== 0x123c || blkno !== 0n || nregions < 1) {
        return { clean: false, reason: `the log holds changes beyond the superblock (item type 0x${type.toString(16)}) to replay` };
      }
      txItemsLeft.set(tid, nregions - 1);
    }
    l += rhb + nbb;
  }
  if (l !== head) return { clean: false, reason: 'log records do not end at the head' };
  return { clean: true, covered: true, reason: 'log covered (frozen or idle): only superblock updates to replay, the free-space btrees are current' };
}

// ---------------------------------------------------------------------------------------------
// Per-AG (short-form) btree walking: the bnobt for the used map; every per-AG btree for the
// metadata map. All trees given are walked together, one batched read per tree level.

/** Upper bound for any per-AG btree height (XFS_BTREE_MAXLEVELS has been 9; these need far fewer). */
export const SHORT_BTREE_MAX_LEVELS = 9;
const NULL_AGBLOCK = 0xffffffff;
/** Bytes per readMany batch, so a wide tree level does not ask for one huge buffer. */
const BATCH_BYTES = 32 * 1024 * 1024;

/** One kind of per-AG btree, as its blocks are checked. */
export interface ShortBtreeType {
  /** For messages: "free-space btree", "inode btree", ... */
  name: string;
  /** Magic of this kind on this file system (v4 or v5) and its name for messages. */
  magic: number;
  magicName: string;
  recSize: number;
  /** Bytes of one key slot in a node (an rmapbt node holds a low and a high key per child). */
  keySize: number;
  /** Where, in a record and in a key, the field the tree sorts by first lies (cntbt: its blockcount). */
  sortOffset: number;
  /** Sort keys have no duplicates (bnobt, inobt, finobt, refcountbt): checked strictly. */
  uniqueKeys: boolean;
}

/** A tree to walk: its kind, AG, root and height. */
export interface ShortBtreeRoot {
  type: ShortBtreeType;
  agno: number;
  /** AG length in blocks: child pointers must lie below it. */
  agLength: number;
  root: number;
  levels: number;
  /** Every sort key of the tree is below this. */
  keyLimit: number;
}

/** A leaf as the walker hands it over: records at buf[hdr + r * recSize]. */
export interface ShortBtreeLeaf {
  tree: ShortBtreeRoot;
  agbno: number;
  buf: Buffer;
  hdr: number;
  numrecs: number;
  isRoot: boolean;
  /** Sort keys of this leaf's records lie in [lowKey, highKey) (or [lowKey, highKey] when highInclusive). */
  lowKey: number;
  highKey: number;
  highInclusive: boolean;
  /** "free-space btree block 12 of AG 1", for messages. */
  what: string;
}

interface PendingShortNode {
  tree: ShortBtreeRoot;
  seen: Set<number>;
  agbno: number;
  level: number;
  lowKey: number;
  highKey: number;
  highInclusive: boolean;
  leftsib: number;
  rightsib: number;
}

/** Reads whole file-system blocks (linear block numbers), in batches of at most BATCH_BYTES. */
export async function readBlocks(reader: BlockReader, blockSize: number, blocks: ReadonlyArray<{ block: number; count: number }>): Promise<Buffer[]> {
  const out: Buffer[] = [];
  let i = 0;
  while (i < blocks.length) {
    let bytes = 0;
    let j = i;
    while (j < blocks.length && (j === i || bytes + blocks[j]!.count * blockSize <= BATCH_BYTES)) bytes += blocks[j++]!.count * blockSize;
    const bufs = await reader.readMany(blocks.slice(i, j).map((b) => ({ offset: b.block * blockSize, length: b.count * blockSize })));
    out.push(...bufs);
    i = j;
  }
  return out;
}

export interface ShortBtreeGeometry {
  crc: boolean;
  blockSize: number;
  agblocks: number;
  metaUuid: Buffer;
}

/**
 * Walks every tree in `roots` breadth-first, all together: one batched read per level. Checks each
 * block's magic, v5 CRC / block stamp / uuid / owner, level, sibling pointers, key order and key
 * ranges, and that no block is referenced twice in a tree (no loops). Leaves go to `onLeaf` (their
 * records are the caller's to check); `onBlock` sees every block read. Returns blocks read.
 */
export async function walkShortBtrees(
  reader: BlockReader,
  g: ShortBtreeGeometry,
  roots: ReadonlyArray<ShortBtreeRoot>,
  onLeaf: (leaf: ShortBtreeLeaf) => void,
  onBlock?: (tree: ShortBtreeRoot, agbno: number) => void,
): Promise<number> {
  const hdr = g.crc ? 56 : 16;
  const sectorsPerBlock = g.blockSize / 512;
  let frontier: PendingShortNode[] = roots.map((tree) => ({
    tree, seen: new Set<number>([tree.root]), agbno: tree.root, level: tree.levels - 1, lowKey: 0, highKey: tree.keyLimit,
    highInclusive: false, leftsib: NULL_AGBLOCK, rightsib: NULL_AGBLOCK,
  }));
  let blocksRead = 0;
  while (frontier.length > 0) {
    const bufs = await readBlocks(reader, g.blockSize, frontier.map((n) => ({ block: n.tree.agno * g.agblocks + n.agbno, count: 1 })));
    blocksRead += bufs.length;
    const next: PendingShortNode[] = [];
    for (let i = 0; i < frontier.length; i++) {
      const n = frontier[i]!;
      const { type, agno } = n.tree;
      const b = bufs[i]!;
      const what = `${type.name} block ${n.agbno} of AG ${agno}`;
      if (b.readUInt32BE(0) !== type.magic) throw new CorruptFileSystemError('xfs', `${what}: magic 0x${b.readUInt32BE(0).toString(16)} is not ${type.magicName}`);
      if (g.crc) {
        if (!xfsChecksumOk(b, 52)) throw new CorruptFileSystemError('xfs', `${what}: CRC mismatch`);
        const daddr = b.readBigUInt64BE(16);
        if (daddr !== BigInt((agno * g.agblocks + n.agbno) * sectorsPerBlock)) throw new CorruptFileSystemError('xfs', `${what}: block number stamp ${daddr} is wrong (misplaced write)`);
        if (!b.subarray(32, 48).equals(g.metaUuid)) throw new CorruptFileSystemError('xfs', `${what}: uuid does not match the superblock`);
        if (b.readUInt32BE(48) !== agno) throw new CorruptFileSystemError('xfs', `${what}: owner ${b.readUInt32BE(48)} is not AG ${agno}`);
      }
      onBlock?.(n.tree, n.agbno);
      const level = b.readUInt16BE(4);
      const numrecs = b.readUInt16BE(6);
      const left = b.readUInt32BE(8);
      const right = b.readUInt32BE(12);
      if (level !== n.level) throw new CorruptFileSystemError('xfs', `${what}: level ${level}, expected ${n.level}`);
      if (left !== n.leftsib || right !== n.rightsib) throw new CorruptFileSystemError('xfs', `${what}: sibling pointers ${left}/${right} do not match the tree`);
      const isRoot = n.agbno === n.tree.root;
      if (level === 0) {
        const leafMax = Math.floor((g.blockSize - hdr) / type.recSize);
        if (numrecs > leafMax) throw new CorruptFileSystemError('xfs', `${what}: ${numrecs} records, at most ${leafMax} fit`);
        if (numrecs === 0 && !isRoot) throw new CorruptFileSystemError('xfs', `${what}: empty leaf`);
        onLeaf({ tree: n.tree, agbno: n.agbno, buf: b, hdr, numrecs, isRoot, lowKey: n.lowKey, highKey: n.highKey, highInclusive: n.highInclusive, what });
        continue;
      }
      const nodeMax = Math.floor((g.blockSize - hdr) / (type.keySize + 4));
      if (numrecs === 0 || numrecs > nodeMax) throw new CorruptFileSystemError('xfs', `${what}: ${numrecs} keys, expected 1..${nodeMax}`);
      const keys: number[] = [];
      const ptrs: number[] = [];
      for (let r = 0; r < numrecs; r++) {
        const k = b.readUInt32BE(hdr + r * type.keySize + type.sortOffset);
        const p = b.readUInt32BE(hdr + nodeMax * type.keySize + r * 4);
        if (p === 0 || p >= n.tree.agLength) throw new CorruptFileSystemError('xfs', `${what}: child pointer ${p} is past the AG end (${n.tree.agLength} blocks)`);
        if (r > 0 && (type.uniqueKeys ? k <= keys[r - 1]! : k < keys[r - 1]!)) throw new CorruptFileSystemError('xfs', `${what}: keys out of order`);
        if (k < n.lowKey || k > n.highKey || (k === n.highKey && !n.highInclusive)) throw new CorruptFileSystemError('xfs', `${what}: key ${k} lies outside its parent's range`);
        if (r === 0 && !isRoot && k !== n.lowKey) throw new CorruptFileSystemError('xfs', `${what}: first key ${k} does not match its parent key ${n.lowKey}`);
        if (n.seen.has(p) || p === n.agbno) throw new CorruptFileSystemError('xfs', `${what}: child pointer ${p} is referenced twice (loop)`);
        n.seen.add(p);
        keys.push(k);
        ptrs.push(p);
      }
      // Siblings of the children: neighbours here, or across to the neighbouring node at this level
      // (linked below once the whole next level is known).
      for (let r = 0; r < numrecs; r++) {
        const last = r + 1 === numrecs;
        next.push({
          tree: n.tree, seen: n.seen, agbno: ptrs[r]!, level: level - 1, lowKey: keys[r]!,
          highKey: last ? n.highKey : keys[r + 1]!, highInclusive: last ? n.highInclusive : !type.uniqueKeys,
          leftsib: NULL_AGBLOCK, rightsib: NULL_AGBLOCK,
        });
      }
    }
    // Within one tree the next level's nodes are in left-to-right order: link the expected siblings.
    for (let i = 1; i < next.length; i++) {
      const prev = next[i - 1]!;
      const cur = next[i]!;
      if (prev.tree === cur.tree) { cur.leftsib = prev.agbno; prev.rightsib = cur.agbno; }
    }
    frontier = next;
  }
  return blocksRead;
}
