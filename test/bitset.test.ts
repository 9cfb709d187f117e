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
