// The JS-thread I/O ring (native/io_ring.cc + src/device/io-ring.ts) on a real file: many ops at
// once beyond the ring's depth, each completing on its own, short reads at the end of the file,
// fdatasync, malformed records failing alone, and registered memory that cannot be dropped in flight.
import * as fs from 'node:fs';
import * as path from 'node:path';
import test from 'ava';
import { Device } from '../src/device/device';
import { IoRing, ioRing } from '../src/device/io-ring';
import { native } from '../src/device/native';
import { rng, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const RingClass = native().IoRing;
const ringTest = RingClass && native().ioEngine() === 'io_uring' ? test : test.skip;

function op(ring: IoRing, kind: 'read' | 'write', fd: number, buf: number, off: number, len: number, at: number, urgent = false): Promise<number> {
  return new Promise((resolve) => ring[kind](fd, buf, off, len, at, resolve, urgent));
}

ringTest('1000 random 4 KiB writes then reads through a depth-8 ring land byte-exact (O_DIRECT file; every other op marked urgent)', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const file = sparseFile(path.join(scratchDir(t), 'dev.img'), 64 << 20);
  const dev = Device.open(file, { write: true });
  t.teardown(() => dev.close());
  const ring = new IoRing(RingClass!, 8);
  const n = 1000;
  const src = native().allocAligned(n * 4096);
  const dst = native().allocAligned(n * 4096);
  new Uint8Array(src).forEach((_, i, a) => { a[i] = Math.floor(r() * 256); });
  const s = ring.register(src);
  const d = ring.register(dst);
  const blocks: number[] = [];
  const used = new Set<number>();
  while (blocks.length < n) { const b = Math.floor(r() * 16384); if (!used.has(b)) { used.add(b); blocks.push(b); } }
  const w = await Promise.all(blocks.map((b, i) => op(ring, 'write', dev.fd, s, b * 4096, 4096, i * 4096, i % 2 === 0)));
  t.true(w.every((x) => x === 4096), `write results: ${[...new Set(w)].join(',')}`);
  t.is(await new Promise<number>((res) => ring.datasync(dev.fd, res)), 0);
  const rd = await Promise.all(blocks.map((b, i) => op(ring, 'read', dev.fd, d, b * 4096, 4096, i * 4096, i % 2 === 1)));
  t.true(rd.every((x) => x === 4096));
  t.true(Buffer.from(dst).equals(Buffer.from(src)));
  // The same bytes as another reader sees them (the page cache).
  const fd = fs.openSync(file, 'r');
  t.teardown(() => fs.closeSync(fd));
  const one = Buffer.alloc(4096);
  fs.readSync(fd, one, 0, 4096, blocks[7]! * 4096);
  t.true(one.equals(Buffer.from(src, 7 * 4096, 4096)));
  t.is(ring.counters.completed, 2 * n + 1);
  t.true(ring.counters.waitedForSlot > 0, 'ops beyond the depth waited for a slot');
  t.is(ring.inflight, 0);
});

ringTest('a read across the end of a file is short; a malformed op fails alone with EINVAL; busy memory cannot be unregistered', async (t) => {
  const file = path.join(scratchDir(t), 'odd.img');
  fs.writeFileSync(file, Buffer.alloc(10000, 0x5a));
  const fd = fs.openSync(file, 'r');
  t.teardown(() => fs.closeSync(fd));
  const ring = ioRing()!;
  const mem = native().allocAligned(16384);
  const m = ring.register(mem);
  t.is(await op(ring, 'read', fd, m, 8192, 8192, 0), 10000 - 8192);
  t.is(Buffer.from(mem, 0, 1808).every((x) => x === 0x5a), true);
  // Past the registered memory: refused before it reaches the kernel, the good op still runs.
  const [bad, good] = await Promise.all([op(ring, 'read', fd, m, 0, 8192, 12288), op(ring, 'read', fd, m, 0, 4096, 0)]);
  t.is(bad, -22);
  t.is(good, 4096);
  t.is(await op(ring, 'read', fd, m + 1000, 0, 4096, 0), -22, 'an unregistered buffer index is refused');
  const pending = op(ring, 'read', fd, m, 0, 4096, 0);
  await new Promise((r) => process.nextTick(r)); // staged ops go to the kernel on the next tick
  // Completions are only reaped when the event loop polls the ring's eventfd: still in flight here.
  t.true(ring.inflight > 0);
  t.throws(() => ring.unregister(m), { message: /in flight/ });
  t.is(await pending, 4096);
  ring.unregister(m);
  t.throws(() => ring.unregister(m), { message: /not a registered buffer/ });
});

ringTest('unregisterWhenIdle waits for ops still staged (not yet in the kernel), then lets the memory go; one callback serves a whole batch', async (t) => {
  const file = path.join(scratchDir(t), 'staged.img');
  fs.writeFileSync(file, Buffer.alloc(16384, 0x33));
  const fd = fs.openSync(file, 'r');
  t.teardown(() => fs.closeSync(fd));
  const ring = ioRing()!;
  const mem = native().allocAligned(16384);
  const m = ring.register(mem);
  // Staged in this tick: the kernel knows nothing of it yet, so only the ring's own count holds the memory.
  const read = op(ring, 'read', fd, m, 4096, 4096, 0);
  const gone = ring.unregisterWhenIdle(m);
  t.is(await read, 4096);
  await gone;
  t.true(Buffer.from(mem, 0, 4096).every((x) => x === 0x33));
  t.throws(() => ring.unregister(m), { message: /not a registered buffer/ });
  // A batch: each result lands at its own index (the last one past the end of the file is short).
  const mem2 = native().allocAligned(16384);
  const m2 = ring.register(mem2);
  const res = await ring.batch(fd, false, m2, new Float64Array([0, 4096, 0, 12288, 8192, 4096, 8192, 4096, 12288]), false);
  t.deepEqual([...res], [4096, 4096, 4096]);
  const res2 = await ring.batch(fd, false, m2, new Float64Array([12288, 8192, 0, 0, 4096, 8192]), false);
  t.deepEqual([...res2], [4096, 4096]);
  await ring.unregisterWhenIdle(m2);
});
