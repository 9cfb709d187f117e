// The appliance's Original Data Cache and Modified Map (src/appliance/odc.ts) by themselves: memory
// slots first, then the spill file; originals come back byte for byte from either; only the first
// original of a block is kept; a block read frees its slot; the spill file is removed at close;
// --odc is parsed strictly.
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ModifiedMap, ODC_SLOT, OriginalDataCache, parseOdc } from '../src/appliance/odc';
import { UserError } from '../src/util/errors';

test('--odc forms, and what is refused', (t) => {
  t.deepEqual(parseOdc('memory:1M'), { memoryBytes: 1 << 20 });
  t.deepEqual(parseOdc('file:/var/x:odc:2M'), { memoryBytes: 0, file: { path: '/var/x:odc', bytes: 2 << 20 } });
  t.deepEqual(parseOdc('memory:64K+file:/tmp/o:128K'), { memoryBytes: 64 << 10, file: { path: '/tmp/o', bytes: 128 << 10 } });
  for (const bad of ['', 'memory:', 'memory:lots', 'memory:4K', 'disk:/x:1M', 'file:/x', 'memory:1M+', 'memory:1M+memory:1M']) {
    const e = t.throws(() => parseOdc(bad), { instanceOf: UserError }, bad);
    t.regex(e!.message, /^--odc /);
  }
});

test('memory first, then the spill file; originals round-trip from both; a read block frees its slot; the file is gone at close', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'odc-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'spill');
  const odc = new OriginalDataCache({ memoryBytes: 16 * ODC_SLOT, file: { path: file, bytes: 16 * ODC_SLOT } });
  t.is(odc.capacity, 32);
  const mm = new ModifiedMap(2 ** 33, odc);
  const big = 2 ** 32 + 5; // block numbers past 2^32
  for (let i = 0; i < 32; i++) {
    const b = big + i;
    t.true(mm.wants(b));
    const slot = odc.take();
    t.true(slot >= 0);
    odc.write(slot, Buffer.alloc(ODC_SLOT, i + 1));
    mm.keep(b, slot);
    t.false(mm.wants(b), 'only the first original of a block is kept');
  }
  t.is(odc.take(), -1, 'full');
  t.is(odc.spilled, 16, 'the second half went to the file');
  t.true(fs.statSync(file).size === 16 * ODC_SLOT);
  for (let i = 0; i < 32; i++) {
    const out = Buffer.alloc(ODC_SLOT);
    odc.read(mm.slot(big + i)!, out, 0, ODC_SLOT);
    t.true(out.equals(Buffer.alloc(ODC_SLOT, i + 1)), `block ${big + i} byte for byte`);
  }
  let told = 0;
  odc.onRoom(() => told++);
  mm.markDone(big, big + 20);
  t.is(mm.held, 12);
  t.is(odc.used, 12);
  t.false(mm.wants(big + 3), 'a read block needs no original any more');
  t.true(mm.wants(big - 1));
  const s = odc.take();
  t.true(s >= 0 && s < 16, 'memory slots are reused first');
  t.is(odc.peak, 32);
  return new Promise<void>((resolve) => queueMicrotask(() => {
    t.is(told, 1, 'waiters told once per turn');
    mm.clear();
    odc.close();
    t.false(fs.existsSync(file));
    resolve();
  }));
});
