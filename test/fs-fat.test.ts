// The FAT reader against the tools' own view, on many generated volumes (FAT12, FAT16, FAT32;
// cluster sizes, sector sizes, FAT counts, reserved sectors; files written and deleted by mtools):
// its used cluster count equals fsck.fat's, and for 512-byte sectors its block set equals
// partclone.fat's (the domain log of "partclone.fat -D"; partclone reads FAT12 entries as 16 bits,
// so FAT12 is checked by count only). Plus the corrupt cases.
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { fatReader, parseBpb } from '../src/fs/fat';
import { CorruptFileSystemError } from '../src/fs/used-map';
import { bitDiff, partcloneDomain } from './helpers/domain';
import { testIf } from './helpers/skip';
import { rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const needs = testIf({ commands: ['mkfs.vfat', 'fsck.fat', 'mcopy', 'mdel', 'partclone.fat'] });
const ENV = { ...process.env, MTOOLS_SKIP_CHECK: '1' };

interface Config { name: string; sizeKiB: number; args: string[]; sector?: number }

const CONFIGS: Config[] = [
  { name: 'FAT12 floppy-sized, 1 sector per cluster', sizeKiB: 1440, args: ['-F', '12', '-s', '1'] },
  { name: 'FAT12 4 MiB, one FAT', sizeKiB: 4096, args: ['-F', '12', '-f', '1'] },
  { name: 'FAT16 32 MiB, 4 sectors per cluster', sizeKiB: 32 * 1024, args: ['-F', '16', '-s', '4'] },
  { name: 'FAT16 120 MiB, 8 reserved sectors, one FAT', sizeKiB: 120 * 1024, args: ['-F', '16', '-R', '8', '-f', '1'] },
  { name: 'FAT32 64 MiB (an ESP), 512-byte clusters', sizeKiB: 64 * 1024, args: ['-F', '32', '-s', '1'] },
  { name: 'FAT32 260 MiB, 4 KiB clusters', sizeKiB: 260 * 1024, args: ['-F', '32', '-s', '8'] },
  { name: 'FAT32 300 MiB, 4096-byte sectors', sizeKiB: 300 * 1024, args: ['-F', '32', '-S', '4096'], sector: 4096 },
  { name: 'FAT16 200 MiB, 2048-byte sectors, 8 KiB clusters', sizeKiB: 200 * 1024, args: ['-F', '16', '-S', '2048', '-s', '4'], sector: 2048 },
];

/** Writes seeded files (and directories) with mcopy, deletes about a third with mdel. */
function populate(img: string, dir: string, seed: number, budget: number): void {
  const r = rng(seed);
  const src = path.join(dir, 'src');
  fs.mkdirSync(src, { recursive: true });
  const names: string[] = [];
  let used = 0;
  for (let i = 0; used < budget && i < 80; i++) {
    const size = Math.floor(r() * Math.min(budget / 4, 600_000));
    const b = Buffer.alloc(size);
    for (let k = 0; k + 4 <= size; k += 512) b.writeUInt32LE(Math.floor(r() * 2 ** 32), k);
    const name = `f${i}.bin`;
    fs.writeFileSync(path.join(src, name), b);
    names.push(name);
    used += size + 4096;
  }
  fs.mkdirSync(path.join(src, 'sub'));
  fs.writeFileSync(path.join(src, 'sub', 'inner.txt'), 'inside a directory');
  run('mcopy', ['-s', '-Q', '-i', img, ...fs.readdirSync(src).map((n) => path.join(src, n)), '::/'], { env: ENV });
  const del = names.filter(() => r() < 0.35).map((n) => `::/${n}`);
  if (del.length) run('mdel', ['-i', img, ...del], { env: ENV });
  fs.rmSync(src, { recursive: true, force: true });
}

async function readMap(file: string) {
  const d = Device.open(file);
  try { return await fatReader.read(d); } finally { d.close(); }
}

async function checkConfig(t: ExecutionContext, c: Config, seed: number): Promise<void> {
  const dir = scratchDir(t, 'livesnap-fat-');
  const img = path.join(dir, 'fat.img');
  run('mkfs.vfat', ['-C', ...c.args, img, String(c.sizeKiB)]);
  populate(img, dir, seed, (c.sizeKiB * 1024) / 3);
  const ck = runStatus('fsck.fat', ['-n', '-v', img]);
  t.is(ck.status, 0, `fsck.fat: ${ck.stdout}`);
  const m = /(\d+)\/(\d+) clusters/.exec(ck.stdout);
  t.truthy(m, 'fsck.fat prints used/total clusters');
  const map = await readMap(img);
  const note = map.notes[0]!;
  const ours = /(\d+) clusters of \d+ bytes, (\d+) in use/.exec(note)!;
  t.is(Number(ours[1]), Number(m![2]), `${c.name}: cluster count`);
  t.is(Number(ours[2]), Number(m![1]), `${c.name}: used clusters (ours vs fsck.fat)`);
  const bps = c.sector ?? 512;
  t.is(map.blockSize, bps);
  if (bps === 512 && map.filesystem !== 'fat12') {
    const dom = partcloneDomain('partclone.fat', img, dir, bps);
    const n = Math.min(map.totalBlocks, Math.floor(dom.size / bps));
    const d = bitDiff(map.bitmap, dom.used, n);
    t.is(d.count, 0, `${c.name}: block set differs from partclone.fat's: ${d.examples.join('; ')}`);
  }
  t.log(`${c.name}: ${map.filesystem}, ${ours[2]} of ${ours[1]} clusters used, ${map.usedBlocks} of ${map.totalBlocks} ${bps}-byte blocks to copy`);
}

for (const [i, c] of CONFIGS.entries()) {
  needs(`FAT: ${c.name} agrees with fsck.fat and partclone.fat`, async (t) => {
    await checkConfig(t, c, seedFromEnv(t) + i);
  });
}

needs('FAT: a chain pointer past the last cluster, a free root cluster, and a device smaller than the volume are refused', async (t) => {
  const dir = scratchDir(t, 'livesnap-fat-');
  const img = path.join(dir, 'fat.img');
  run('mkfs.vfat', ['-C', '-F', '32', '-s', '1', img, String(64 * 1024)]);
  populate(img, dir, 7, 4 * MiB);
  const bpb = parseBpb(fs.readFileSync(img).subarray(0, 512), 64 * MiB);
  if (typeof bpb === 'string') return t.fail(bpb);
  const fatAt = bpb.reservedSectors * 512;
  const patch = (off: number, v: number) => {
    const copy = path.join(dir, `bad-${off}.img`);
    fs.copyFileSync(img, copy);
    const fd = fs.openSync(copy, 'r+');
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    fs.writeSync(fd, b, 0, 4, off);
    fs.closeSync(fd);
    return copy;
  };
  // Cluster 10's entry points past the end.
  const bad1 = patch(fatAt + 10 * 4, bpb.clusters + 50);
  const e1 = await t.throwsAsync(readMap(bad1), { instanceOf: CorruptFileSystemError });
  t.regex(e1!.message, /entry of cluster 10 points to cluster \d+, outside clusters 2\.\./);
  // The root directory's cluster marked free, in every FAT copy.
  const bad2 = patch(fatAt + bpb.rootCluster * 4, 0);
  const fd = fs.openSync(bad2, 'r+');
  fs.writeSync(fd, Buffer.alloc(4), 0, 4, fatAt + bpb.fatSectors * 512 + bpb.rootCluster * 4);
  fs.closeSync(fd);
  const e2 = await t.throwsAsync(readMap(bad2), { instanceOf: CorruptFileSystemError });
  t.regex(e2!.message, /root directory's cluster \d+ is free/);

  // A truncated image: probe still says FAT; read refuses.
  const cut = sparseFile(path.join(dir, 'cut.img'), 32 * MiB);
  const src = fs.openSync(img, 'r'), dst = fs.openSync(cut, 'r+');
  const head = Buffer.alloc(MiB);
  fs.readSync(src, head, 0, MiB, 0); fs.writeSync(dst, head, 0, MiB, 0);
  fs.closeSync(src); fs.closeSync(dst);
  const e3 = await t.throwsAsync(readMap(cut), { instanceOf: CorruptFileSystemError });
  t.regex(e3!.message, /larger than the device/);
  // FAT copies that disagree: the union is copied, and said so.
  const mixed = patch(fatAt + bpb.fatSectors * 512 + (bpb.clusters - 5) * 4, 0x0fffffff);
  const m = await readMap(mixed);
  t.regex(m.notes.join('\n'), /FAT copies disagree on 1 entries/);
  t.true(m.bitmap.get(bpb.dataStart + (bpb.clusters - 7)), 'a cluster used only in the second FAT is copied');
  // A bad cluster (in both FATs) holds no data: not copied, and counted.
  const badAt = bpb.clusters - 3;
  const withBad = patch(fatAt + badAt * 4, 0x0ffffff7);
  const fd2 = fs.openSync(withBad, 'r+');
  const v = Buffer.alloc(4); v.writeUInt32LE(0x0ffffff7);
  fs.writeSync(fd2, v, 0, 4, fatAt + bpb.fatSectors * 512 + badAt * 4);
  fs.closeSync(fd2);
  const mb = await readMap(withBad);
  t.regex(mb.notes.join('\n'), /1 clusters marked bad in the FAT: not copied/);
  t.false(mb.bitmap.get(bpb.dataStart + badAt - 2));
});
