// XFS used-block maps read straight from the device, checked extent by extent against xfs_db on
// generated file systems (block sizes, AG counts, v4/v5, fragmented free space, multi-level bnobt),
// plus targeted corruptions and the dirty-log fallback.
import test from 'ava';
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device, type BlockReader } from '../src/device/device';
import { CorruptFileSystemError } from '../src/fs/used-map';
import { xfsReader, xfsChecksum, crc32c } from '../src/fs/xfs';
import { loopDevice, mount, rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';
import { testIf } from './helpers/skip';
import { mergeAdjacent, ourFreeExtents, sbGeometry, withoutAgfl, xfsDbReference } from './helpers/xfs-db';

const MiB = 1 << 20;
const xfsTest = testIf({ root: true, commands: ['mkfs.xfs', 'xfs_db', 'mount', 'umount', 'losetup'] });

interface Made {
  file: string;
  dev?: string;
  mkfsNote?: string;
}

interface MakeOpts {
  size: number; // device (file) size in bytes
  fsSize?: number; // file system size in bytes (smaller than the device: a tail)
  blockSize: 1024 | 4096;
  agcount: number;
  crc: boolean;
  files: number; // files to write (then about half are deleted); 0 = do not mount
  maxFileKiB: number;
  seed: number;
}

/** mkfs.xfs on a sparse file, then (optionally) mount, fill with random files, delete ~half, umount. */
function makeXfs(t: ExecutionContext, dir: string, name: string, o: MakeOpts): Made | undefined {
  const file = sparseFile(path.join(dir, `${name}.img`), o.size);
  const args = ['-q', '-f', '-b', `size=${o.blockSize}`, '-d', `agcount=${o.agcount}`, '-m', `crc=${o.crc ? 1 : 0}`];
  if (!o.crc) args.push('-i', 'sparse=0', '-m', 'finobt=0,rmapbt=0,reflink=0', '-n', 'ftype=0');
  if (o.fsSize) args.push('-d', `size=${o.fsSize}`);
  const mk = runStatus('mkfs.xfs', [...args, file]);
  if (mk.status !== 0) {
    t.log(`mkfs.xfs ${args.join(' ')} refused (${mk.stderr.trim().split('\n').pop()}): case skipped`);
    return undefined;
  }
  if (o.files === 0) return { file };
  const dev = loopDevice(t, file);
  const mnt = path.join(dir, `${name}.mnt`);
  const m = runStatus('mount', [dev, mnt + (fs.mkdirSync(mnt, { recursive: true }), '')]);
  if (m.status !== 0) {
    t.log(`mount of ${name} refused (${m.stderr.trim()}); compared as freshly made`);
    return { file, dev, mkfsNote: 'not mountable' };
  }
  try {
    const r = rng(o.seed);
    const names: string[] = [];
    const chunk = Buffer.alloc(o.maxFileKiB * 1024);
    for (let i = 0; i < o.files; i++) {
      const n = path.join(mnt, `d${i % 16}`, `f${i}`);
      if (i < 16) fs.mkdirSync(path.dirname(n), { recursive: true });
      const len = 1 + Math.floor(r() * chunk.length);
      chunk.writeUInt32LE(i, 0);
      fs.writeFileSync(n, chunk.subarray(0, len));
      names.push(n);
    }
    run('sync', []); // allocate now, so deleting every other file leaves holes
    for (const n of names) if (r() < 0.5) fs.unlinkSync(n);
  } finally {
    run('umount', [mnt]);
  }
  return { file, dev };
}

async function compareWithXfsDb(t: ExecutionContext, made: Made, o: MakeOpts, viaLoop = false): Promise<number> {
  const g = sbGeometry(made.file);
  const dev = Device.open(viaLoop && made.dev ? made.dev : made.file);
  const t0 = Date.now();
  let map;
  try {
    map = await xfsReader.read(dev);
  } finally {
    dev.close();
  }
  const ms = Date.now() - t0;
  const ref = xfsDbReference(made.file, g.agcount);
  t.is(map.filesystem, 'xfs');
  t.false(map.allBlocks, map.notes.join('; '));
  t.is(map.blockSize, o.blockSize);
  t.is(map.totalBlocks, Math.ceil(o.size / o.blockSize));
  t.true(map.notes[0]!.startsWith(`xfs v${o.crc ? 5 : 4}, ${o.blockSize}-byte blocks, ${g.agcount} AG`), map.notes[0]);
  const ours = ourFreeExtents(map.bitmap, g.dblocks, g.agblocks, g.agcount);
  const theirs = withoutAgfl(ref.free, ref.ags).map(mergeAdjacent);
  t.deepEqual(ours, theirs, 'free extents differ from xfs_db freesp -d');
  const freeTotal = ref.ags.reduce((n, a) => n + a.freeblks, 0);
  t.is(map.usedBlocks, map.totalBlocks - freeTotal, 'used = total - sum(agf_freeblks) (AGFL blocks counted as used)');
  // The device tail past the file system stays set.
  for (let b = g.dblocks; b < map.totalBlocks; b++) if (!map.bitmap.get(b)) { t.fail(`tail block ${b} cleared`); break; }
  const levels = ref.ags.map((a) => a.bnolevel);
  t.log(`${path.basename(made.file)}: v${o.crc ? 5 : 4} bs=${o.blockSize} ags=${g.agcount} dblocks=${g.dblocks} total=${map.totalBlocks} ` +
    `used=${map.usedBlocks} free extents=${ours.reduce((n, l) => n + l.length, 0)} bnobt levels=${levels.join(',')} read in ${ms} ms`);
  return Math.max(...levels);
}

xfsTest('xfs used-block map matches xfs_db on generated file systems', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const dir = scratchDir(t);
  const cases: Array<Omit<MakeOpts, 'seed'> & { viaLoop?: boolean }> = [
    // 1 KiB blocks, two AGs (mkfs.xfs wants at least 2), many small files half deleted: a multi-level bnobt.
    { size: 300 * MiB, blockSize: 1024, agcount: 2, crc: true, files: 9000, maxFileKiB: 6, viaLoop: true },
    { size: 512 * MiB + 12345, fsSize: 400 * MiB, blockSize: 4096, agcount: 4, crc: true, files: 1500, maxFileKiB: 64 },
    { size: 2048 * MiB, blockSize: 4096, agcount: 8, crc: true, files: 800, maxFileKiB: 256 },
    { size: 320 * MiB, blockSize: 1024, agcount: 3, crc: true, files: 2500, maxFileKiB: 16 },
    // v4: this kernel may refuse to mount it; then it is compared as freshly made.
    { size: 400 * MiB, blockSize: 1024, agcount: 2, crc: false, files: 1000, maxFileKiB: 8 },
    { size: 300 * MiB, blockSize: 4096, agcount: 2, crc: false, files: 0, maxFileKiB: 0 },
  ];
  // Plus random ones.
  for (let i = 0; i < 2; i++) {
    cases.push({
      size: (300 + Math.floor(r() * 700)) * MiB + Math.floor(r() * 4096),
      blockSize: r() < 0.5 ? 1024 : 4096,
      agcount: 2 + Math.floor(r() * 7),
      crc: true,
      files: 300 + Math.floor(r() * 1500),
      maxFileKiB: 4 + Math.floor(r() * 60),
    });
  }
  let maxLevel = 0;
  let compared = 0;
  for (const [i, c] of cases.entries()) {
    const o = { ...c, seed: (seed + i * 7919) >>> 0 };
    const made = makeXfs(t, dir, `c${i}`, o);
    if (!made) continue;
    maxLevel = Math.max(maxLevel, await compareWithXfsDb(t, made, o, c.viaLoop));
    compared++;
    fs.rmSync(made.file, { force: true }); // the loop device (if any) keeps the inode until teardown
  }
  t.log(`${compared} file systems compared with xfs_db`);
  t.true(compared >= 6);
  t.true(maxLevel >= 2, 'at least one bnobt had more than one level');
});

function patchSector(buf: Buffer, crcOffset: number | undefined): void {
  if (crcOffset !== undefined) buf.writeUInt32LE(xfsChecksum(buf, crcOffset), crcOffset);
}

/** A reader over an image file whose bytes can be patched in memory (the file is never changed). */
class PatchedReader implements BlockReader {
  private patches = new Map<number, Buffer>();
  constructor(private dev: Device, readonly size = dev.size) {}
  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.readMany([{ offset, length }]))[0]!;
  }
  async readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    for (const r of ranges) if (r.offset + r.length > this.size) throw new RangeError(`read past the end at ${r.offset}`);
    const bufs = await this.dev.readMany(ranges);
    return bufs.map((b0, i) => {
      const b = Buffer.from(b0);
      const r = ranges[i]!;
      for (const [off, p] of this.patches) {
        const s = Math.max(off, r.offset), e = Math.min(off + p.length, r.offset + r.length);
        if (s < e) p.copy(b, s - r.offset, s - off, e - off);
      }
      return b;
    });
  }
  /** Patches the `len` bytes at `offset` with `edit` applied to a copy of the original. */
  async patch(offset: number, len: number, edit: (b: Buffer) => void): Promise<void> {
    const [orig] = await this.dev.readMany([{ offset, length: len }]);
    const b = Buffer.from(orig!);
    edit(b);
    this.patches.set(offset, b);
  }
  reset(): void { this.patches.clear(); }
}

xfsTest('corrupt xfs metadata gives CorruptFileSystemError naming what was wrong', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const o: MakeOpts = { size: 300 * MiB, blockSize: 1024, agcount: 2, crc: true, files: 6000, maxFileKiB: 4, seed };
  const made = makeXfs(t, dir, 'corrupt', o)!;
  const g = sbGeometry(made.file);
  const dev = Device.open(made.file);
  t.teardown(() => dev.close());
  const pr = new PatchedReader(dev);
  t.true(await xfsReader.probe(pr));
  const clean = await xfsReader.read(pr);
  t.false(clean.allBlocks);

  const agf = (a: number) => a * g.agblocks * g.blockSize + 512;
  const [agf1] = await dev.readMany([{ offset: agf(1), length: 512 }]);
  const bnoRoot1 = agf1!.readUInt32BE(16);
  const bnoLevel1 = agf1!.readUInt32BE(28);
  const rootOff = (g.agblocks + bnoRoot1) * g.blockSize;
  t.log(`AG 1 bnobt root ${bnoRoot1}, ${bnoLevel1} level(s)`);

  const expectCorrupt = async (what: string, re: RegExp, reader: BlockReader = pr) => {
    const e = await t.throwsAsync(xfsReader.read(reader), { instanceOf: CorruptFileSystemError }, what);
    if (e) { t.regex(e.message, re, what); t.log(`${what}: ${e.message}`); }
    pr.reset();
  };

  await pr.patch(0, 512, (b) => b.writeUInt32BE(3000, 4));
  await expectCorrupt('sb byte flip (crc left stale)', /superblock CRC mismatch/);
  await pr.patch(0, 512, (b) => { b.writeUInt32BE(3000, 4); patchSector(b, 224); });
  await expectCorrupt('sb blocksize 3000', /block size 3000 is not a power of two/);
  await pr.patch(0, 512, (b) => { b.writeUInt32BE(0, 88); patchSector(b, 224); });
  await expectCorrupt('sb agcount 0', /agcount is 0/);
  await expectCorrupt('truncated device', /truncated device/, new PatchedReader(dev, dev.size - 8 * MiB));
  await pr.patch(agf(1), 512, (b) => { b[0] = 0x58 ^ 0xff; });
  await expectCorrupt('AGF magic', /AGF of AG 1: magic is not XAGF/);
  await pr.patch(agf(1), 512, (b) => { b[100] ^= 1; });
  await expectCorrupt('AGF crc', /AGF of AG 1: CRC mismatch/);
  await pr.patch(agf(1), 512, (b) => { b.writeUInt32BE(g.agblocks + 5, 16); patchSector(b, 216); });
  await expectCorrupt('AGF root past AG end', /AGF of AG 1: free-space btree root \d+ is past the AG end/);
  await pr.patch(agf(1), 512, (b) => { b.writeUInt32BE(0, 8); patchSector(b, 216); });
  await expectCorrupt('AGF seqno', /AGF of AG 1: sequence number 0 does not match/);
  await pr.patch(agf(1), 512, (b) => { b.writeUInt32BE(b.readUInt32BE(52) + 1, 52); patchSector(b, 216); });
  await expectCorrupt('AGF freeblks', /AG 1: free-space btree holds \d+ free blocks but the AGF says/);
  await pr.patch(rootOff, g.blockSize, (b) => { b[200] ^= 0x10; });
  await expectCorrupt('btree block crc', /free-space btree block \d+ of AG 1: CRC mismatch/);
  await pr.patch(rootOff, g.blockSize, (b) => { b.writeUInt32BE(0x41425442, 0); });
  await expectCorrupt('btree magic', /free-space btree block \d+ of AG 1: magic/);
  if (bnoLevel1 >= 2) {
    const maxNode = Math.floor((g.blockSize - 56) / 12);
    await pr.patch(rootOff, g.blockSize, (b) => { b.writeUInt32BE(g.agblocks + 77, 56 + maxNode * 8); patchSector(b, 52); });
    await expectCorrupt('btree pointer past AG end', /child pointer \d+ is past the AG end/);
    await pr.patch(rootOff, g.blockSize, (b) => { b.writeUInt32BE(b.readUInt32BE(56 + maxNode * 8), 56 + maxNode * 8 + 4); patchSector(b, 52); });
    await expectCorrupt('btree pointer loop', /referenced twice|first key|sibling/);
  } else {
    await pr.patch(rootOff, g.blockSize, (b) => {
      const a = b.readBigUInt64BE(56), c = b.readBigUInt64BE(64);
      b.writeBigUInt64BE(c, 56); b.writeBigUInt64BE(a, 64); patchSector(b, 52);
    });
    await expectCorrupt('btree records out of order', /out of order/);
  }
  // Sanity of the checksum helpers themselves.
  t.is(crc32c(Buffer.from('123456789')), 0xe3069283);
});

/**
 * Replays the log of a copied image (mount -o nouuid, umount) and checks that every block our map
 * calls free is free on the replayed file system too (by xfs_db): the map never skips a block the
 * replayed log references.
 */
async function checkAgainstReplay(t: ExecutionContext, dir: string, img: string, map: { bitmap: { get(i: number): boolean }; allBlocks: boolean }) {
  if (map.allBlocks) return;
  const dev = loopDevice(t, img);
  const mnt = mount(t, dev, path.join(dir, `replay-${path.basename(img)}`), ['nouuid']);
  run('umount', [mnt]);
  const g = sbGeometry(img);
  const ref = xfsDbReference(img, g.agcount);
  const replayedFree = new Set<number>();
  ref.free.forEach((list, a) => { for (const [s, e] of list) for (let b = s; b < e; b++) replayedFree.add(a * g.agblocks + b); });
  let bad = 0;
  for (let b = 0; b < g.dblocks; b++) if (!map.bitmap.get(b) && !replayedFree.has(b)) bad++;
  t.is(bad, 0, `${bad} blocks our map skipped are in use after log replay of ${path.basename(img)}`);
}

xfsTest('xfs log state: clean or covered logs are trusted (checked against a replay), shutdown and crash copies copy every block', async (t) => {
  const dir = scratchDir(t);
  const file = sparseFile(path.join(dir, 'log.img'), 300 * MiB);
  run('mkfs.xfs', ['-q', '-f', file]);
  const dev = loopDevice(t, file);
  const mnt = mount(t, dev, path.join(dir, 'mnt'));
  const state = async (img: string) => {
    const d = Device.open(img);
    try { return await xfsReader.read(d); } finally { d.close(); }
  };
  // O_DIRECT: the loop device's page cache is not coherent with what the mounted file system wrote.
  const copyDirect = (from: string, to: string) => run('dd', [`if=${from}`, `of=${to}`, 'bs=1M', 'iflag=direct', 'conv=sparse', 'status=none']);
  const repairSaysDirty = (img: string) => {
    const r = runStatus('xfs_repair', ['-n', '-f', img]);
    return /valuable metadata changes in a log/.test(r.stderr + r.stdout);
  };
  for (let i = 0; i < 200; i++) fs.writeFileSync(path.join(mnt, `f${i}`), Buffer.alloc(1 + i * 97, i));
  run('sync', []);
  // Frozen while mounted: the kernel covers the log (dummy superblock records) but writes no unmount
  // record; xfs_repair calls that dirty, we accept the covered log and check it against a replay.
  run('xfs_freeze', ['-f', mnt]);
  const frozen = path.join(dir, 'frozen.img');
  try { copyDirect(dev, frozen); } finally { run('xfs_freeze', ['-u', mnt]); }
  const fz = await state(frozen);
  t.log(`frozen copy: ${fz.notes.join('; ')} (xfs_repair -n says ${repairSaysDirty(frozen) ? 'dirty' : 'clean'})`);
  t.false(fz.allBlocks);
  t.regex(fz.notes.join('\n'), /covered/);
  await checkAgainstReplay(t, dir, frozen, fz);
  // Crash-consistent copy while mounted, in the middle of metadata-heavy work: dirty.
  for (let i = 0; i < 300; i++) fs.writeFileSync(path.join(mnt, `g${i}`), Buffer.alloc(4096 * (1 + (i % 7)), i));
  run('sync', []);
  for (let i = 0; i < 300; i += 2) fs.unlinkSync(path.join(mnt, `g${i}`));
  for (let i = 0; i < 50; i++) fs.mkdirSync(path.join(mnt, `dir${i}`));
  const ffd = fs.openSync(path.join(mnt, 'synced'), 'w');
  try { fs.writeSync(ffd, Buffer.alloc(65536, 7)); fs.fsyncSync(ffd); } finally { fs.closeSync(ffd); } // forces the log, not the metadata in place
  const live = path.join(dir, 'live.img');
  copyDirect(dev, live);
  const lv = await state(live);
  t.log(`crash copy: ${lv.notes.join('; ')}`);
  t.true(lv.allBlocks);
  t.is(lv.usedBlocks, lv.totalBlocks);
  t.regex(lv.notes.join('\n'), /XFS log needs recovery/);
  fs.rmSync(live);
  // Shut down without an unmount record: dirty.
  run('xfs_io', ['-x', '-c', 'shutdown -f', mnt]);
  run('umount', [mnt]);
  const sd = await state(file);
  t.true(sd.allBlocks);
  t.is(sd.usedBlocks, sd.totalBlocks);
  t.regex(sd.notes.join('\n'), /XFS log needs recovery/);
  t.true(repairSaysDirty(file));
  // Mount (replays the log) and unmount cleanly: trusted again.
  run('mount', [dev, mnt]);
  run('umount', [mnt]);
  const ok = await state(file);
  t.false(ok.allBlocks, ok.notes.join('; '));
  t.false(repairSaysDirty(file));
});
