// A set of block numbers as a two-level sparse bitmap: the volume is cut into leaves of 2^15 bits
// (more for volumes past 2^37 blocks, so the directory stays at most 4 Mi entries), and each leaf is
// EMPTY, FULL or a 4 KiB bitmap. Memory and scans cost what the map's mixed regions cost, not what
// the volume spans: a nearly empty 64 TiB volume is 2 MiB of directory. Bits are LSB-first within
// each byte, as in ext2/3/4 block bitmaps, so an on-disk bitmap block can be ORed straight in.
// Block numbers are exact to 2^53: no 32-bit operator ever sees one; inside a leaf the bit offset
// is below 2^31, so byte and bit arithmetic there is safe.

const POP8 = new Uint8Array(256);
for (let v = 0; v < 256; v++) POP8[v] = (v & 1) + POP8[v >> 1]!; // 32-bit-ok: byte values

/** Directory states; a positive entry is 1 + the index of a mixed leaf. */
const EMPTY = 0;
const FULL = -1;
const MIN_LEAF_SHIFT = 15;
const MAX_DIR_ENTRIES = 2 ** 22;

/** Set bits in bytes [from, to) of `a`. */
function popcount(a: Uint8Array, from: number, to: number): number {
  let n = 0;
  for (let k = from; k < to; k++) n += POP8[a[k]!]!;
  return n;
}

export class Bitset {
  /** Bits per leaf (a power of two, a multiple of 8). */
  readonly leafBits: number;
  private readonly leafBytes: number;
  private readonly dir: Int32Array;
  private readonly leaves: Array<Uint8Array | undefined> = [];
  private readonly leafCounts: number[] = [];
  private readonly freeLeaves: number[] = [];
  private total = 0;

  constructor(readonly size: number, fill = false) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`bitset size ${size} is not a whole number`);
    let leafBits = 2 ** MIN_LEAF_SHIFT;
    while (Math.ceil(size / leafBits) > MAX_DIR_ENTRIES) leafBits *= 2;
    this.leafBits = leafBits;
    this.leafBytes = leafBits / 8;
    this.dir = new Int32Array(Math.ceil(size / leafBits));
    if (fill && size > 0) { this.dir.fill(FULL); this.total = size; }
  }

  /** Number of set bits. */
  get setCount(): number { return this.total; }

  /** Bytes of leaf bitmaps held (the directory not included): what the map's mixed regions cost. */
  get leafMemory(): number { return (this.leaves.length - this.freeLeaves.length) * this.leafBytes; }

  /** Bits in leaf `k` (the last leaf may be short). */
  private leafLen(k: number): number {
    return Math.min(this.leafBits, this.size - k * this.leafBits);
  }

  private check(i: number): void {
    if (!(i >= 0 && i < this.size && Number.isInteger(i))) throw new RangeError(`bit ${i} is outside a bitset of ${this.size} bits`);
  }

  get(i: number): boolean {
    if (!(i >= 0 && i < this.size)) return false;
    const k = Math.floor(i / this.leafBits);
    const s = this.dir[k]!;
    if (s === EMPTY) return false;
    if (s === FULL) return true;
    const o = i - k * this.leafBits;
    return (this.leaves[s - 1]![o >>> 3]! & (1 << (o & 7))) !== 0; // 32-bit-ok: o is a leaf offset (< 2^31)
  }

  set(i: number): void {
    this.check(i);
    const k = Math.floor(i / this.leafBits);
    if (this.dir[k] === FULL) return;
    const id = this.mixed(k);
    const leaf = this.leaves[id]!;
    const o = i - k * this.leafBits;
    const m = 1 << (o & 7); // 32-bit-ok: o is a leaf offset
    const byte = o >>> 3; // 32-bit-ok: o is a leaf offset
    if (leaf[byte]! & m) return;
    leaf[byte]! |= m;
    this.total++;
    if (++this.leafCounts[id]! === this.leafLen(k)) this.collapse(k, FULL);
  }

  clear(i: number): void {
    this.check(i);
    const k = Math.floor(i / this.leafBits);
    if (this.dir[k] === EMPTY) return;
    const id = this.mixed(k);
    const leaf = this.leaves[id]!;
    const o = i - k * this.leafBits;
    const m = 1 << (o & 7); // 32-bit-ok: o is a leaf offset
    const byte = o >>> 3; // 32-bit-ok: o is a leaf offset
    if (!(leaf[byte]! & m)) return;
    leaf[byte]! &= ~m;
    this.total--;
    if (--this.leafCounts[id]! === 0) this.collapse(k, EMPTY);
  }

  /** Sets bits [start, end) (clamped to the bitset). */
  setRange(start: number, end: number): void {
    this.fillRange(start, end, true);
  }

  /** Clears bits [start, end) (clamped to the bitset). */
  clearRange(start: number, end: number): void {
    this.fillRange(start, end, false);
  }

  /** Number of set bits in [start, end). */
  count(start = 0, end = this.size): number {
    start = Math.max(0, start);
    end = Math.min(end, this.size);
    if (start >= end) return 0;
    if (start === 0 && end === this.size) return this.total;
    const lb = this.leafBits;
    let n = 0;
    for (let k = Math.floor(start / lb); k * lb < end; k++) {
      const ls = k * lb;
      const s = this.dir[k]!;
      const a = Math.max(start, ls) - ls;
      const b = Math.min(end, ls + this.leafLen(k)) - ls;
      if (s === EMPTY) continue;
      if (s === FULL) { n += b - a; continue; }
      if (a === 0 && b === this.leafLen(k)) { n += this.leafCounts[s - 1]!; continue; }
      n += countBits(this.leaves[s - 1]!, a, b);
    }
    return n;
  }

  /** Index of the first bit in [from, end) equal to `value`; `end` if none (end defaults to size). */
  next(from: number, value: boolean, end = this.size): number {
    end = Math.min(end, this.size);
    let i = Math.max(0, Math.ceil(from));
    const lb = this.leafBits;
    while (i < end) {
      const k = Math.floor(i / lb);
      const ls = k * lb;
      const s = this.dir[k]!;
      if (s === (value ? FULL : EMPTY)) return i;
      if (s === (value ? EMPTY : FULL)) { i = ls + lb; continue; }
      const limit = Math.min(end, ls + this.leafLen(k)) - ls;
      const o = scanLeaf(this.leaves[s - 1]!, i - ls, limit, value);
      if (o < limit) return ls + o;
      i = ls + lb;
    }
    return end;
  }

  /** True when any bit in [start, end) is set. */
  any(start: number, end: number): boolean {
    return this.next(start, true, end) < Math.min(end, this.size);
  }

  /** Runs of set bits as [start, end) pairs, ascending, maximal. */
  *runs(from = 0, to = this.size): Generator<[number, number]> {
    to = Math.min(to, this.size);
    let i = this.next(from, true, to);
    while (i < to) {
      const e = this.next(i, false, to);
      yield [i, e];
      i = this.next(e, true, to);
    }
  }

  /** ORs `nbits` LSB-first bits of `src` into this bitset at bit `at` (any alignment). */
  orBytes(src: Uint8Array, at: number, nbits: number): void {
    nbits = Math.min(nbits, this.size - at, src.length * 8);
    if (!(nbits > 0)) return;
    this.check(at);
    const lb = this.leafBits;
    const shift = at % 8;
    let j = 0; // bits of src consumed
    while (j < nbits) {
      const i = at + j;
      const k = Math.floor(i / lb);
      const ls = k * lb;
      const o = i - ls;
      const n = Math.min(nbits - j, this.leafLen(k) - o);
      if (this.dir[k] !== FULL) {
        if (shift === 0) this.orAligned(k, src, j / 8, o, n); // j and o are multiples of 8 here
        else this.orShifted(k, src, j, o, n);
      }
      j += n;
    }
  }

  /** this |= other (same size). */
  orWith(other: Bitset): void { this.combine(other, 'or'); }
  /** this &= other (same size). */
  andWith(other: Bitset): void { this.combine(other, 'and'); }
  /** this &= ~other (same size). */
  andNot(other: Bitset): void { this.combine(other, 'andNot'); }

  /** An independent copy. */
  clone(): Bitset {
    const c = new Bitset(this.size);
    c.orWith(this);
    return c;
  }

  // ---- internals ----

  /** Makes leaf `k` a mixed leaf (materialising EMPTY as zeros, FULL as ones) and returns its id. */
  private mixed(k: number): number {
    const s = this.dir[k]!;
    if (s > 0) return s - 1;
    const id = this.freeLeaves.length ? this.freeLeaves.pop()! : this.leaves.length;
    let leaf = this.leaves[id];
    if (!leaf) { leaf = new Uint8Array(this.leafBytes); this.leaves[id] = leaf; }
    const len = this.leafLen(k);
    if (s === FULL) {
      leaf.fill(0xff, 0, Math.floor(len / 8));
      leaf.fill(0, Math.floor(len / 8));
      if (len % 8) leaf[Math.floor(len / 8)] = (1 << (len % 8)) - 1; // 32-bit-ok: 0..7
      this.leafCounts[id] = len;
    } else {
      leaf.fill(0);
      this.leafCounts[id] = 0;
    }
    this.dir[k] = id + 1;
    return id;
  }

  private collapse(k: number, state: typeof EMPTY | typeof FULL): void {
    const s = this.dir[k]!;
    if (s > 0) this.freeLeaves.push(s - 1);
    this.dir[k] = state;
  }

  /** Sets leaf `k`'s state after its mixed bitmap changed by `delta` set bits. */
  private settle(k: number, id: number, delta: number): void {
    this.total += delta;
    const c = (this.leafCounts[id]! += delta);
    if (c === 0) this.collapse(k, EMPTY);
    else if (c === this.leafLen(k)) this.collapse(k, FULL);
  }

  private fillRange(start: number, end: number, value: boolean): void {
    start = Math.max(0, start);
    end = Math.min(end, this.size);
    if (!(start < end)) return;
    if (!Number.isInteger(start) || !Number.isInteger(end)) throw new RangeError(`range ${start}..${end} is not whole bits`);
    const lb = this.leafBits;
    const want = value ? FULL : EMPTY;
    for (let k = Math.floor(start / lb); k * lb < end; k++) {
      const ls = k * lb;
      const len = this.leafLen(k);
      const a = Math.max(start, ls) - ls;
      const b = Math.min(end, ls + len) - ls;
      const s = this.dir[k]!;
      if (s === want) continue;
      if (a === 0 && b === len) {
        const before = s === EMPTY ? 0 : s === FULL ? len : this.leafCounts[s - 1]!;
        this.collapse(k, want);
        this.total += (value ? len : 0) - before;
        continue;
      }
      const id = this.mixed(k);
      const leaf = this.leaves[id]!;
      const before = countBits(leaf, a, b);
      fillBits(leaf, a, b, value);
      this.settle(k, id, (value ? b - a : 0) - before);
    }
  }

  private orAligned(k: number, src: Uint8Array, srcByte: number, o: number, n: number): void {
    const whole = Math.floor(n / 8);
    const rem = n % 8;
    const ob = o / 8;
    let any = false, all = true;
    for (let q = 0; q < whole; q++) { const v = src[srcByte + q]!; if (v) any = true; if (v !== 0xff) all = false; }
    const tail = rem ? src[srcByte + whole]! & ((1 << rem) - 1) : 0; // 32-bit-ok: rem is 0..7
    if (tail) any = true;
    if (rem && tail !== (1 << rem) - 1) all = false; // 32-bit-ok: rem is 0..7
    if (!any) return;
    if (all && o === 0 && n === this.leafLen(k)) {
      const s = this.dir[k]!;
      const before = s === EMPTY ? 0 : this.leafCounts[s - 1]!;
      this.collapse(k, FULL);
      this.total += n - before;
      return;
    }
    const id = this.mixed(k);
    const leaf = this.leaves[id]!;
    const span = whole + (rem ? 1 : 0);
    const before = popcount(leaf, ob, ob + span);
    for (let q = 0; q < whole; q++) leaf[ob + q]! |= src[srcByte + q]!;
    if (rem) leaf[ob + whole]! |= tail;
    this.settle(k, id, popcount(leaf, ob, ob + span) - before);
  }

  private orShifted(k: number, src: Uint8Array, j: number, o: number, n: number): void {
    let id = -1;
    let delta = 0;
    for (let q = 0; q < n; q++) {
      const sb = j + q;
      if (!(src[Math.floor(sb / 8)]! & (1 << (sb % 8)))) continue; // 32-bit-ok: sb % 8 is 0..7
      if (id < 0) id = this.mixed(k);
      const leaf = this.leaves[id]!;
      const t = o + q;
      const m = 1 << (t & 7); // 32-bit-ok: t is a leaf offset
      if (leaf[t >>> 3]! & m) continue; // 32-bit-ok: t is a leaf offset
      leaf[t >>> 3]! |= m; // 32-bit-ok: t is a leaf offset
      delta++;
    }
    if (id >= 0) this.settle(k, id, delta);
  }

  private combine(other: Bitset, op: 'or' | 'and' | 'andNot'): void {
    if (other.size !== this.size || other.leafBits !== this.leafBits) throw new RangeError(`bitsets of ${this.size} and ${other.size} bits cannot be combined`);
    for (let k = 0; k < this.dir.length; k++) {
      const os = other.dir[k]!;
      const s = this.dir[k]!;
      const len = this.leafLen(k);
      // Cases decided by the directory alone.
      if (op === 'or') {
        if (os === EMPTY || s === FULL) continue;
        if (os === FULL) { this.fillLeaf(k, true); continue; }
      } else {
        const keepAll = op === 'and' ? os === FULL : os === EMPTY;
        const dropAll = op === 'and' ? os === EMPTY : os === FULL;
        if (keepAll || s === EMPTY) continue;
        if (dropAll) { this.fillLeaf(k, false); continue; }
      }
      const src = other.leaves[os - 1]!;
      const id = this.mixed(k);
      const leaf = this.leaves[id]!;
      const bytes = Math.ceil(len / 8);
      const before = this.leafCounts[id]!;
      if (op === 'or') for (let q = 0; q < bytes; q++) leaf[q]! |= src[q]!;
      else if (op === 'and') for (let q = 0; q < bytes; q++) leaf[q]! &= src[q]!;
      else for (let q = 0; q < bytes; q++) leaf[q]! &= ~src[q]!;
      this.settle(k, id, popcount(leaf, 0, bytes) - before);
    }
  }

  private fillLeaf(k: number, value: boolean): void {
    const len = this.leafLen(k);
    const s = this.dir[k]!;
    const before = s === EMPTY ? 0 : s === FULL ? len : this.leafCounts[s - 1]!;
    this.collapse(k, value ? FULL : EMPTY);
    this.total += (value ? len : 0) - before;
  }
}

// Bit helpers inside one leaf: offsets are below 2^31, so byte arithmetic is safe here.

function countBits(leaf: Uint8Array, a: number, b: number): number {
  let n = 0;
  let i = a;
  while (i < b && i % 8 !== 0) { if (leaf[i >>> 3]! & (1 << (i & 7))) n++; i++; } // 32-bit-ok: leaf offset
  const fullEnd = b - (b % 8);
  if (i < fullEnd) { n += popcount(leaf, i / 8, fullEnd / 8); i = fullEnd; }
  for (; i < b; i++) if (leaf[i >>> 3]! & (1 << (i & 7))) n++; // 32-bit-ok: leaf offset
  return n;
}

function fillBits(leaf: Uint8Array, a: number, b: number, value: boolean): void {
  let i = a;
  while (i < b && i % 8 !== 0) { setBit(leaf, i, value); i++; }
  const fullEnd = b - (b % 8);
  if (i < fullEnd) { leaf.fill(value ? 0xff : 0, i / 8, fullEnd / 8); i = fullEnd; }
  for (; i < b; i++) setBit(leaf, i, value);
}

function setBit(leaf: Uint8Array, i: number, value: boolean): void {
  if (value) leaf[i >>> 3]! |= 1 << (i & 7); // 32-bit-ok: leaf offset
  else leaf[i >>> 3]! &= ~(1 << (i & 7)); // 32-bit-ok: leaf offset
}

/** First offset in [from, limit) of the leaf whose bit equals `value`; `limit` if none. */
function scanLeaf(leaf: Uint8Array, from: number, limit: number, value: boolean): number {
  const skip = value ? 0x00 : 0xff;
  let i = from;
  while (i < limit) {
    if (i % 8 === 0) {
      let q = i / 8;
      const lastWhole = Math.floor(limit / 8);
      while (q < lastWhole && leaf[q] === skip) q++;
      i = q * 8;
      if (i >= limit) return limit;
    }
    if (((leaf[i >>> 3]! & (1 << (i & 7))) !== 0) === value) return i; // 32-bit-ok: leaf offset
    i++;
  }
  return limit;
}
