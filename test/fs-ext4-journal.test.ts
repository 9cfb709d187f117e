// A crash-consistent image (taken while mounted, journal not replayed): the on-disk bitmaps are
// stale, the journal holds newer committed copies. Our map from the unreplayed image must contain
// every block the file system uses after e2fsck has replayed the journal.
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { extReader } from '../src/fs/ext4';
import type { UsedBlockMap } from '../src/fs/used-map';
import { crc32c } from '../src/fs/ext4-layout';
import { dumpe2fs } from './helpers/dumpe2fs';
import { testIf } from './helpers/skip';
import { loopDevice, mount, rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const needs = testIf({ root: true, commands: ['mkfs.ext4', 'dumpe2fs', 'e2fsck', 'losetup', 'mount'] });


async function readMap(file: string): Promise<UsedBlockMap> {
  const dev = Device.open(file);
  try {
    return await extReader.read(dev);
  } finally {
    dev.close();
  }
}

/** Writes `count` files with random sizes and fsyncs each: the metadata is committed to the journal. */
function writeSynced(dir: string, prefix: string, count: number, r: () => number): string[] {
  const names: string[] = [];
  for (let i = 0; i < count; i++) {
    const f = path.join(dir, `${prefix}${i}`);
    const fd = fs.openSync(f, 'w');
    fs.writeSync(fd, Buffer.alloc(4096 + Math.floor(r() * 600 * 1024), i & 0xff));
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    names.push(f);
  }
  return names;
}

interface Variant {
  name: string;
  mkfs: string[];
  mountOpts?: string[];
}

const VARIANTS: Variant[] = [
  { name: 'ext4 4K metadata_csum, 4 groups (jbd2 csum v3 tags)', mkfs: ['-t', 'ext4', '-b', '4096', '-g', '8192', '-O', 'metadata_csum,64bit'] },
  { name: 'ext4 1K flex_bg, 16 groups', mkfs: ['-t', 'ext4', '-b', '1024', '-O', 'metadata_csum'] },
  { name: 'ext4 4K ^metadata_csum 64bit (12-byte tags)', mkfs: ['-t', 'ext4', '-b', '4096', '-O', '^metadata_csum,64bit'] },
  { name: 'ext3 1K (indirect-mapped journal, 8-byte tags)', mkfs: ['-t', 'ext3', '-b', '1024'] },
];

for (const v of VARIANTS) {
  needs(`journal needs recovery: ${v.name}: map covers every block used after replay`, async (t) => {
    const r = rng(seedFromEnv(t));
    const dir = scratchDir(t);
    const img = sparseFile(path.join(dir, 'fs.img'), 128 * MiB);
    run('mke2fs', ['-q', '-F', ...v.mkfs, '-E', 'lazy_itable_init=0,lazy_journal_init=0', img]);
    const loop = loopDevice(t, img);
    const mnt = mount(t, loop, path.join(dir, 'mnt'), v.mountOpts ?? []);
    // A settled state on disk first, then more work that only reaches the journal.
    const first = writeSynced(mnt, 'a', 40, r);
    run('sync', []);
    // A directory with many entries (journaled metadata blocks), removed later: revoke records.
    const sub = path.join(mnt, 'dir');
    fs.mkdirSync(sub);
    for (let i = 0; i < 300; i++) fs.writeFileSync(path.join(sub, `entry-with-a-long-name-${i}`), '');
    writeSynced(mnt, 'c', 2, r);
    fs.rmSync(sub, { recursive: true });
    for (const f of first) if (r() < 0.4) fs.unlinkSync(f);
    writeSynced(mnt, 'b', 60, r);
    // Copy the backing file (not the loop device: a direct read of the device would first write
    // back its dirty metadata). The fs is idle; its dirty bitmaps stay in the page cache.
    const crash = path.join(dir, 'crash.img');
    const replayed = path.join(dir, 'replayed.img');
    run('cp', ['--sparse=always', img, crash]);
    run('cp', ['--sparse=always', crash, replayed]);

    const stale = dumpe2fs(crash);
    t.true(stale.features.includes('needs_recovery'), `features: ${stale.features.join(' ')}`);
    const map = await readMap(crash);
    t.log(map.notes.join('; '));
    t.false(map.allBlocks);
    t.regex(map.notes.join('\n'), /journal needs recovery: used the newest committed journal copies of [1-9]\d* block bitmaps/);

    const fsck = runStatus('e2fsck', ['-fy', replayed]);
    t.true(fsck.status !== null && fsck.status < 4, `e2fsck: ${fsck.status} ${fsck.stdout} ${fsck.stderr}`);
    const after = dumpe2fs(replayed);
    t.false(after.features.includes('needs_recovery'));
    let missing = 0, staleMissing = 0, extra = 0;
    for (let b = 0; b < after.blockCount; b++) {
      const used = !after.free.get(b);
      if (used && !map.bitmap.get(b)) missing++;
      if (used && stale.free.get(b)) staleMissing++;
      if (!used && map.bitmap.get(b)) extra++;
    }
    t.log(`used after replay but free in the stale on-disk bitmaps: ${staleMissing}; in our map but free after replay: ${extra}`);
    t.is(missing, 0, 'blocks used after the journal replay are missing from the map');
    // Only blocks e2fsck itself frees (orphans) may differ: the map is not "copy everything".
    t.true(extra < after.blockCount / 100, `${extra} extra blocks`);
  });
}

/** A fresh image with superblock edits (checksum redone) standing in for a crash image. */
async function patched(t: ExecutionContext, mutate: (buf: Buffer, img: string) => void): Promise<UsedBlockMap> {
  const dir = scratchDir(t);
  const img = sparseFile(path.join(dir, 'fs.img'), 64 * MiB);
  run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-O', 'metadata_csum', img]);
  const buf = fs.readFileSync(img);
  const sb = 1024;
  buf.writeUInt32LE(buf.readUInt32LE(sb + 0x60) | 0x4, sb + 0x60); // RECOVER
  mutate(buf, img);
  buf.writeUInt32LE(crc32c(0xffffffff, buf, sb, sb + 0x3fc), sb + 0x3fc);
  fs.writeFileSync(img, buf);
  return readMap(img);
}

needs('needs_recovery with an external journal: every block is copied and the note says why', async (t) => {
  const map = await patched(t, (buf) => buf.writeUInt32LE(0, 1024 + 0xe0)); // s_journal_inum = 0
  t.log(map.notes.join('; '));
  t.true(map.allBlocks);
  t.is(map.usedBlocks, map.totalBlocks);
  t.regex(map.notes.join('\n'), /journal needs recovery: the journal is on an external device.*copying every block/);
});

needs('needs_recovery with a corrupt journal superblock: every block is copied and the note says why', async (t) => {
  const map = await patched(t, (buf, img) => {
    const out = run('debugfs', ['-R', 'bmap <8> 0', img]).trim();
    const jsb = Number(out.split(/\s+/).pop());
    t.true(jsb > 0, out);
    buf.writeUInt32BE(0xdeadbeef, jsb * 4096); // jbd2 magic
  });
  t.log(map.notes.join('; '));
  t.true(map.allBlocks);
  t.regex(map.notes.join('\n'), /journal needs recovery: could not parse the journal \(no jbd2 magic.*\): copying every block/);
});

needs('needs_recovery with an empty log: on-disk bitmaps are used, and the note says so', async (t) => {
  const map = await patched(t, () => {});
  t.log(map.notes.join('; '));
  t.false(map.allBlocks);
  t.regex(map.notes.join('\n'), /journal needs recovery but holds no transactions/);
});
