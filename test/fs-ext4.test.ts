// The ext2/3/4 used-block map against e2fsprogs' own view: for many generated file systems (block
// sizes, features, sizes), after writing and deleting files so free space is fragmented, our map's
// free blocks must be exactly the union of dumpe2fs "Free blocks:" ranges. Plus the corrupt cases.
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { extReader } from '../src/fs/ext4';
import { CorruptFileSystemError, type UsedBlockMap } from '../src/fs/used-map';
import { dumpe2fs, type DumpInfo } from './helpers/dumpe2fs';
import { testIf } from './helpers/skip';
import { loopDevice, mount, rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const needs = testIf({ root: true, commands: ['mkfs.ext4', 'dumpe2fs', 'losetup', 'mount'] });
const needsTools = testIf({ commands: ['mkfs.ext4', 'dumpe2fs'] });

/** Asserts our map agrees with dumpe2fs block for block, and the tail/boot rules. */
function compare(t: ExecutionContext, map: UsedBlockMap, info: DumpInfo, deviceSize: number): void {
  t.is(map.blockSize, info.blockSize);
  t.is(map.totalBlocks, Math.ceil(deviceSize / info.blockSize));
  t.is(map.bitmap.size, map.totalBlocks);
  t.false(map.allBlocks);
  t.is(map.usedBlocks, map.bitmap.count());
  let mismatches = 0;
  const examples: string[] = [];
  for (let b = 0; b < info.blockCount; b++) {
    const expectUsed = !info.free.get(b);
    if (map.bitmap.get(b) !== expectUsed) {
      if (examples.length < 8) examples.push(`block ${b}: ours ${map.bitmap.get(b) ? 'used' : 'free'}, dumpe2fs ${expectUsed ? 'used' : 'free'}`);
      mismatches++;
    }
  }
  t.is(mismatches, 0, examples.join('; '));
  // The tail beyond the file system is copied; so is block 0 (boot block) on 1 KiB file systems.
  t.is(map.bitmap.count(info.blockCount, map.totalBlocks), map.totalBlocks - info.blockCount);
  t.true(map.bitmap.get(0));
}

async function readMap(file: string): Promise<UsedBlockMap & { ms: number }> {
  const dev = Device.open(file);
  try {
    const t0 = process.hrtime.bigint();
    const map = await extReader.read(dev);
    return { ...map, ms: Number(process.hrtime.bigint() - t0) / 1e6 };
  } finally {
    dev.close();
  }
}

/** Writes random files (random sizes, shared random content), deletes about half, writes a few more. */
function populate(dir: string, capacity: number, r: () => number): { written: number; deleted: number } {
  const chunk = Buffer.alloc(4 * MiB);
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((r() * 0x100000000) >>> 0, i);
  const target = Math.min(capacity * (0.3 + 0.4 * r()), 160 * MiB);
  let used = 0;
  const files: string[] = [];
  let n = 0;
  fs.mkdirSync(path.join(dir, 'd0'));
  while (used < target) {
    const big = r() < 0.15;
    const size = Math.floor(big ? r() * Math.min(8 * MiB, target / 4) : r() * 64 * 1024);
    const sub = path.join(dir, `d${n % 7}`);
    if (!fs.existsSync(sub)) fs.mkdirSync(sub);
    const f = path.join(sub, `f${n++}`);
    const fd = fs.openSync(f, 'w');
    try {
      let left = size;
      while (left > 0) {
        const k = Math.min(left, chunk.length);
        const off = Math.floor(r() * (chunk.length - k));
        fs.writeSync(fd, chunk, off, k);
        left -= k;
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOSPC') throw e;
      fs.closeSync(fd);
      break;
    }
    fs.closeSync(fd);
    files.push(f);
    used += size + 4096;
  }
  let deleted = 0;
  for (const f of files) if (r() < 0.5) { fs.unlinkSync(f); deleted++; }
  for (let i = 0; i < 20; i++) {
    try { fs.writeFileSync(path.join(dir, `late${i}`), chunk.subarray(0, Math.floor(r() * 256 * 1024))); } catch { break; }
  }
  return { written: files.length, deleted };
}

interface Config {
  name: string;
  mkfs: string[];
  sizeMiB: number;
  /** File system smaller than the device: `-b`-sized block count passed to mkfs. */
  fsMiB?: number;
  mount?: boolean;
}

const CONFIGS: Config[] = [
  { name: 'ext2 1K', mkfs: ['-t', 'ext2', '-b', '1024'], sizeMiB: 32 },
  { name: 'ext2 4K ^sparse_super', mkfs: ['-t', 'ext2', '-b', '4096', '-O', '^sparse_super,^resize_inode'], sizeMiB: 64 },
  { name: 'ext2 2K 128-byte inodes', mkfs: ['-t', 'ext2', '-b', '2048', '-I', '128'], sizeMiB: 24 },
  { name: 'ext3 1K', mkfs: ['-t', 'ext3', '-b', '1024'], sizeMiB: 48 },
  { name: 'ext3 2K', mkfs: ['-t', 'ext3', '-b', '2048'], sizeMiB: 100 },
  { name: 'ext3 4K meta_bg', mkfs: ['-t', 'ext3', '-b', '4096', '-O', 'meta_bg,^resize_inode'], sizeMiB: 200 },
  { name: 'ext4 4K default', mkfs: ['-t', 'ext4', '-b', '4096'], sizeMiB: 128 },
  { name: 'ext4 1K', mkfs: ['-t', 'ext4', '-b', '1024'], sizeMiB: 64 },
  { name: 'ext4 2K ^flex_bg', mkfs: ['-t', 'ext4', '-b', '2048', '-O', '^flex_bg'], sizeMiB: 300 },
  { name: 'ext4 4K 64bit lazy', mkfs: ['-t', 'ext4', '-b', '4096', '-O', '64bit'], sizeMiB: 600 },
  { name: 'ext4 4K ^64bit ^metadata_csum (uninit_bg, crc16)', mkfs: ['-t', 'ext4', '-b', '4096', '-O', '^64bit,^metadata_csum,uninit_bg'], sizeMiB: 256 },
  { name: 'ext4 4K no descriptor checksums', mkfs: ['-t', 'ext4', '-b', '4096', '-O', '^metadata_csum,^uninit_bg'], sizeMiB: 100 },
  { name: 'ext4 1K 64bit meta_bg', mkfs: ['-t', 'ext4', '-b', '1024', '-O', '64bit,meta_bg,^resize_inode'], sizeMiB: 80 },
  { name: 'ext4 2K 64bit meta_bg ^flex_bg', mkfs: ['-t', 'ext4', '-b', '2048', '-O', '64bit,meta_bg,^resize_inode,^flex_bg'], sizeMiB: 150 },
  { name: 'ext4 4K sparse_super2', mkfs: ['-t', 'ext4', '-b', '4096', '-O', 'sparse_super2'], sizeMiB: 200 },
  { name: 'ext4 4K no journal, flex 4', mkfs: ['-t', 'ext4', '-b', '4096', '-O', '^has_journal', '-G', '4'], sizeMiB: 400 },
  { name: 'ext4 4K metadata_csum, 25 small groups', mkfs: ['-t', 'ext4', '-b', '4096', '-g', '4096', '-O', 'metadata_csum'], sizeMiB: 400 },
  { name: 'ext4 1K 64bit flex_bg 16, 60 small groups', mkfs: ['-t', 'ext4', '-b', '1024', '-g', '1024', '-G', '16', '-O', '64bit'], sizeMiB: 60 },
  { name: 'ext3 4K, 40 small groups', mkfs: ['-t', 'ext3', '-b', '4096', '-g', '2048'], sizeMiB: 320 },
  { name: 'ext4 1K 128-byte inodes, 16 MiB', mkfs: ['-t', 'ext4', '-b', '1024', '-I', '128'], sizeMiB: 16 },
  { name: 'ext4 4K, device 40 MiB larger than the fs', mkfs: ['-t', 'ext4', '-b', '4096'], sizeMiB: 120, fsMiB: 80 },
  { name: 'ext2 1K, device tail', mkfs: ['-t', 'ext2', '-b', '1024'], sizeMiB: 21, fsMiB: 17 },
];

for (const cfg of CONFIGS) {
  needs(`ext map equals dumpe2fs: ${cfg.name}`, async (t) => {
    const seed = seedFromEnv(t);
    const r = rng(seed);
    const dir = scratchDir(t);
    // Vary the size a little per run so the last group's partial size changes.
    const jitterBlocks = Math.floor(r() * 64) * 4096;
    const size = cfg.sizeMiB * MiB + jitterBlocks;
    const img = sparseFile(path.join(dir, 'fs.img'), size);
    const args = ['-q', '-F', ...cfg.mkfs, img];
    if (cfg.fsMiB) args.push(`${cfg.fsMiB}M`);
    run('mke2fs', args);
    const loop = loopDevice(t, img);
    const mnt = mount(t, loop, path.join(dir, 'mnt'));
    const stats = populate(mnt, (cfg.fsMiB ?? cfg.sizeMiB) * MiB, r);
    run('umount', [mnt]);
    runStatus('blockdev', ['--flushbufs', loop]);
    const info = dumpe2fs(img);
    const map = await readMap(img);
    t.log(`${map.notes.join('; ')}; ${stats.written} files written, ${stats.deleted} deleted; ${map.usedBlocks}/${map.totalBlocks} blocks used`);
    t.is(map.filesystem, cfg.mkfs[1] as 'ext2' | 'ext3' | 'ext4');
    compare(t, map, info, size);
    t.true(map.notes[0]!.startsWith(`${cfg.mkfs[1]}, ${info.blockSize}-byte blocks,`));
  });
}

needsTools('ext map equals dumpe2fs: 64 KiB blocks, populated by mke2fs -d (no mount)', async (t) => {
  const dir = scratchDir(t);
  const src = path.join(dir, 'src');
  fs.mkdirSync(src);
  const r = rng(seedFromEnv(t));
  for (let i = 0; i < 40; i++) fs.writeFileSync(path.join(src, `f${i}`), Buffer.alloc(Math.floor(r() * 300000), i));
  const img = sparseFile(path.join(dir, 'fs.img'), 200 * MiB);
  run('mkfs.ext4', ['-q', '-F', '-b', '65536', '-d', src, img]);
  const info = dumpe2fs(img);
  const map = await readMap(img);
  t.log(map.notes.join('; '));
  t.is(map.filesystem, 'ext4');
  compare(t, map, info, 200 * MiB);
});

needsTools('a fresh 1 TiB sparse ext4 (8192 groups, mostly BLOCK_UNINIT) matches dumpe2fs and reads fast', async (t) => {
  const dir = scratchDir(t);
  const img = sparseFile(path.join(dir, 'big.img'), 1024 * 1024 * MiB);
  run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=1,lazy_journal_init=1,nodiscard', img]);
  const info = dumpe2fs(img);
  await readMap(img); // warm the page cache for a fair timing
  const map = await readMap(img);
  t.log(`${map.notes.join('; ')}; read in ${map.ms.toFixed(1)} ms`);
  compare(t, map, info, 1024 * 1024 * MiB);
  t.true(map.ms < 1000, `reading the map of a 1 TiB file system took ${map.ms} ms`);
});

needs('a 2 GiB ext4 about half full reads in well under 100 ms', async (t) => {
  const dir = scratchDir(t);
  const img = sparseFile(path.join(dir, 'fs.img'), 2048 * MiB);
  run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=1,lazy_journal_init=1', img]);
  const loop = loopDevice(t, img);
  const mnt = mount(t, loop, path.join(dir, 'mnt'));
  for (let i = 0; i < 200; i++) run('fallocate', ['-l', `${1 + (i % 9)}M`, path.join(mnt, `f${i}`)]);
  for (let i = 0; i < 200; i += 3) fs.unlinkSync(path.join(mnt, `f${i}`));
  run('umount', [mnt]);
  const info = dumpe2fs(img);
  await readMap(img);
  const times: number[] = [];
  let map: Awaited<ReturnType<typeof readMap>> | undefined;
  for (let i = 0; i < 5; i++) { map = await readMap(img); times.push(map.ms); }
  const best = Math.min(...times);
  t.log(`${map!.notes.join('; ')}; best of 5: ${best.toFixed(1)} ms`);
  compare(t, map!, info, 2048 * MiB);
  t.true(best < 100, `2 GiB map took ${best} ms`);
});

// ---- corrupt and foreign input ---------------------------------------------------------------

function makeImage(t: ExecutionContext, mkfs: string[], sizeMiB = 32): { img: string; buf: Buffer } {
  const dir = scratchDir(t);
  const img = sparseFile(path.join(dir, 'fs.img'), sizeMiB * MiB);
  run('mkfs.ext4', ['-q', '-F', ...mkfs, img]);
  return { img, buf: fs.readFileSync(img) };
}

async function expectCorrupt(t: ExecutionContext, img: string, buf: Buffer, pattern: RegExp): Promise<void> {
  fs.writeFileSync(img, buf);
  const dev = Device.open(img);
  try {
    const e = await t.throwsAsync(extReader.read(dev), { instanceOf: CorruptFileSystemError });
    t.regex(e!.message, pattern);
    t.log(e!.message);
  } finally {
    dev.close();
  }
}

needsTools('corrupt superblock: impossible block size is refused by name', async (t) => {
  const { img, buf } = makeImage(t, ['-b', '4096', '-O', '^metadata_csum']);
  buf.writeUInt32LE(40, 1024 + 0x18);
  await expectCorrupt(t, img, buf, /s_log_block_size=40/);
});

needsTools('corrupt superblock: metadata_csum checksum mismatch', async (t) => {
  const { img, buf } = makeImage(t, ['-b', '4096', '-O', 'metadata_csum']);
  buf.writeUInt32LE(buf.readUInt32LE(1024 + 0x2c) ^ 0x5a5a, 1024 + 0x2c); // s_mtime
  await expectCorrupt(t, img, buf, /superblock checksum mismatch/);
});

needsTools('corrupt group descriptor: block bitmap past the end of the file system', async (t) => {
  const { img, buf } = makeImage(t, ['-b', '4096', '-O', '^metadata_csum,^uninit_bg']);
  // 4 KiB blocks: descriptors start at block 1; descriptor 0 (32 bytes), block bitmap low word.
  buf.writeUInt32LE(0x7fffff00, 4096 + 0);
  await expectCorrupt(t, img, buf, /group descriptor 0 points its block bitmap to block 2147483392, .*past the end of the file system/);
});

needsTools('corrupt group descriptor: 64-bit bitmap pointer past the end (checked before the checksum)', async (t) => {
  const { img, buf } = makeImage(t, ['-b', '1024', '-O', '64bit,metadata_csum'], 40);
  // 1 KiB blocks: descriptors at block 2, 64 bytes each; descriptor 3's block bitmap high word.
  buf.writeUInt32LE(1, 2048 + 3 * 64 + 0x20);
  await expectCorrupt(t, img, buf, /group descriptor 3 points its block bitmap to block 42949\d+, .*past the end/);
});

needsTools('corrupt group descriptor: checksum mismatch (metadata_csum and crc16)', async (t) => {
  for (const feat of ['metadata_csum', '^metadata_csum,uninit_bg']) {
    const { img, buf } = makeImage(t, ['-b', '4096', '-O', feat], 200);
    const descSize = buf.readUInt32LE(1024 + 0x60) & 0x80 ? buf.readUInt16LE(1024 + 0xfe) : 32;
    const at = 4096 + descSize + 0xc; // group 1 free block count
    buf.writeUInt16LE(buf.readUInt16LE(at) ^ 1, at);
    await expectCorrupt(t, img, buf, /group descriptor 1 checksum mismatch/);
  }
});

needsTools('a truncated image (file system larger than the device) is refused', async (t) => {
  const { img, buf } = makeImage(t, ['-b', '4096'], 64);
  await expectCorrupt(t, img, buf.subarray(0, 40 * MiB), /larger than the device/);
});

needsTools('bigalloc: not supported, so every block is copied and the note says so', async (t) => {
  const { img } = makeImage(t, ['-b', '4096', '-O', 'bigalloc', '-C', '65536'], 64);
  const map = await readMap(img);
  t.true(map.allBlocks);
  t.is(map.usedBlocks, map.totalBlocks);
  t.regex(map.notes.join('\n'), /bigalloc.*every block is copied/);
});

needsTools('probe: only the ext magic counts', async (t) => {
  const { img, buf } = makeImage(t, ['-b', '4096']);
  let dev = Device.open(img);
  t.true(await extReader.probe(dev));
  dev.close();
  buf.writeUInt16LE(0x1234, 1024 + 56);
  fs.writeFileSync(img, buf);
  dev = Device.open(img);
  try {
    t.false(await extReader.probe(dev));
    await t.throwsAsync(extReader.read(dev), { instanceOf: CorruptFileSystemError, message: /no ext2\/3\/4 magic/ });
  } finally {
    dev.close();
  }
});
