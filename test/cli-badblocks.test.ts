// --on-error abort|ignore against a device with real unreadable blocks (see helpers/badblocks.ts).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { lastJson, livesnap } from './helpers/cli';
import { deviceWithBadRanges } from './helpers/badblocks';
import { testIf } from './helpers/skip';
import { scratchDir } from './helpers/system';

const needs = testIf({ root: true, commands: ['nbdkit', 'nbdfuse', 'fusermount3', 'losetup'] });

function patterned(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 512) b.writeUInt32LE(i / 512 + 1, i);
  return b;
}

needs('unreadable blocks: abort stops cleanly naming the block, ignore writes zeros and lists them', async (t) => {
  const dir = scratchDir(t);
  const data = patterned(16 << 20);
  const image = path.join(dir, 'source.img');
  fs.writeFileSync(image, data);
  // Two bad 4 KiB blocks: 256 and 1000 (no file system: every block is used, 4096-byte units).
  const dev = await deviceWithBadRanges(t, dir, image, [[256 * 4096, 4096], [1000 * 4096, 4096]]);

  const out = path.join(dir, 'out.img');
  const a = livesnap(['backup', dev, '--to', out]);
  t.is(a.status, 1);
  t.regex(a.stderr, /block 256 \(byte offset 1048576\) of .* cannot be read/);
  t.regex(a.stderr, /--on-error ignore/);
  t.false(fs.existsSync(out));
  t.false(fs.existsSync(`${out}.partial`));

  const i = livesnap(['backup', dev, '--to', out, '--on-error', 'ignore', '--json']);
  t.is(i.status, 0, i.stderr);
  const done = lastJson(i.stdout);
  t.deepEqual(done.badBlocks, [256, 1000]);
  const expected = Buffer.from(data);
  expected.fill(0, 256 * 4096, 257 * 4096);
  expected.fill(0, 1000 * 4096, 1001 * 4096);
  t.true(fs.readFileSync(out).equals(expected));
});
