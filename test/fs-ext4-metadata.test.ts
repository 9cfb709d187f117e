// The ext2/3/4 metadata-block map (--hold metadata) against e2fsprogs' own idea of metadata:
// `e2image -r` writes exactly the metadata blocks of a file system (superblocks, descriptors,
// bitmaps, inode tables, directories, extent-tree and indirect blocks, xattr blocks, the journal);
// every non-zero block of its image must be in our map. File data must not be (checked on a large
// fragmented file), and the map lies inside the used-block map.
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { extReader } from '../src/fs/ext4';
import { readExtMetadata } from '../src/fs/ext4-metadata';
import { readMetadataMap, type MetadataMap } from '../src/fs/metadata-map';
import { CorruptFileSystemError } from '../src/fs/used-map';
import { UserError } from '../src/util/errors';
import type { BlockReader } from '../src/device/device';
import { testIf } from './helpers/skip';
import { loopDevice, mount, rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;

/** A whole image in memory (the fuzz mutates copies of it). */
class BufferReader implements BlockReader {
  constructor(private readonly buf: Buffer) {}
  get size(): number { return this.buf.length; }
  async read(offset: number, length: number): Promise<Buffer> { return (await this.readMany([{ offset, length }]))[0]!; }
  async readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    await Promise.resolve();
    return ranges.map((x) => {
      if (!(x.offset >= 0 && x.length >= 0 && x.offset + x.length <= this.buf.length)) throw new RangeError(`read of ${x.length} at ${x.offset} outside the image`);
      return Buffer.from(this.buf.subarray(x.offset, x.offset + x.length));
    });
  }
}
const needs = testIf({ root: true, commands: ['mke2fs', 'e2image', 'debugfs', 'losetup', 'mount'] });
const needsTools = testIf({ commands: ['mke2fs', 'mkfs.btrfs'] });

async function readMeta(file: string): Promise<MetadataMap> {
  const dev = Device.open(file);
  try { return await readExtMetadata(dev); } finally { dev.close(); }
}

/** Blocks e2image -r wrote (non-zero ones), by file-system block number. */
function e2imageBlocks(img: string, out: string, blockSize: number): number[] {
  run('e2image', ['-r', img, out]);
  const fd = fs.openSync(out, 'r');
  const blocks: number[] = [];
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (let pos = 0; ; pos += buf.length) {
      const n = fs.readSync(fd, buf, 0, buf.length, pos);
      if (n <= 0) break;
      for (let o = 0; o < n; o += blockSize) {
        const blk = buf.subarray(o, Math.min(n, o + blockSize));
        if (blk.some((x) => x !== 0)) blocks.push((pos + o) / blockSize);
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return blocks;
}

/** Files of every kind whose blocks are metadata, and a large fragmented file whose data is not. */
function populate(mnt: string, r: () => number): string {
  const big = path.join(mnt, 'dir-big');
  fs.mkdirSync(big);
  // Thousands of entries: a multi-block (htree) directory.
  for (let i = 0; i < 3000; i++) fs.writeFileSync(path.join(big, `entry-${i}-${'x'.repeat(20 + (i % 40))}`), i % 5 === 0 ? Buffer.alloc(5000, i) : '');
  for (let d = 0; d < 30; d++) {
    const sub = path.join(mnt, `d${d}`, `e${d % 3}`);
    fs.mkdirSync(sub, { recursive: true });
    for (let i = 0; i < 20; i++) fs.writeFileSync(path.join(sub, `f${i}`), Buffer.alloc(Math.floor(r() * 40000), d));
  }
  // Slow symlinks (target longer than the 60 bytes i_block holds) and fast ones.
  for (let i = 0; i < 20; i++) fs.symlinkSync(`/${'long-target-'.repeat(8)}${i}`, path.join(mnt, `slow-link-${i}`));
  for (let i = 0; i < 20; i++) fs.symlinkSync(`t${i}`, path.join(mnt, `fast-link-${i}`));
  // A fragmented file: every other 4 KiB written, so its extents (or indirect blocks) spill out of the inode.
  const frag = path.join(mnt, 'fragmented');
  const fd = fs.openSync(frag, 'w');
  const block = Buffer.alloc(4096, 0xab);
  for (let i = 0; i < 1500; i++) fs.writeSync(fd, block, 0, block.length, i * 8192);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  // Deleted files leave freed metadata behind (must not matter).
  for (let i = 0; i < 3000; i += 7) fs.unlinkSync(path.join(big, `entry-${i}-${'x'.repeat(20 + (i % 40))}`));
  return frag;
}

interface Config { name: string; mkfs: string[]; sizeMiB: number }
const CONFIGS: Config[] = [
  { name: 'ext4 4K default', mkfs: ['-t', 'ext4', '-b', '4096'], sizeMiB: 128 },
  { name: 'ext4 1K 64bit metadata_csum', mkfs: ['-t', 'ext4', '-b', '1024', '-O', '64bit,metadata_csum'], sizeMiB: 96 },
  { name: 'ext4 2K ^flex_bg meta_bg', mkfs: ['-t', 'ext4', '-b', '2048', '-O', '^flex_bg,meta_bg,^resize_inode'], sizeMiB: 120 },
  { name: 'ext4 4K inline_data', mkfs: ['-t', 'ext4', '-b', '4096', '-O', 'inline_data'], sizeMiB: 128 },
  { name: 'ext3 1K (indirect blocks)', mkfs: ['-t', 'ext3', '-b', '1024'], sizeMiB: 96 },
  { name: 'ext2 4K', mkfs: ['-t', 'ext2', '-b', '4096'], sizeMiB: 100 },
];

function compare(t: ExecutionContext, meta: MetadataMap, reference: number[], usedMap: { bitmap: { get(i: number): boolean } }, dataBlocks: number[]): void {
  const missing = reference.filter((b) => !meta.bitmap.get(b));
  t.is(missing.length, 0, `metadata blocks e2image wrote but the map lacks: ${missing.slice(0, 12).join(', ')}${missing.length > 12 ? ', ...' : ''}`);
  let outside = 0;
  for (const [s, e] of meta.bitmap.runs()) for (let b = s; b < e; b++) if (!usedMap.bitmap.get(b)) outside++;
  t.is(outside, 0, 'metadata blocks the used map calls free');
  const dataIn = dataBlocks.filter((b) => meta.bitmap.get(b));
  t.is(dataIn.length, 0, `file data blocks in the metadata map: ${dataIn.slice(0, 8).join(', ')}`);
  // Not "everything": the map stays near what e2image itself holds.
  t.true(meta.bitmap.setCount < reference.length * 3 + 4096, `${meta.bitmap.setCount} metadata blocks vs ${reference.length} from e2image`);
}

/** Physical blocks of a file's data, from debugfs (extents or block map, data only). */
function dataBlocksOf(img: string, file: string): number[] {
  const out = run('debugfs', ['-R', `blocks ${file}`, img]);
  return out.split(/\s+/).filter(Boolean).map(Number);
}

for (const cfg of CONFIGS) {
  needs(`ext metadata map covers e2image -r: ${cfg.name}`, async (t) => {
    const r = rng(seedFromEnv(t));
    const dir = scratchDir(t);
    const img = sparseFile(path.join(dir, 'fs.img'), cfg.sizeMiB * MiB);
    run('mke2fs', ['-q', '-F', ...cfg.mkfs, img]);
    const loop = loopDevice(t, img);
    const mnt = mount(t, loop, path.join(dir, 'mnt'));
    populate(mnt, r);
    run('umount', [mnt]);
    runStatus('blockdev', ['--flushbufs', loop]);
    // xattrs large enough for an external xattr block (debugfs writes them on the unmounted image).
    for (let i = 0; i < 8; i++) run('debugfs', ['-w', '-R', `ea_set /d${i}/e${i % 3}/f0 user.big ${'v'.repeat(400 + i)}`, img]);
    const meta = await readMeta(img);
    const dev = Device.open(img);
    const used = await extReader.read(dev).finally(() => dev.close());
    const reference = e2imageBlocks(img, path.join(dir, 'meta.raw'), meta.blockSize);
    // debugfs lists the file's tree blocks too: those e2image wrote are metadata, the rest data.
    const refSet = new Set(reference);
    const data = dataBlocksOf(img, '/fragmented').filter((b) => !refSet.has(b));
    t.log(`${meta.notes.join('; ')}; ${meta.bitmap.setCount} metadata blocks, e2image ${reference.length} non-zero, used ${used.usedBlocks}, fragmented file ${data.length} data blocks`);
    t.true(data.length >= 1500);
    t.regex(meta.notes[0]!, /xattr blocks/);
    t.notRegex(meta.notes[0]!, / 0 xattr blocks/);
    compare(t, meta, reference, used, data);
  });
}

needs('ext metadata map of a mounted file system whose journal needs recovery covers e2image -r of the replayed copy', async (t) => {
  const r = rng(seedFromEnv(t));
  const dir = scratchDir(t);
  const img = sparseFile(path.join(dir, 'fs.img'), 128 * MiB);
  run('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0', img]);
  const loop = loopDevice(t, img);
  const mnt = mount(t, loop, path.join(dir, 'mnt'));
  run('sync', []);
  // Work that reaches the journal only: new directories and their entries, fsynced.
  for (let d = 0; d < 10; d++) {
    const sub = path.join(mnt, `new${d}`);
    fs.mkdirSync(sub);
    for (let i = 0; i < 200; i++) fs.writeFileSync(path.join(sub, `a-rather-long-entry-name-${i}`), Buffer.alloc(Math.floor(r() * 3000)));
    const fd = fs.openSync(sub, 'r');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
  }
  const crash = path.join(dir, 'crash.img');
  const replayed = path.join(dir, 'replayed.img');
  run('cp', ['--sparse=always', img, crash]);
  run('cp', ['--sparse=always', crash, replayed]);
  const meta = await readMeta(crash);
  t.log(meta.notes.join('; '));
  t.regex(meta.notes.join('\n'), /journal needs recovery: its [1-9]\d* copied blocks count as metadata/);
  const fsck = runStatus('e2fsck', ['-fy', replayed]);
  t.true(fsck.status !== null && fsck.status < 4, `e2fsck: ${fsck.status} ${fsck.stdout} ${fsck.stderr}`);
  const reference = e2imageBlocks(replayed, path.join(dir, 'meta.raw'), meta.blockSize);
  const missing = reference.filter((b) => !meta.bitmap.get(b));
  t.is(missing.length, 0, `metadata blocks of the replayed file system the map lacks: ${missing.slice(0, 12).join(', ')}`);
});

needsTools('readMetadataMap refuses a file system it cannot name the metadata of, saying what to use', async (t) => {
  const dir = scratchDir(t);
  const img = sparseFile(path.join(dir, 'btrfs.img'), 128 * MiB);
  run('mkfs.btrfs', ['-q', '-f', img]);
  const dev = Device.open(img);
  try {
    const e = await t.throwsAsync(readMetadataMap(dev), { instanceOf: UserError });
    t.regex(e!.message, /--hold metadata knows the metadata blocks of ext2\/3\/4 or XFS file systems only, and this volume holds btrfs/);
    t.regex((e as UserError).hint ?? '', /--hold all or --hold backup-blocks/);
  } finally {
    dev.close();
  }
});

needsTools('ext metadata reader on damaged images: a map or CorruptFileSystemError, never another error', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const dir = scratchDir(t);
  const src = path.join(dir, 'src');
  fs.mkdirSync(src);
  for (let d = 0; d < 6; d++) {
    fs.mkdirSync(path.join(src, `d${d}`));
    for (let i = 0; i < 80; i++) fs.writeFileSync(path.join(src, `d${d}`, `file-${i}`), Buffer.alloc(Math.floor(r() * 9000), i));
  }
  const img = sparseFile(path.join(dir, 'fs.img'), 16 * MiB);
  run('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '1024', '-d', src, img]);
  const pristine = fs.readFileSync(img);
  const meta = await readMeta(img);
  // Flip bytes only in metadata blocks: that is where the reader looks.
  const blocks = [...meta.bitmap.runs()].flatMap(([s, e]) => Array.from({ length: e - s }, (_, k) => s + k));
  let maps = 0, corrupt = 0;
  for (let round = 0; round < 300; round++) {
    const buf = Buffer.from(pristine);
    for (let k = 0; k < 1 + Math.floor(r() * 6); k++) {
      const b = blocks[Math.floor(r() * blocks.length)]!;
      buf[b * meta.blockSize + Math.floor(r() * meta.blockSize)] = Math.floor(r() * 256);
    }
    try {
      await readExtMetadata(new BufferReader(buf));
      maps++;
    } catch (e) {
      if (!(e instanceof CorruptFileSystemError)) { t.fail(`seed ${seed} round ${round}: ${(e as Error).stack}`); return; }
      corrupt++;
    }
  }
  t.log(`seed ${seed}: ${maps} maps, ${corrupt} refused as corrupt`);
  t.true(corrupt > 0 && maps > 0);
});
