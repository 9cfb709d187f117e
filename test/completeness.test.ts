// A backup never reports success while holding less than its map. A copy engine that skips, repeats
// or strays cannot be produced for real (that would be a bug), so these drive the check with a
// hand-made batch sequence standing in for a faulty engine, in front of a real image sink.
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { native } from '../src/device/native';
import { CompletenessCheck, IncompleteBackupError } from '../src/sink/completeness';
import { ImageSink } from '../src/sink/image-sink';
import type { VolumeInfo } from '../src/sink/sink';
import { Bitset } from '../src/util/bitset';
import { scratchDir } from './helpers/system';

const BS = 512; // 2^33 blocks of 512 bytes: 4 TiB, a sparse file ext4 can hold
const BLOCKS = 2 ** 33;

function volume(): VolumeInfo {
  return { source: 'test', size: BLOCKS * BS, blockSize: BS, totalBlocks: BLOCKS, usedBlocks: 4, filesystem: 'unknown', snapshotTime: new Date(), notes: [], toolVersion: 'test' };
}

function usedMap(): Bitset {
  const u = new Bitset(BLOCKS);
  u.setRange(10, 12);
  u.setRange(2 ** 32 + 5, 2 ** 32 + 7);
  return u;
}

const buffer = native().allocAligned(2 * BS, 4096);
const batch = (block: number, n = 2) => ({ buffer, segments: Float64Array.of(block * BS, n * BS, 0) });

test('every block of the map delivered once: the image is finished', async (t) => {
  const dir = scratchDir(t);
  const target = path.join(dir, 'ok.img');
  const sink = new CompletenessCheck(new ImageSink(target));
  await sink.begin(volume(), usedMap());
  await sink.write(batch(2 ** 32 + 5));
  await sink.write(batch(10));
  await sink.finish({ badBlocks: [] });
  t.true(fs.existsSync(target));
  t.is(sink.blocksDelivered, 4);
});

test('a block missing at the end fails the backup, naming it; abort leaves no image', async (t) => {
  const dir = scratchDir(t);
  const target = path.join(dir, 'short.img');
  const sink = new CompletenessCheck(new ImageSink(target));
  await sink.begin(volume(), usedMap());
  await sink.write(batch(10));
  await sink.write(batch(2 ** 32 + 5, 1));
  const e = await t.throwsAsync(sink.finish({ badBlocks: [] }), { instanceOf: IncompleteBackupError });
  t.regex(e!.message, /3 of the 4 blocks in the map reached image .*short\.img \(1 missing, the first is block 4294967302\)/);
  await sink.abort(e!);
  t.false(fs.existsSync(target));
  t.false(fs.existsSync(target + '.partial'));
});

test('a block sent twice or outside the map is refused at once', async (t) => {
  const dir = scratchDir(t);
  const twice = new CompletenessCheck(new ImageSink(path.join(dir, 'twice.img')));
  await twice.begin(volume(), usedMap());
  await twice.write(batch(10));
  const e1 = await t.throwsAsync(twice.write(batch(11, 1)), { instanceOf: IncompleteBackupError });
  t.regex(e1!.message, /block 11 was sent to .* twice/);
  await twice.abort(e1!);
  const stray = new CompletenessCheck(new ImageSink(path.join(dir, 'stray.img')));
  await stray.begin(volume(), usedMap());
  // Block 5 is the 32-bit alias of nothing; 2^32 + 10 is 10's alias: neither is in the map.
  const e2 = await t.throwsAsync(stray.write(batch(2 ** 32 + 10)), { instanceOf: IncompleteBackupError });
  t.regex(e2!.message, /map does not hold block 4294967306/);
  await stray.abort(e2!);
});
