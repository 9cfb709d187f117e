// A fixed-size bitset, LSB-first within each byte: the same bit order as ext2/3/4 block bitmaps,
// so an on-disk bitmap block can be copied straight in.

const POP8 = new Uint8Array(256);
for (let i = 0; i < 256; i++) POP8[i] = (i & 1) + POP8[i >> 1];

export class Bitset {
  readonly bytes: Uint8Array;

  constructor(readonly size: number, fill = false) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`bitset size ${size} is not a whole number`);
    this.bytes = new Uint8Array(Math.ceil(size / 8));
    if (fill) this.setRange(0, size);
  }

  get(i: number): boolean {
    return (this.bytes[i >>> 3]! & (1 << (i & 7))) !== 0;
  }

  set(i: number): void {
    this.bytes[i >>> 3]! |= 1 << (i & 7);
  }

  clear(i: number): void {
    this.bytes[i >>> 3]! &= ~(1 << (i & 7));
  }

  /** Sets bits [start, end). */
  setRange(start: number, end: number): void {
    this.fillRange(start, Math.min(end, this.size), true);
  }

  /** Clears bits [start, end). */
  clearRange(start: number, end: number): void {
    this.fillRange(start, Math.min(end, this.size), false);
  }

  private fillRange(start: number, end: number, value: boolean): void {
    let i = Math.max(0, start);
    while (i < end && (i & 7) !== 0) { value ? this.set(i) : this.clear(i); i++; }
    const fullEnd = end & ~7;
    if (i < fullEnd) { this.bytes.fill(value ? 0xff : 0, i >>> 3, fullEnd >>> 3); i = fullEnd; }
    while (i < end) { value ? this.set(i) : this.clear(i); i++; }
  }

  /** Number of set bits in [start, end). */
  count(start = 0, end = this.size): number {
    let n = 0;
    let i = start;
    while (i < end && (i & 7) !== 0) { if (this.get(i)) n++; i++; }
    const fullEnd = end & ~7;
    for (let b = i >>> 3; b < fullEnd >>> 3; b++) n += POP8[this.bytes[b]!]!;
    for (i = Math.max(i, fullEnd); i < end; i++) if (this.get(i)) n++;
    return n;
  }

  /** Index of the first bit at or after `from` equal to `value`, or `size` if none. */
  next(from: number, value: boolean): number {
    let i = from;
    const skip = value ? 0x00 : 0xff;
    while (i < this.size) {
      if ((i & 7) === 0 && this.bytes[i >>> 3] === skip) { i += 8; continue; }
      if (this.get(i) === value) return i;
      i++;
    }
    return this.size;
  }

  /** Runs of set bits as [start, end) pairs, ascending. */
  *runs(from = 0, to = this.size): Generator<[number, number]> {
    let i = this.next(from, true);
    while (i < to) {
      const end = Math.min(this.next(i, false), to);
      yield [i, end];
      i = this.next(end, true);
    }
  }

  /** ORs `src` (LSB-first bytes holding `nbits` bits) into this bitset at bit offset `at`. */
  orBytes(src: Uint8Array, at: number, nbits: number): void {
    const limit = Math.min(nbits, this.size - at);
    if ((at & 7) === 0) {
      const whole = limit >>> 3;
      const base = at >>> 3;
      for (let b = 0; b < whole; b++) this.bytes[base + b]! |= src[b]!;
      for (let i = whole * 8; i < limit; i++) if (src[i >>> 3]! & (1 << (i & 7))) this.set(at + i);
      return;
    }
    for (let i = 0; i < limit; i++) if (src[i >>> 3]! & (1 << (i & 7))) this.set(at + i);
  }
}
