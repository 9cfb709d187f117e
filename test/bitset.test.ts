import test from 'ava';
import { Bitset } from '../src/util/bitset';
import { rng, seedFromEnv } from './helpers/system';

test('bitset ranges, counts and runs agree with a naive model', (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  for (let round = 0; round < 50; round++) {
    const n = 1 + Math.floor(r() * 2000);
    const b = new Bitset(n);
    const model = new Array<boolean>(n).fill(false);
    for (let op = 0; op < 40; op++) {
      const s = Math.floor(r() * n), e = s + Math.floor(r() * (n - s + 1));
      const v = r() < 0.6;
      v ? b.setRange(s, e) : b.clearRange(s, e);
      for (let i = s; i < e; i++) model[i] = v;
    }
    t.is(b.count(), model.filter(Boolean).length);
    const runs = [...b.runs()];
    const fromModel: Array<[number, number]> = [];
    for (let i = 0; i < n; i++) {
      if (model[i] && (i === 0 || !model[i - 1])) fromModel.push([i, i]);
      if (model[i]) fromModel[fromModel.length - 1]![1] = i + 1;
    }
    t.deepEqual(runs, fromModel);
  }
});

/** The reference: disjoint, sorted, non-adjacent [start, end) intervals. */
class IntervalSet {
  runs: Array<[number, number]> = [];
  constructor(readonly size: number) {}
  private put(s: number, e: number, value: boolean): void {
    s = Math.max(0, s); e = Math.min(e, this.size);
    if (s >= e) return;
    const out: Array<[number, number]> = [];
    for (const [a, b] of this.runs) {
      if (b <= s || a >= e) { out.push([a, b]); continue; }
      if (a < s) out.push([a, s]);
      if (b > e) out.push([e, b]);
    }
    if (value) out.push([s, e]);
    out.sort((x, y) => x[0] - y[0]);
    const merged: Array<[number, number]> = [];
    for (const r of out) {
      const last = merged[merged.length - 1];
      if (last && last[1] >= r[0]) last[1] = Math.max(last[1], r[1]);
      else merged.push([r[0], r[1]]);
    }
    this.runs = merged;
  }
  add(s: number, e: number): void { this.put(s, e, true); }
  remove(s: number, e: number): void { this.put(s, e, false); }
  has(i: number): boolean { return this.runs.some(([a, b]) => i >= a && i < b); }
  count(s = 0, e = this.size): number {
    let n = 0;
    for (const [a, b] of this.runs) n += Math.max(0, Math.min(b, e) - Math.max(a, s));
    return n;
  }
  intersect(o: IntervalSet): void {
    const out: Array<[number, number]> = [];
    for (const [a, b] of this.runs) for (const [c, d] of o.runs) if (Math.max(a, c) < Math.min(b, d)) out.push([Math.max(a, c), Math.min(b, d)]);
    this.runs = [];
    for (const [a, b] of out) this.add(a, b);
  }
}

test('past 2^32: every operation agrees with an interval model at sizes up to 2^45 bits', (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const TWO32 = 2 ** 32;
  const sizes = [TWO32 + 5, 2 ** 34, 2 ** 40 + 3, 2 ** 45];
  for (const size of sizes) {
    const b = new Bitset(size);
    const m = new IntervalSet(size);
    // Points where 32-bit arithmetic breaks, leaf boundaries, and the end.
    const hot = [0, 1, 7, 8, TWO32 - 9, TWO32 - 1, TWO32, TWO32 + 1, TWO32 + 8, 2 * TWO32 - 1, 2 * TWO32 + 3,
      b.leafBits - 1, b.leafBits, b.leafBits * 3 + 5, size - b.leafBits, size - 9, size - 1, size].filter((x) => x <= size);
    const point = () => (r() < 0.6 ? hot[Math.floor(r() * hot.length)]! + Math.floor(r() * 40) - 20 : Math.floor(r() * size));
    const clamp = (x: number) => Math.max(0, Math.min(size, x));
    for (let op = 0; op < 400; op++) {
      const x = clamp(point());
      const kind = r();
      if (kind < 0.3) {
        const e = clamp(x + Math.floor(r() * (r() < 0.3 ? b.leafBits * 5 : 300)));
        b.setRange(x, e); m.add(x, e);
      } else if (kind < 0.55) {
        const e = clamp(x + Math.floor(r() * (r() < 0.3 ? b.leafBits * 5 : 300)));
        b.clearRange(x, e); m.remove(x, e);
      } else if (kind < 0.7 && x < size) {
        b.set(x); m.add(x, x + 1);
      } else if (kind < 0.8 && x < size) {
        b.clear(x); m.remove(x, x + 1);
      } else if (x < size) {
        // An on-disk bitmap ORed in at any bit alignment.
        const src = new Uint8Array(1 + Math.floor(r() * 40));
        for (let q = 0; q < src.length; q++) src[q] = r() < 0.3 ? 0xff : r() < 0.5 ? 0 : Math.floor(r() * 256);
        const nbits = Math.floor(r() * src.length * 8) + 1;
        b.orBytes(src, x, nbits);
        for (let q = 0; q < nbits && x + q < size; q++) if (src[Math.floor(q / 8)]! & (1 << (q % 8))) m.add(x + q, x + q + 1);
      }
    }
    t.is(b.count(), m.count(), `count at size ${size}`);
    t.is(b.setCount, m.count());
    t.deepEqual([...b.runs()], m.runs, `runs at size ${size}`);
    for (const [a, e] of m.runs) {
      t.true(b.get(a) && b.get(e - 1), `run ${a}..${e} ends`);
      if (a > 0) t.false(b.get(a - 1));
      if (e < size) t.false(b.get(e));
    }
    for (let q = 0; q < 50; q++) {
      const s = clamp(point()), e = clamp(s + Math.floor(r() * 2 ** 33));
      t.is(b.count(s, e), m.count(s, e), `count(${s}, ${e})`);
      const nextSet = m.runs.find(([, hi]) => hi > s);
      t.is(b.next(s, true), nextSet ? Math.max(s, nextSet[0]) : size, `next set from ${s}`);
      let nextClear = s;
      for (const [lo, hi] of m.runs) if (lo <= nextClear && hi > nextClear) nextClear = hi;
      t.is(b.next(s, false), Math.min(nextClear, size), `next clear from ${s}`);
    }
    // Set algebra against a second random set.
    const b2 = new Bitset(size);
    const m2 = new IntervalSet(size);
    for (let q = 0; q < 60; q++) {
      const s = clamp(point()), e = clamp(s + Math.floor(r() * b.leafBits * 3));
      b2.setRange(s, e); m2.add(s, e);
    }
    const or = b.clone(); or.orWith(b2);
    const mOr = new IntervalSet(size); for (const [s, e] of [...m.runs, ...m2.runs]) mOr.add(s, e);
    t.deepEqual([...or.runs()], mOr.runs, 'or');
    const and = b.clone(); and.andWith(b2);
    const mAnd = new IntervalSet(size); mAnd.runs = m.runs.map((x) => [x[0], x[1]]); mAnd.intersect(m2);
    t.deepEqual([...and.runs()], mAnd.runs, 'and');
    t.is(and.count(), mAnd.count());
    const andNot = b.clone(); andNot.andNot(b2);
    const mNot = new IntervalSet(size); mNot.runs = m.runs.map((x) => [x[0], x[1]]); for (const [s, e] of m2.runs) mNot.remove(s, e);
    t.deepEqual([...andNot.runs()], mNot.runs, 'andNot');
    t.is(andNot.count(), mNot.count());
  }
});

test('memory follows what is used, not what the volume spans', (t) => {
  const size = 2 ** 34; // a 64 TiB volume of 4 KiB blocks
  const full = new Bitset(size, true);
  t.is(full.count(), size);
  t.is(full.leafMemory, 0);
  // Free extents of a nearly empty file system cleared out of a full map (as the XFS reader does).
  for (let ag = 0; ag < 64; ag++) full.clearRange(ag * 2 ** 28 + 100, (ag + 1) * 2 ** 28 - 7);
  t.is(full.count(), 64 * 107);
  t.true(full.leafMemory <= 128 * 4096, `${full.leafMemory} bytes of leaves`);
  t.deepEqual([...full.runs()].slice(0, 2), [[0, 100], [2 ** 28 - 7, 2 ** 28 + 100]]);
  // A leaf that becomes all-set or all-clear gives its memory back.
  const b = new Bitset(size);
  b.set(2 ** 33 + 5);
  t.is(b.leafMemory, 4096);
  b.clear(2 ** 33 + 5);
  t.is(b.leafMemory, 0);
  b.setRange(2 ** 33, 2 ** 33 + b.leafBits - 1);
  b.set(2 ** 33 + b.leafBits - 1);
  t.is(b.leafMemory, 0);
  t.is(b.count(), b.leafBits);
});

test('out-of-range single bits are refused, reads outside are false', (t) => {
  const b = new Bitset(2 ** 32 + 10);
  t.throws(() => b.set(2 ** 32 + 10), { instanceOf: RangeError });
  t.throws(() => b.set(-1), { instanceOf: RangeError });
  t.false(b.get(2 ** 40));
  b.setRange(2 ** 32 + 5, 2 ** 33);
  t.is(b.count(), 5);
});
