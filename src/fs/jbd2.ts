// jbd2 (the ext3/ext4 journal), read-only: find the journal inside the file system, walk its log
// the way jbd2 recovery does (fs/jbd2/recovery.c do_one_pass: scan, revoke, replay), and hand out
// the newest committed, not revoked copy of any file-system block. Used when a crash-consistent
// image says "needs recovery": its on-disk bitmaps may be older than what the replay will write.
// Everything in the journal is big-endian.
import type { BlockReader } from '../device/device';
import { crc32c, EXTENT_MAGIC, INODE, INODE_EXTENTS_FL, INODE_INLINE_DATA_FL } from './ext4-layout';

export class JournalError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'JournalError';
  }
}

export const JBD2_MAGIC = 0xc03b3998;
const BT_DESCRIPTOR = 1;
const BT_COMMIT = 2;
const BT_SUPERBLOCK_V1 = 3;
const BT_SUPERBLOCK_V2 = 4;
const BT_REVOKE = 5;

const FEATURE_COMPAT_CHECKSUM = 0x1;
const FEATURE_INCOMPAT_REVOKE = 0x1;
const FEATURE_INCOMPAT_64BIT = 0x2;
const FEATURE_INCOMPAT_ASYNC_COMMIT = 0x4;
const FEATURE_INCOMPAT_CSUM_V2 = 0x8;
const FEATURE_INCOMPAT_CSUM_V3 = 0x10;
const FEATURE_INCOMPAT_FAST_COMMIT = 0x20;
const INCOMPAT_KNOWN = 0x3f;

const FLAG_ESCAPE = 1;
const FLAG_SAME_UUID = 2;
const FLAG_LAST_TAG = 8;

const TWO32 = 0x100000000;

/** A run of the journal file: logical blocks [logical, logical+length) at physical block `physical`. */
export interface Extent {
  logical: number;
  physical: number;
  length: number;
}

// ---- the journal inode -------------------------------------------------------------------------

/**
 * Maps the blocks of an inode (extent tree or classic direct/indirect blocks), reading tree
 * blocks level by level in batches. Every physical block is checked against `blocksCount`.
 */
export async function mapInodeBlocks(reader: BlockReader, blockSize: number, blocksCount: number, inode: Buffer): Promise<{ extents: Extent[]; sizeBlocks: number }> {
  const mode = inode.readUInt16LE(INODE.mode);
  if ((mode & 0xf000) !== 0x8000) throw new JournalError(`the journal inode is not a regular file (mode ${mode.toString(8)})`);
  const flags = inode.readUInt32LE(INODE.flags);
  if (flags & INODE_INLINE_DATA_FL) throw new JournalError('the journal inode has inline data');
  const size = inode.readUInt32LE(INODE.sizeLo) + (inode.length >= INODE.sizeHigh + 4 ? inode.readUInt32LE(INODE.sizeHigh) * TWO32 : 0);
  // Capped at the file system's size: a corrupt i_size must not make us chase a huge block map.
  const sizeBlocks = Math.min(Math.floor(size / blockSize), blocksCount);
  const iblock = inode.subarray(INODE.block, INODE.block + 60);
  const checkPhys = (p: number, len: number, what: string) => {
    if (p === 0 || p + len > blocksCount) throw new JournalError(`the journal's ${what} points to block ${p}, outside the file system (${blocksCount} blocks)`);
  };
  const extents: Extent[] = [];
  if (flags & INODE_EXTENTS_FL) {
    // Level by level: `nodes` are the extent nodes of the current depth.
    let nodes: Buffer[] = [iblock];
    let expectDepth = -1;
    for (let level = 0; level < 6 && nodes.length; level++) {
      const next: number[] = [];
      for (const n of nodes) {
        if (n.readUInt16LE(0) !== EXTENT_MAGIC) throw new JournalError('bad extent header in the journal inode');
        const entries = n.readUInt16LE(2);
        const depth = n.readUInt16LE(6);
        if (expectDepth >= 0 && depth !== expectDepth) throw new JournalError('inconsistent extent tree depth in the journal inode');
        if (12 + entries * 12 > n.length) throw new JournalError('extent node of the journal inode overflows');
        for (let i = 0; i < entries; i++) {
          const o = 12 + i * 12;
          if (depth === 0) {
            let len = n.readUInt16LE(o + 4);
            if (len > 32768) len -= 32768;
            const phys = n.readUInt16LE(o + 6) * TWO32 + n.readUInt32LE(o + 8);
            checkPhys(phys, len, 'extent');
            extents.push({ logical: n.readUInt32LE(o), physical: phys, length: len });
          } else {
            const phys = n.readUInt32LE(o + 4) + n.readUInt16LE(o + 8) * TWO32;
            checkPhys(phys, 1, 'extent index');
            next.push(phys);
          }
        }
        expectDepth = depth - 1;
      }
      if (next.length > 65536) throw new JournalError('the journal inode has an implausibly large extent tree');
      nodes = next.length ? await readBlocks(reader, blockSize, next) : [];
      if (level === 5 && nodes.length) throw new JournalError('the journal inode extent tree is too deep');
    }
  } else {
    // Classic ext2/3 block map: 12 direct, then single, double, triple indirect.
    const per = blockSize / 4;
    const add = (logical: number, phys: number) => {
      const last = extents[extents.length - 1];
      if (last && last.logical + last.length === logical && last.physical + last.length === phys) last.length++;
      else extents.push({ logical, physical: phys, length: 1 });
    };
    for (let i = 0; i < 12; i++) {
      const p = iblock.readUInt32LE(i * 4);
      if (p) { checkPhys(p, 1, 'block map'); add(i, p); }
    }
    // Pointer blocks to read at the current level: [physical, first logical block covered, span per entry]
    let level: Array<[number, number, number]> = [];
    let base = 12;
    for (let k = 0; k < 3; k++) {
      const span = per ** k; // logical blocks under each entry of a level-(k+1) block, at the leaf level
      const p = iblock.readUInt32LE((12 + k) * 4);
      const covered = per ** (k + 1);
      if (p && base < sizeBlocks) { checkPhys(p, 1, 'indirect block'); level.push([p, base, span]); }
      base += covered;
    }
    while (level.length) {
      const bufs = await readBlocks(reader, blockSize, level.map((l) => l[0]));
      const next: Array<[number, number, number]> = [];
      bufs.forEach((b, i) => {
        const [, first, span] = level[i]!;
        for (let e = 0; e < per; e++) {
          const p = b.readUInt32LE(e * 4);
          const logical = first + e * span;
          if (!p || logical >= sizeBlocks) continue;
          checkPhys(p, 1, 'indirect block');
          if (span === 1) add(logical, p);
          else next.push([p, logical, span / per]);
        }
      });
      if (next.length > 1 << 20) throw new JournalError('the journal block map is implausibly large');
      level = next;
    }
    extents.sort((a, b) => a.logical - b.logical);
  }
  extents.sort((a, b) => a.logical - b.logical);
  return { extents, sizeBlocks };
}

async function readBlocks(reader: BlockReader, blockSize: number, blocks: number[]): Promise<Buffer[]> {
  const out: Buffer[] = [];
  for (let i = 0; i < blocks.length; i += 1024) {
    const part = blocks.slice(i, i + 1024);
    out.push(...(await reader.readMany(part.map((b) => ({ offset: b * blockSize, length: blockSize })))));
  }
  return out;
}

// ---- the log -------------------------------------------------------------------------------

export interface JournalCopy {
  /** Log block (journal-relative) holding the copy. */
  logBlock: number;
  tid: number;
  escaped: boolean;
  /** Tag checksum (csum v2: 16 bits, v3: 32 bits), undefined without journal checksums. */
  csum: number | undefined;
}

export interface JournalScan {
  /** s_start == 0: nothing to replay. */
  empty: boolean;
  version: 1 | 2;
  /** Committed transactions the replay would apply. */
  transactions: number;
  /** fs block → the copy the replay leaves on disk last (newest committed, not revoked). */
  copies: Map<number, JournalCopy>;
  /** Revoke records seen in committed transactions. */
  revoked: number;
  features: string[];
}

const tidGt = (x: number, y: number) => ((x - y) | 0) > 0;

export class Journal {
  private window: { start: number; bufs: Buffer[] } | undefined;
  readonly first: number;
  readonly last: number;
  readonly start: number;
  readonly sequence: number;
  readonly incompat: number;
  readonly compat: number;
  readonly version: 1 | 2;
  readonly csumSeed: number;

  private constructor(
    private readonly reader: BlockReader,
    readonly blockSize: number,
    private readonly extents: Extent[],
    sb: Buffer,
  ) {
    const type = sb.readUInt32BE(4);
    this.version = type === BT_SUPERBLOCK_V1 ? 1 : 2;
    const jbs = sb.readUInt32BE(0xc);
    if (jbs !== blockSize) throw new JournalError(`journal block size ${jbs} differs from the file system's ${blockSize}`);
    const maxlen = sb.readUInt32BE(0x10);
    this.first = sb.readUInt32BE(0x14);
    this.sequence = sb.readUInt32BE(0x18);
    this.start = sb.readUInt32BE(0x1c);
    this.compat = this.version === 2 ? sb.readUInt32BE(0x24) : 0;
    this.incompat = this.version === 2 ? sb.readUInt32BE(0x28) : 0;
    const mapped = extents.reduce((n, e) => Math.max(n, e.logical + e.length), 0);
    if (maxlen > mapped) throw new JournalError(`journal superblock claims ${maxlen} blocks but the journal file maps ${mapped}`);
    if (this.first < 1 || this.first >= maxlen) throw new JournalError(`journal first log block ${this.first} is out of range (journal has ${maxlen} blocks)`);
    this.last = maxlen;
    if (this.start !== 0 && (this.start < this.first || this.start >= this.last)) throw new JournalError(`journal log start ${this.start} is out of range [${this.first}, ${this.last})`);
    if (this.incompat & ~INCOMPAT_KNOWN) throw new JournalError(`journal has unknown incompatible features 0x${(this.incompat & ~INCOMPAT_KNOWN).toString(16)}`);
    if ((this.incompat & FEATURE_INCOMPAT_CSUM_V2) && (this.incompat & FEATURE_INCOMPAT_CSUM_V3)) throw new JournalError('journal claims both checksum v2 and v3');
    this.csumSeed = crc32c(0xffffffff, sb, 0x30, 0x40);
    if (this.csumV2or3) {
      const want = sb.readUInt32BE(0xfc);
      const copy = Buffer.from(sb.subarray(0, 1024));
      copy.writeUInt32BE(0, 0xfc);
      const got = crc32c(0xffffffff, copy);
      if (want !== got) throw new JournalError(`journal superblock checksum mismatch (stored 0x${want.toString(16)}, computed 0x${got.toString(16)})`);
    }
  }

  /** Reads the journal superblock at logical block 0 of `extents`. */
  static async open(reader: BlockReader, blockSize: number, extents: Extent[]): Promise<Journal> {
    if (!extents.length || extents[0]!.logical !== 0) throw new JournalError('the journal file does not map its first block');
    const sb = await reader.read(extents[0]!.physical * blockSize, blockSize);
    if (sb.readUInt32BE(0) !== JBD2_MAGIC) throw new JournalError('no jbd2 magic in the journal superblock');
    const type = sb.readUInt32BE(4);
    if (type !== BT_SUPERBLOCK_V1 && type !== BT_SUPERBLOCK_V2) throw new JournalError(`journal superblock has block type ${type}`);
    return new Journal(reader, blockSize, extents, sb);
  }

  get csumV2or3(): boolean {
    return (this.incompat & (FEATURE_INCOMPAT_CSUM_V2 | FEATURE_INCOMPAT_CSUM_V3)) !== 0;
  }

  get is64(): boolean {
    return (this.incompat & FEATURE_INCOMPAT_64BIT) !== 0;
  }

  get featureNames(): string[] {
    const f: string[] = [];
    if (this.incompat & FEATURE_INCOMPAT_REVOKE) f.push('revoke');
    if (this.incompat & FEATURE_INCOMPAT_64BIT) f.push('64bit');
    if (this.incompat & FEATURE_INCOMPAT_ASYNC_COMMIT) f.push('async_commit');
    if (this.incompat & FEATURE_INCOMPAT_CSUM_V2) f.push('csum_v2');
    if (this.incompat & FEATURE_INCOMPAT_CSUM_V3) f.push('csum_v3');
    if (this.incompat & FEATURE_INCOMPAT_FAST_COMMIT) f.push('fast_commit');
    if (this.compat & FEATURE_COMPAT_CHECKSUM) f.push('checksum_v1');
    return f;
  }

  private tagBytes(): number {
    if (this.incompat & FEATURE_INCOMPAT_CSUM_V3) return 16;
    let sz = 12;
    if (this.incompat & FEATURE_INCOMPAT_CSUM_V2) sz += 2;
    return this.is64 ? sz : sz - 4;
  }

  private physical(logical: number): number {
    const ex = this.extents;
    let lo = 0, hi = ex.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const e = ex[mid]!;
      if (logical < e.logical) hi = mid - 1;
      else if (logical >= e.logical + e.length) lo = mid + 1;
      else return e.physical + (logical - e.logical);
    }
    throw new JournalError(`journal block ${logical} is a hole in the journal file`);
  }

  /** Physical byte ranges for log blocks [from, to), contiguous runs merged. */
  private ranges(from: number, to: number): Array<{ offset: number; length: number; count: number }> {
    const out: Array<{ offset: number; length: number; count: number }> = [];
    let prev = -2;
    for (let l = from; l < to; l++) {
      const p = this.physical(l);
      const last = out[out.length - 1];
      if (last && p === prev + 1) { last.length += this.blockSize; last.count++; }
      else out.push({ offset: p * this.blockSize, length: this.blockSize, count: 1 });
      prev = p;
    }
    return out;
  }

  /** One log block; reads ahead a window of up to 1 MiB so the scan is not one await per block. */
  private async logBlock(n: number): Promise<Buffer> {
    const w = this.window;
    if (w && n >= w.start && n < w.start + w.bufs.length) return w.bufs[n - w.start]!;
    const count = Math.max(1, Math.min(Math.floor((1 << 20) / this.blockSize), this.last - n));
    const ranges = this.ranges(n, n + count);
    const got = await this.reader.readMany(ranges.map(({ offset, length }) => ({ offset, length })));
    const bufs: Buffer[] = [];
    got.forEach((b, i) => {
      for (let k = 0; k < ranges[i]!.count; k++) bufs.push(b.subarray(k * this.blockSize, (k + 1) * this.blockSize));
    });
    this.window = { start: n, bufs };
    return bufs[0]!;
  }

  private wrap(n: number): number {
    return n >= this.last ? n - (this.last - this.first) : n;
  }

  private verifyTail(b: Buffer, what: string, tid: number): void {
    if (!this.csumV2or3) return;
    const want = b.readUInt32BE(this.blockSize - 4);
    const c = Buffer.from(b);
    c.writeUInt32BE(0, this.blockSize - 4);
    if (crc32c(this.csumSeed, c) !== want) throw new JournalError(`${what} block of transaction ${tid} fails its checksum`);
  }

  /**
   * Walks the log from s_start exactly as recovery does: stops at the first block that is not a
   * journal block of the expected sequence; only transactions with a commit block count; revoke
   * records of committed transactions cancel copies in transactions up to theirs.
   */
  async scan(): Promise<JournalScan> {
    const result: JournalScan = { empty: this.start === 0, version: this.version, transactions: 0, copies: new Map(), revoked: 0, features: this.featureNames };
    if (this.start === 0) return result;
    if (this.incompat & FEATURE_INCOMPAT_FAST_COMMIT) throw new JournalError('the journal uses fast commits, whose replay changes allocations without bitmap copies');
    if (this.compat & FEATURE_COMPAT_CHECKSUM) throw new JournalError('the journal uses v1 commit checksums (async commit), which this reader does not verify');
    const tagBytes = this.tagBytes();
    const limit = this.blockSize - (this.csumV2or3 ? 4 : 0);
    const v3 = (this.incompat & FEATURE_INCOMPAT_CSUM_V3) !== 0;
    const v2 = (this.incompat & FEATURE_INCOMPAT_CSUM_V2) !== 0;
    const committed: Array<{ block: number; copy: JournalCopy }> = [];
    const revokes = new Map<number, number>();
    let pending: Array<{ block: number; copy: JournalCopy }> = [];
    let pendingRevokes: number[] = [];
    let next = this.start;
    let tid = this.sequence;
    let consumed = 0;
    const span = this.last - this.first;
    while (consumed < span) {
      const b = await this.logBlock(next);
      next = this.wrap(next + 1);
      consumed++;
      if (b.readUInt32BE(0) !== JBD2_MAGIC || b.readUInt32BE(8) !== tid) break;
      const type = b.readUInt32BE(4);
      if (type === BT_DESCRIPTOR) {
        this.verifyTail(b, 'descriptor', tid);
        let off = 12;
        while (off + tagBytes <= limit) {
          const lo = b.readUInt32BE(off);
          let flags: number, hi = 0, csum: number | undefined;
          if (v3) {
            flags = b.readUInt32BE(off + 4);
            hi = b.readUInt32BE(off + 8);
            csum = b.readUInt32BE(off + 12);
          } else {
            csum = v2 ? b.readUInt16BE(off + 4) : undefined;
            flags = b.readUInt16BE(off + 6);
            if (this.is64) hi = b.readUInt32BE(off + 8);
          }
          const block = lo + (this.is64 ? hi * TWO32 : 0);
          pending.push({ block, copy: { logBlock: next, tid, escaped: (flags & FLAG_ESCAPE) !== 0, csum } });
          next = this.wrap(next + 1);
          consumed++;
          off += tagBytes;
          if (!(flags & FLAG_SAME_UUID)) off += 16;
          if (flags & FLAG_LAST_TAG) break;
        }
        if (consumed > span) break; // the tags run past the log: a torn, never committed transaction
      } else if (type === BT_COMMIT) {
        if (this.csumV2or3) {
          const want = b.readUInt32BE(16);
          const c = Buffer.from(b);
          c.writeUInt32BE(0, 16);
          if (crc32c(this.csumSeed, c) !== want) throw new JournalError(`commit block of transaction ${tid} fails its checksum`);
        }
        committed.push(...pending);
        for (const r of pendingRevokes) {
          const prev = revokes.get(r);
          if (prev === undefined || tidGt(tid, prev)) revokes.set(r, tid);
        }
        result.revoked += pendingRevokes.length;
        pending = [];
        pendingRevokes = [];
        result.transactions++;
        tid = (tid + 1) >>> 0;
      } else if (type === BT_REVOKE) {
        this.verifyTail(b, 'revoke', tid);
        const count = b.readUInt32BE(12);
        if (count < 16 || count > limit) throw new JournalError(`revoke block of transaction ${tid} has an impossible length ${count}`);
        const rec = this.is64 ? 8 : 4;
        for (let off = 16; off + rec <= count; off += rec) {
          pendingRevokes.push(this.is64 ? b.readUInt32BE(off) * TWO32 + b.readUInt32BE(off + 4) : b.readUInt32BE(off));
        }
      } else {
        break; // an unknown block type ends the log, as in recovery
      }
    }
    for (const { block, copy } of committed) {
      const r = revokes.get(block);
      if (r !== undefined && !tidGt(copy.tid, r)) continue;
      result.copies.set(block, copy);
    }
    return result;
  }

  /** Reads the journal copies of `blocks`, checking their tag checksums and undoing escaping. */
  async readCopies(scan: JournalScan, blocks: number[]): Promise<Map<number, Buffer>> {
    const out = new Map<number, Buffer>();
    const want = blocks.filter((b) => scan.copies.has(b));
    for (let i = 0; i < want.length; i += 1024) {
      const part = want.slice(i, i + 1024);
      const bufs = await this.reader.readMany(part.map((b) => ({ offset: this.physical(scan.copies.get(b)!.logBlock) * this.blockSize, length: this.blockSize })));
      part.forEach((block, k) => {
        const copy = scan.copies.get(block)!;
        const data = Buffer.from(bufs[k]!);
        if (copy.csum !== undefined) {
          const seq = Buffer.alloc(4);
          seq.writeUInt32BE(copy.tid);
          const c = crc32c(crc32c(this.csumSeed, seq), data);
          const ok = this.incompat & FEATURE_INCOMPAT_CSUM_V3 ? c === copy.csum : (c & 0xffff) === copy.csum;
          if (!ok) throw new JournalError(`the journal copy of block ${block} (transaction ${copy.tid}) fails its checksum`);
        }
        if (copy.escaped) data.writeUInt32BE(JBD2_MAGIC, 0);
        out.set(block, data);
      });
    }
    return out;
  }
}
