// Volumes past 16 TiB, where block numbers no longer fit in 32 bits: real ext4 (20 TiB) and XFS
// (17 TiB, 64 TiB) made by their own mkfs as sparse files inside an XFS file system (a file on ext4
// stops at 16 TiB), files written through a real mount into many groups / AGs, the used-block maps
// compared range by range with dumpe2fs / xfs_db, an offline backup checked against the source over
// the used blocks and file by file, and an online backup with writes above block 2^32 while it runs.
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { readUsedBlockMap } from '../src/fs/detect';
import type { UsedBlockMap } from '../src/fs/used-map';
import { Bitset } from '../src/util/bitset';
import { BIN } from './helpers/cli';
import { dumpe2fs } from './helpers/dumpe2fs';
import { QemuIo, serveDevice, startBackup } from './helpers/online';
import { serialIf } from './helpers/skip';
import { loopDevice, mount, rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';
import { checksumTree } from './helpers/volumes';
import { mergeAdjacent, ourFreeExtents, sbGeometry, withoutAgfl, xfsDbReference } from './helpers/xfs-db';

const TiB = 2 ** 40;
const TWO32 = 2 ** 32;
const big = serialIf({ root: true, commands: ['mkfs.xfs', 'mkfs.ext4', 'dumpe2fs', 'xfs_db', 'filefrag', 'losetup', 'mount', 'qemu-io'] });

/** Fails with `what` if `p` takes longer than `ms` (a stuck step names itself, and teardown runs). */
function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms); });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/** A sparse XFS file system to hold the big volumes, mounted on a loop device (undone at teardown). */
function bigHost(t: ExecutionContext): string {
  const dir = scratchDir(t, 'livesnap-scale-');
  const img = sparseFile(path.join(dir, 'host.xfs'), 8 * TiB);
  run('mkfs.xfs', ['-q', '-f', img]);
  return mount(t, loopDevice(t, img), path.join(dir, 'host'));
}

interface Written { checksums: Map<string, string>; highBlocks: number; extents: Array<{ file: string; byte: number; length: number }> }

/** Mounts `image`, writes `dirs` directories of random files (the allocators spread them), unmounts. */
function populate(t: ExecutionContext, image: string, dirs: number, fileBytes: number, seed: number, blockSize: number): Written {
  const loop = loopDevice(t, image);
  const mnt = mount(t, loop, image + '.mnt');
  const r = rng(seed);
  const buf = Buffer.alloc(fileBytes);
  for (let d = 0; d < dirs; d++) {
    fs.mkdirSync(path.join(mnt, `d${d}`));
    for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE(Math.floor(r() * TWO32), i);
    fs.writeFileSync(path.join(mnt, `d${d}`, 'f'), buf);
  }
  run('sync', ['-f', mnt]);
  const extents: Written['extents'] = [];
  let highBlocks = 0;
  for (let d = 0; d < dirs; d++) {
    const file = `d${d}/f`;
    // filefrag -e: "ext: logical_offset: physical_offset: length: ..." in file-system blocks.
    for (const m of run('filefrag', ['-e', '-b' + blockSize, path.join(mnt, file)]).matchAll(/^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+):/gm)) {
      const first = Number(m[1]), count = Number(m[3]);
      if (first >= TWO32) highBlocks += count;
      extents.push({ file, byte: first * blockSize, length: count * blockSize });
    }
  }
  const checksums = checksumTree(mnt);
  run('umount', [mnt]);
  // Detached now: a volume with a loop device over it cannot be served (writes through it would bypass the export).
  run('losetup', ['-d', loop]);
  return { checksums, highBlocks, extents };
}

async function mapOf(image: string): Promise<UsedBlockMap> {
  const dev = Device.open(image);
  try { return await readUsedBlockMap(dev); } finally { dev.close(); }
}

/** Differences between two maps of the same size, with the first block of each kind. */
function diff(ours: Bitset, theirs: Bitset): string[] {
  const out: string[] = [];
  const extra = ours.clone(); extra.andNot(theirs);
  const missing = theirs.clone(); missing.andNot(ours);
  if (missing.setCount) out.push(`${missing.setCount} used blocks missing from our map, the first ${missing.next(0, true)}`);
  if (extra.setCount) out.push(`${extra.setCount} free blocks in our map, the first ${extra.next(0, true)}`);
  return out;
}

/** Offline backup to a raw image, verify over the used blocks, then every file through a mount. */
function backupAndCheck(t: ExecutionContext, image: string, w: Written): void {
  const out = image + '.backup.img';
  const b = runStatus(process.execPath, [BIN, 'backup', image, '--to', out, '--json']);
  t.is(b.status, 0, b.stderr);
  const done = JSON.parse(b.stdout.trim().split('\n').pop()!) as { blocks: number; usedBlocks: number; bytes: number };
  t.is(done.blocks, done.usedBlocks, 'every block of the map reached the image');
  const v = runStatus(process.execPath, [BIN, 'verify', out, '--against', image, '--json']);
  t.is(v.status, 0, v.stdout + v.stderr);
  t.is((JSON.parse(v.stdout.trim().split('\n').pop()!) as { differingBlocks: number }).differingBlocks, 0);
  // The files themselves, through the kernel's own reading of the image.
  const mnt = mount(t, loopDevice(t, out, { readOnly: true }), out + '.mnt', ['ro']);
  t.deepEqual(checksumTree(mnt), w.checksums, 'every file of the image matches');
  runStatus('umount', [mnt]);
  // Independently of livesnap's reader: each file's blocks above 2^32 hold the file's bytes.
  const fdS = fs.openSync(image, 'r'), fdB = fs.openSync(out, 'r');
  try {
    for (const e of w.extents.filter((x) => x.byte >= TWO32 * 4096).slice(0, 8)) {
      const a = Buffer.alloc(Math.min(e.length, 1 << 20)), c = Buffer.alloc(a.length);
      fs.readSync(fdS, a, 0, a.length, e.byte);
      fs.readSync(fdB, c, 0, c.length, e.byte);
      t.true(a.equals(c) && a.some((x) => x !== 0), `${e.file} at byte ${e.byte}`);
    }
  } finally { fs.closeSync(fdS); fs.closeSync(fdB); }
  fs.rmSync(out);
}

big('ext4 at 20 TiB: the used map equals dumpe2fs range by range past block 2^32; an offline backup holds every file', async (t) => {
  const seed = seedFromEnv(t);
  const host = bigHost(t);
  const image = sparseFile(path.join(host, 'e20.img'), 20 * TiB);
  run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=1,lazy_journal_init=1', image]);
  const w = populate(t, image, 24, 2 << 20, seed, 4096);
  t.true(w.highBlocks > 0, 'some file data lies above block 2^32');
  const t0 = performance.now();
  const map = await mapOf(image);
  const ms = performance.now() - t0;
  t.is(map.filesystem, 'ext4');
  t.false(map.allBlocks, map.notes.join('; '));
  t.is(map.totalBlocks, 20 * TiB / 4096);
  const d = dumpe2fs(image);
  const expected = new Bitset(map.totalBlocks, true);
  for (const [s, e] of d.free.runs()) expected.clearRange(s, e);
  t.deepEqual(diff(map.bitmap, expected), [], 'our map against dumpe2fs');
  t.is(map.usedBlocks, expected.setCount);
  t.true(map.bitmap.count(TWO32, map.totalBlocks) > 0, 'used blocks above 2^32 are in the map');
  for (const e of w.extents) t.is(map.bitmap.count(e.byte / 4096, (e.byte + e.length) / 4096), e.length / 4096, `${e.file} at block ${e.byte / 4096}`);
  t.log(`20 TiB ext4: ${map.usedBlocks} used blocks (${w.highBlocks} file blocks above 2^32) read in ${ms.toFixed(0)} ms; ${map.notes.join('; ')}`);
  backupAndCheck(t, image, w);
});

for (const sizeTiB of [17, 64]) {
  big(`XFS at ${sizeTiB} TiB: the used map equals xfs_db AG by AG past block 2^32; an offline backup holds every file`, async (t) => {
    const seed = seedFromEnv(t);
    const host = bigHost(t);
    const image = sparseFile(path.join(host, `x${sizeTiB}.img`), sizeTiB * TiB);
    run('mkfs.xfs', ['-q', '-f', image]);
    const w = populate(t, image, 40, 1 << 20, seed, 4096);
    t.true(w.highBlocks > 0, 'some file data lies above block 2^32');
    const g = sbGeometry(image);
    const t0 = performance.now();
    const map = await mapOf(image);
    const ms = performance.now() - t0;
    t.is(map.filesystem, 'xfs');
    t.false(map.allBlocks, map.notes.join('; '));
    const ref = xfsDbReference(image, g.agcount);
    const ours = ourFreeExtents(map.bitmap, g.dblocks, g.agblocks, g.agcount);
    t.deepEqual(ours, withoutAgfl(ref.free, ref.ags).map(mergeAdjacent), 'free extents differ from xfs_db freesp -d');
    t.is(map.usedBlocks, map.totalBlocks - ref.ags.reduce((n, a) => n + a.freeblks, 0));
    const agsWithFiles = new Set(w.extents.map((e) => Math.floor(e.byte / 4096 / g.agblocks)));
    t.true(agsWithFiles.size >= 8, `files in ${agsWithFiles.size} AGs`);
    for (const e of w.extents) t.is(map.bitmap.count(e.byte / 4096, (e.byte + e.length) / 4096), e.length / 4096, `${e.file} at block ${e.byte / 4096}`);
    if (sizeTiB === 17) {
      // An image of a volume past 16 TiB cannot live on ext4: said plainly, nothing left behind.
      const small = sparseFile(path.join(host, 'small-ext4.img'), 64 << 20);
      run('mkfs.ext4', ['-q', '-F', small]);
      const smnt = mount(t, loopDevice(t, small), small + '.mnt');
      const r = runStatus(process.execPath, [BIN, 'backup', image, '--to', path.join(smnt, 'x17.img')]);
      t.is(r.status, 1);
      t.regex(r.stderr, /cannot hold a file of 18691697672192 bytes \(ext4 stops at 16 TiB\)/);
      t.deepEqual(fs.readdirSync(smnt).filter((n) => n !== 'lost+found'), []);
      runStatus('umount', [smnt]);
    }
    t.log(`${sizeTiB} TiB XFS: ${g.agcount} AGs, ${map.usedBlocks} used blocks (${w.highBlocks} file blocks above 2^32, files in ${agsWithFiles.size} AGs) read in ${ms.toFixed(0)} ms`);
    backupAndCheck(t, image, w);
  });
}

big('online backup of a 64 TiB XFS export: writes above block 2^32 during the backup; the image holds the instant', async (t) => {
  const seed = seedFromEnv(t);
  const host = bigHost(t);
  const image = sparseFile(path.join(host, 'x64.img'), 64 * TiB);
  run('mkfs.xfs', ['-q', '-f', image]);
  const w = populate(t, image, 40, 1 << 20, seed, 4096);
  const high = w.extents.filter((e) => e.byte >= TWO32 * 4096);
  t.true(high.length >= 4, 'files above block 2^32');
  const before = high.map((e) => { const b = Buffer.alloc(e.length); const fd = fs.openSync(image, 'r'); fs.readSync(fd, b, 0, e.length, e.byte); fs.closeSync(fd); return b; });
  const served = await serveDevice(t, path.dirname(image), image, 'big');
  const out = path.join(host, 'online.img');
  // Slow enough that the writes below land while the copier is still behind them.
  const run1 = startBackup(t, [served.name, '--to', out, '--control', served.control, '--max-rate', '200M']);
  await within(60_000, 'the armed event', run1.armed);
  const q = new QemuIo(t, served.uri);
  const r = rng(seed);
  const newData = high.map((e) => { const b = Buffer.alloc(e.length); for (let i = 0; i < b.length; i += 4) b.writeUInt32LE(Math.floor(r() * TWO32), i); return b; });
  for (const [i, e] of high.entries()) {
    const src = path.join(path.dirname(image), `new${i}.bin`);
    fs.writeFileSync(src, newData[i]!);
    await within(30_000, `write ${i}`, q.write(src, e.byte, e.length));
  }
  // No flush: the export writes with O_DIRECT, so an acknowledged write is on the device (and
  // qemu-io 7.2 completes a flush over simple replies only when its next command arrives).
  await within(30_000, 'qemu-io to quit', q.quit());
  const res = await within(120_000, 'the backup to end', run1.exit);
  t.is(res.status, 0, res.stderr);
  const done = res.lines.find((l) => l.event === 'done') as { blocks: number; usedBlocks: number; blocksSavedByWriters: number } | undefined;
  t.truthy(done);
  t.is(done!.blocks, done!.usedBlocks);
  t.true(done!.blocksSavedByWriters > 0, 'the writes above 2^32 went through copy-before-write');
  const fdI = fs.openSync(out, 'r'), fdV = fs.openSync(image, 'r');
  try {
    for (const [i, e] of high.entries()) {
      const img = Buffer.alloc(e.length), live = Buffer.alloc(e.length);
      fs.readSync(fdI, img, 0, e.length, e.byte);
      fs.readSync(fdV, live, 0, e.length, e.byte);
      t.true(img.equals(before[i]!), `the image holds the original of ${e.file} at block ${e.byte / 4096}`);
      t.true(live.equals(newData[i]!), `the live volume holds the new data of ${e.file}`);
    }
  } finally { fs.closeSync(fdI); fs.closeSync(fdV); }
  t.log(`${high.length} extents above 2^32 rewritten during the backup; ${done!.blocksSavedByWriters} originals saved by writers`);
});
