// Every map type on both sides of block 2^32 (16 TiB at 4 KiB blocks), where 32-bit arithmetic
// would wrap a block number onto a low one: the snapshot's copy map (claims, the copy-before-write
// test, the copier's walk), and the archive's GNU sparse map. The file-system readers at these sizes
// are checked against their own tools in scale.test.ts.
import test from 'ava';
import { sparseMapFromBitset, encodeSparseMap } from '../src/archive/sparse-map';
import { CopyMap } from '../src/copy/copy-map';
import { Bitset } from '../src/util/bitset';

const TWO32 = 2 ** 32;
const TOTAL = 2 ** 34; // a 64 TiB volume of 4 KiB blocks

test('copy map: claims, waits and the walk past 2^32 never touch the block 2^32 below', async (t) => {
  const map = new CopyMap(TOTAL, false);
  // Pending around 2^32 and at its 32-bit alias (block b and b - 2^32 must stay independent).
  map.pending.setRange(TWO32 - 2, TWO32 + 3);
  map.pending.setRange(3 * TWO32 + 10, 3 * TWO32 + 12);
  t.is(map.pending.count(), 7);
  t.false(map.needsWork(2, 3), 'block 2, the 32-bit alias of 2^32 + 2, is free');
  t.true(map.needsWork(TWO32 + 2, TWO32 + 3));
  t.true(map.needsWork(3 * TWO32 + 11, 3 * TWO32 + 12));
  t.false(map.needsWork(2 * TWO32 + 10, 2 * TWO32 + 12), 'the alias at 2 * 2^32 is free');
  t.is(map.nextWork(0, TOTAL), TWO32 - 2);
  t.is(map.nextWork(TWO32 + 3, TOTAL), 3 * TWO32 + 10);

  // A copy claims the run across 2^32; a writer of block 2^32 + 1 waits for it.
  const task = map.claimRun(TWO32 - 2, TWO32 + 100, 'copy')!;
  t.deepEqual([task.start, task.end], [TWO32 - 2, TWO32 + 3]);
  t.false(map.pending.any(TWO32 - 2, TWO32 + 3));
  t.true(map.busy.get(TWO32 + 1) && !map.busy.get(1));
  t.true(map.needsWork(TWO32 + 1, TWO32 + 2), 'busy: a writer must wait');
  let woke = false;
  const waiting = map.waitFor(TWO32 + 1, TWO32 + 2).then(() => { woke = true; });
  t.false(woke);
  map.unlock(task);
  await waiting;
  t.true(woke);
  t.false(map.needsWork(TWO32 - 2, TWO32 + 3), 'copied: writes go straight through');

  // A save above 2^32: kept by block number, found by the walk, given back exactly.
  const save = map.claimRun(3 * TWO32 + 10, 3 * TWO32 + 11, 'save')!;
  map.markSaved(3 * TWO32 + 10);
  map.unlock(save);
  t.true(map.saved.get(3 * TWO32 + 10) && !map.saved.get(10));
  t.is(map.nextWork(TWO32, TOTAL), 3 * TWO32 + 10);
  t.is(map.unsave(3 * TWO32 + 10), 'held');
  t.is(map.nextWork(TWO32, TOTAL), 3 * TWO32 + 11, 'the last pending block');
  t.is(map.savedCount, 0);
});

test('sparse map of an archive: regions past 2^32 blocks keep their exact byte offsets', (t) => {
  const bs = 4096;
  const used = new Bitset(TOTAL);
  used.setRange(0, 3);
  used.setRange(TWO32 - 1, TWO32 + 1);
  used.setRange(TOTAL - 5, TOTAL);
  const m = sparseMapFromBitset(used, bs, TOTAL * bs);
  t.is(m.count, 3);
  t.deepEqual([...m.regions], [0, 3 * bs, (TWO32 - 1) * bs, 2 * bs, (TOTAL - 5) * bs, 5 * bs]);
  t.is(m.storedBytes, 10 * bs);
  const text = encodeSparseMap(m).toString('latin1').replace(/\0+$/, '');
  t.is(text, ['3', '0', String(3 * bs), String((TWO32 - 1) * bs), String(2 * bs), String((TOTAL - 5) * bs), String(5 * bs)].join('\n') + '\n');
});
