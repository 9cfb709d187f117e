// Fuzzing the ext2/3/4 reader: random byte flips in the superblock, the group descriptors and
// (for a crash image) the journal. read() must either return a well-formed map or throw
// CorruptFileSystemError: never another exception, never a read outside the device, never a hang.
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { BlockReader } from '../src/device/device';
import { extReader } from '../src/fs/ext4';
import { CorruptFileSystemError, type UsedBlockMap } from '../src/fs/used-map';
import { testIf } from './helpers/skip';
import { loopDevice, mount, rng, run, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const needsTools = testIf({ commands: ['mkfs.ext4'] });
const needsRoot = testIf({ root: true, commands: ['mkfs.ext4', 'losetup', 'mount'] });

/**
 * A BlockReader over a Buffer plus a few patched bytes (so 300 mutants do not copy the whole image
 * 300 times), refusing reads outside it as Device does.
 */
class MemoryReader implements BlockReader {
  reads = 0;
  constructor(private readonly buf: Buffer, private readonly patches = new Map<number, number>()) {}
  get size(): number {
    return this.buf.length;
  }
  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.readMany([{ offset, length }]))[0]!;
  }
  async readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    this.reads++;
    return ranges.map(({ offset, length }) => {
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.buf.length) {
        throw new RangeError(`read of ${length} bytes at ${offset} is outside the ${this.buf.length}-byte device`);
      }
      const out = Buffer.from(this.buf.subarray(offset, offset + length));
      for (const [at, v] of this.patches) if (at >= offset && at < offset + length) out[at - offset] = v;
      return out;
    });
  }
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<T>((_, reject) => { timer = setTimeout(() => reject(new Error(`read() did not finish within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(timer));
}

interface Target {
  /** Byte ranges to flip bytes in. */
  regions: Array<[number, number]>;
}

/** Regions worth fuzzing: the superblock, the primary descriptor blocks, optionally more. */
function regionsOf(img: Buffer, extra: Array<[number, number]> = []): Target {
  const bs = 1024 << img.readUInt32LE(1024 + 0x18);
  const gdtStart = (Math.floor(1024 / bs) + 1) * bs;
  return { regions: [[1024, 2048], [1024, 1024 + 0x180], [gdtStart, gdtStart + 2 * bs], ...extra] };
}

async function fuzz(t: ExecutionContext, base: Buffer, target: Target, iterations: number, seed: number): Promise<void> {
  const r = rng(seed);
  const outcomes = { map: 0, corrupt: 0, allBlocks: 0 };
  const messages = new Map<string, number>();
  // The unmodified image must read cleanly.
  const clean = await extReader.read(new MemoryReader(base));
  t.false(clean.allBlocks && !clean.notes.some((n) => /journal/.test(n)), clean.notes.join('; '));
  for (let i = 0; i < iterations; i++) {
    const patches = new Map<number, number>();
    const flips = 1 + Math.floor(r() * 4);
    const what: string[] = [];
    for (let k = 0; k < flips; k++) {
      const [a, b] = target.regions[Math.floor(r() * target.regions.length)]!;
      const at = a + Math.floor(r() * (b - a));
      const v = r() < 0.3 ? 0xff : r() < 0.5 ? 0 : Math.floor(r() * 256);
      what.push(`${at}=${v}`);
      patches.set(at, v);
    }
    const reader = new MemoryReader(base, patches);
    let map: UsedBlockMap | undefined;
    try {
      map = await withTimeout(extReader.read(reader), 5000);
    } catch (e) {
      if (e instanceof CorruptFileSystemError) {
        outcomes.corrupt++;
        const key = e.message.replace(/\d+/g, 'N').replace(/0xN?[0-9a-f]*/g, '0x…');
        messages.set(key, (messages.get(key) ?? 0) + 1);
        continue;
      }
      t.fail(`iteration ${i} (flips ${what.join(', ')}): ${(e as Error).stack}`);
      return;
    }
    outcomes.map++;
    if (map.allBlocks) outcomes.allBlocks++;
    const ok = [1024, 2048, 4096, 8192, 16384, 32768, 65536].includes(map.blockSize)
      && map.totalBlocks === Math.ceil(base.length / map.blockSize)
      && map.bitmap.size === map.totalBlocks
      && map.usedBlocks === map.bitmap.count()
      && map.usedBlocks <= map.totalBlocks
      && map.bitmap.get(0)
      && ['ext2', 'ext3', 'ext4'].includes(map.filesystem)
      && map.notes.length > 0;
    if (!ok) {
      t.fail(`iteration ${i} (flips ${what.join(', ')}): inconsistent map ${JSON.stringify({ ...map, bitmap: undefined })}`);
      return;
    }
  }
  t.log(`${iterations} iterations: ${outcomes.map} maps (${outcomes.allBlocks} every-block), ${outcomes.corrupt} CorruptFileSystemError`);
  for (const [m, n] of [...messages].sort((a, b) => b[1] - a[1]).slice(0, 6)) t.log(`  ${n} x ${m}`);
  t.is(outcomes.map + outcomes.corrupt, iterations);
}

function mkImage(t: ExecutionContext, args: string[], sizeMiB: number): Buffer {
  const dir = scratchDir(t);
  const img = sparseFile(path.join(dir, 'fs.img'), sizeMiB * MiB);
  run('mke2fs', ['-q', '-F', ...args, img]);
  return fs.readFileSync(img);
}

const IMAGES: Array<{ name: string; args: string[]; sizeMiB: number }> = [
  { name: 'ext2 1K', args: ['-t', 'ext2', '-b', '1024'], sizeMiB: 12 },
  { name: 'ext4 4K no checksums, 8 groups', args: ['-t', 'ext4', '-b', '4096', '-g', '2048', '-O', '^metadata_csum,^uninit_bg'], sizeMiB: 64 },
  { name: 'ext4 2K uninit_bg (crc16) 64bit', args: ['-t', 'ext4', '-b', '2048', '-g', '4096', '-O', '^metadata_csum,uninit_bg,64bit'], sizeMiB: 48 },
  { name: 'ext4 1K metadata_csum meta_bg', args: ['-t', 'ext4', '-b', '1024', '-O', 'meta_bg,^resize_inode'], sizeMiB: 24 },
];

for (const im of IMAGES) {
  needsTools(`fuzz superblock and group descriptors: ${im.name}`, async (t) => {
    const seed = seedFromEnv(t);
    const base = mkImage(t, im.args, im.sizeMiB);
    await fuzz(t, base, regionsOf(base), 300, seed);
  });
}

needsRoot('fuzz a crash image: superblock, descriptors and journal blocks', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const dir = scratchDir(t);
  const img = sparseFile(path.join(dir, 'fs.img'), 32 * MiB);
  run('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '1024', '-O', '^metadata_csum', '-E', 'lazy_itable_init=0', img]);
  const loop = loopDevice(t, img);
  const mnt = mount(t, loop, path.join(dir, 'mnt'));
  for (let i = 0; i < 30; i++) {
    const fd = fs.openSync(path.join(mnt, `f${i}`), 'w');
    fs.writeSync(fd, Buffer.alloc(1000 + Math.floor(r() * 100000), 7));
    fs.fsyncSync(fd);
    fs.closeSync(fd);
  }
  const crash = path.join(dir, 'crash.img');
  run('cp', ['--sparse=always', img, crash]);
  const base = fs.readFileSync(crash);
  const clean = await extReader.read(new MemoryReader(base));
  t.log(clean.notes.join('; '));
  t.regex(clean.notes.join('\n'), /journal needs recovery: used the newest committed journal copies/);
  // The journal's first blocks: find them through debugfs-free means: the journal superblock is
  // the first block carrying the jbd2 magic and type 4 (v2 superblock).
  let jsb = -1;
  for (let off = 0; off + 12 <= base.length; off += 1024) {
    if (base.readUInt32BE(off) === 0xc03b3998 && base.readUInt32BE(off + 4) === 4) { jsb = off; break; }
  }
  t.true(jsb > 0);
  const target = regionsOf(base, [[jsb, jsb + 1024], [jsb + 1024, jsb + 64 * 1024], [jsb + 0x10, jsb + 0x30]]);
  await fuzz(t, base, target, 300, seed ^ 0x5555);
});
