// The addon through its typed wrapper: batched O_DIRECT I/O on both engines, clear open errors.
import * as fs from 'node:fs';
import * as path from 'node:path';
import test from 'ava';
import { Device } from '../src/device/device';
import { native } from '../src/device/native';
import { UserError } from '../src/util/errors';
import { rng, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

for (const engine of ['default', 'threadpool'] as const) {
  test.serial(`readBatch/writeBatch round-trip many segments (${engine} engine)`, async (t) => {
    if (engine === 'threadpool') process.env.LIVESNAP_IO_ENGINE = 'threadpool';
    t.teardown(() => { delete process.env.LIVESNAP_IO_ENGINE; });
    const seed = seedFromEnv(t);
    const r = rng(seed);
    const file = sparseFile(path.join(scratchDir(t), 'dev.img'), 64 << 20);
    const dev = Device.open(file, { write: true });
    t.teardown(() => dev.close());
    const n = 300;
    const buf = native().allocAligned(n * 4096);
    const bytes = new Uint8Array(buf);
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(r() * 256);
    const segs = new Float64Array(n * 3);
    const blocks = new Set<number>();
    for (let i = 0; i < n; i++) {
      let b: number;
      do { b = Math.floor(r() * (16384 - 1)); } while (blocks.has(b));
      blocks.add(b);
      segs[i * 3] = b * 4096; segs[i * 3 + 1] = 4096; segs[i * 3 + 2] = i * 4096;
    }
    const w = await dev.writeBatch(buf, segs);
    t.true(w.every((x) => x === 4096));
    await dev.sync();
    const back = native().allocAligned(n * 4096);
    const rd = await dev.readBatch(back, segs);
    t.true(rd.every((x) => x === 4096));
    t.true(Buffer.from(back).equals(Buffer.from(buf)));
    // The same bytes through the page cache (a different path than ours).
    const fd = fs.openSync(file, 'r');
    const one = Buffer.alloc(4096);
    fs.readSync(fd, one, 0, 4096, segs[0]!);
    fs.closeSync(fd);
    t.true(one.equals(Buffer.from(buf, 0, 4096)));
  });
}

test('reads past the end are short, bad segments are refused', async (t) => {
  const file = sparseFile(path.join(scratchDir(t), 'small.img'), 8192);
  const dev = Device.open(file);
  t.teardown(() => dev.close());
  const buf = native().allocAligned(16384);
  const res = await dev.readBatch(buf, new Float64Array([4096, 8192, 0]));
  t.is(res[0], 4096);
  t.throws(() => dev.readBatch(buf, new Float64Array([0, 4096, 16384])), { message: /outside the buffer/ });
  t.throws(() => dev.readBatch(buf, new Float64Array([0, 4096])), { message: /triplets/ });
});

test('aligned memory from 1 MiB is mapped on demand: zeroed, costs only the pages touched, and zeroAligned gives its pages back', (t) => {
  const resident = () => Number(/^VmRSS:\s+(\d+)/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;
  const before = resident();
  const big = native().allocAligned(256 << 20);
  t.true(resident() - before < 64 << 20, 'a fresh 256 MiB buffer is not resident');
  const b = new Uint8Array(big);
  t.is(b[0], 0);
  t.is(b[b.length - 1], 0);
  b.fill(0xa5, 0, 8 << 20);
  t.true(native().zeroAligned(big), 'a mapped buffer is zeroed by giving its pages back');
  t.true(b.subarray(0, 8 << 20).every((x) => x === 0));
  const small = native().allocAligned(64 << 10);
  new Uint8Array(small).fill(1);
  t.false(native().zeroAligned(small), 'a small buffer is left alone (the caller zeroes it)');
  t.is(new Uint8Array(small)[0], 1);
});

test('open errors name the path and say what to do', (t) => {
  const dir = scratchDir(t);
  t.throws(() => Device.open(path.join(dir, 'nope')), { instanceOf: UserError, message: /no such file or device/ });
  t.throws(() => Device.open(dir), { instanceOf: UserError, message: /is a directory/ });
  if (fs.existsSync('/dev/shm') && fs.statSync('/dev/shm').isDirectory()) {
    const f = path.join(fs.mkdtempSync('/dev/shm/livesnap-'), 'x.img');
    t.teardown(() => fs.rmSync(path.dirname(f), { recursive: true, force: true }));
    fs.writeFileSync(f, Buffer.alloc(4096));
    let refuses = false;
    try { native().close(native().open(f, { direct: true })); } catch (e) { refuses = (e as { code?: string }).code === 'EINVAL'; }
    if (refuses) {
      t.throws(() => Device.open(f), { instanceOf: UserError, message: new RegExp(`${f}: the file system holding it refuses O_DIRECT`) });
    } else {
      // Linux >= 6.6 gives tmpfs O_DIRECT: then the open must simply work.
      t.log('tmpfs accepts O_DIRECT on this kernel; checked that opening works instead');
      Device.open(f).close();
    }
  }
});

test('fiemap lists a file\'s extents; xxh128 matches the reference value', async (t) => {
  const f = path.join(scratchDir(t), 'ext.bin');
  fs.writeFileSync(f, Buffer.alloc(1 << 20, 1));
  const e = await native().fiemap(f);
  t.true(e.length >= 4);
  let total = 0;
  for (let i = 0; i < e.length; i += 4) total += e[i + 2]!;
  t.is(total, 1 << 20);
  t.is(native().xxh128(new Uint8Array(0)).toString('hex'), '99aa06d3014798d86001c324468d497f');
});
