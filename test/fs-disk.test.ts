// Whole disks end to end: GPT and MBR disks (seeded sizes) with ext4, XFS, swap, FAT, btrfs, NTFS
// partitions, an unknown one, a gap holding data, and LVM PVs holding LVs (linear, two-segment,
// striped over two PVs). For each: the layout tree names every part; the disk's used bytes are
// the sum of its parts plus the tables within 1 %; backup to an image and to a tar archive, restore
// the archive to a new image; every partition's and LV's file system passes its own fsck and every
// file matches; the swap header page is kept; the image and the restored archive are identical.
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device, type BlockReader } from '../src/device/device';
import { readFileSystem, readUsedBlockMap } from '../src/fs/detect';
import type { LayoutNode } from '../src/fs/layout';
import { SliceReader } from '../src/fs/slice-reader';
import type { UsedBlockMap } from '../src/fs/used-map';
import { Bitset } from '../src/util/bitset';
import { lastJson, livesnap } from './helpers/cli';
import { fsck, gatherLv, loopAt, makeDisk, readFsChecksums, type BuiltDisk, type DiskSpec } from './helpers/disks';
import { serialIf } from './helpers/skip';
import { rng, runStatus, scratchDir, seedFromEnv } from './helpers/system';

const MiB = 1 << 20;
const needs = serialIf({
  root: true,
  commands: ['sfdisk', 'losetup', 'mount', 'mkfs.ext4', 'mkfs.xfs', 'mkfs.btrfs', 'mkfs.ntfs', 'ntfs-3g', 'mkfs.vfat', 'mcopy', 'fsck.fat', 'mkswap', 'pvcreate', 'xfs_repair', 'btrfs', 'ntfsfix'],
});

const between = (r: () => number, lo: number, hi: number) => lo + Math.floor(r() * (hi - lo + 1));

function gptSpec(seed: number): DiskSpec {
  const r = rng(seed);
  const ext4 = between(r, 64, 128), xfs = between(r, 300, 340), btrfs = between(r, 160, 220), ntfs = between(r, 48, 96), swap = between(r, 16, 48);
  const lvExt4 = between(r, 48, 96), lvXfs = between(r, 300, 320);
  const pv = lvExt4 + lvXfs + 24;
  const parts: DiskSpec['parts'] = [
    { fs: 'fat', sizeMiB: between(r, 64, 96), dataMiB: 3, fatBits: 32 },
    { fs: 'ext4', sizeMiB: ext4, dataMiB: between(r, 4, 10) },
    { fs: 'swap', sizeMiB: swap },
    { fs: 'gap', sizeMiB: 2, dataMiB: 1 },
    { fs: 'xfs', sizeMiB: xfs, dataMiB: between(r, 4, 10) },
    { fs: 'btrfs', sizeMiB: btrfs, dataMiB: between(r, 4, 10) },
    { fs: 'ntfs', sizeMiB: ntfs, dataMiB: between(r, 3, 8) },
    { fs: 'raw', sizeMiB: 4, dataMiB: 1 },
    { fs: 'lvm', sizeMiB: pv },
  ];
  const used = parts.reduce((n, p) => n + p.sizeMiB, 0);
  return {
    label: 'gpt', sizeMiB: used + between(r, 8, 64), parts, seed,
    lvs: [
      { name: 'home', fs: 'ext4', sizeMiB: lvExt4, dataMiB: between(r, 4, 8) },
      { name: 'srv', fs: 'xfs', sizeMiB: lvXfs, dataMiB: between(r, 4, 8), twoSegments: true },
    ],
  };
}

function mbrSpec(seed: number): DiskSpec {
  const r = rng(seed ^ 0x5a5a);
  const lvExt4 = between(r, 48, 80), lvXfs = between(r, 300, 310);
  const pvEach = Math.ceil((lvExt4 + lvXfs) / 2) + 16;
  const parts: DiskSpec['parts'] = [
    // The old DOS alignment: sector 63, so the disk map falls back to 512-byte blocks.
    { fs: 'fat', sizeMiB: between(r, 32, 64), dataMiB: 2, startSector: 63, fatBits: 16 },
    { fs: 'ext4', sizeMiB: between(r, 64, 100), dataMiB: between(r, 4, 8) },
    { fs: 'xfs', sizeMiB: between(r, 300, 330), dataMiB: between(r, 4, 8) },
    { fs: 'swap', sizeMiB: between(r, 16, 40) },
    { fs: 'btrfs', sizeMiB: between(r, 160, 200), dataMiB: between(r, 4, 8) },
    { fs: 'ntfs', sizeMiB: between(r, 48, 80), dataMiB: between(r, 3, 6) },
    { fs: 'lvm', sizeMiB: pvEach },
    { fs: 'lvm', sizeMiB: pvEach },
  ];
  const used = parts.reduce((n, p) => n + p.sizeMiB + 2, 0);
  return {
    label: 'dos', primaries: 3, sizeMiB: used + between(r, 8, 32), parts, seed,
    lvs: [
      { name: 'data', fs: 'ext4', sizeMiB: lvExt4, dataMiB: between(r, 4, 8), stripes: 2 },
      { name: 'logs', fs: 'xfs', sizeMiB: lvXfs, dataMiB: between(r, 3, 6) },
    ],
  };
}

async function withDevice<T>(file: string, fn: (d: Device) => Promise<T>): Promise<T> {
  const d = Device.open(file);
  try { return await fn(d); } finally { d.close(); }
}

function find(root: LayoutNode, pred: (n: LayoutNode) => boolean): LayoutNode[] {
  const out: LayoutNode[] = [];
  const walk = (n: LayoutNode) => { if (pred(n)) out.push(n); n.children.forEach(walk); };
  walk(root);
  return out;
}

const usedBytes = (m: UsedBlockMap, size: number) => Math.min(m.usedBlocks * m.blockSize, size);

/** A read-only view of an LV inside a disk image, by the pieces LVM reported (the test's own mapping). */
function lvView(dev: BlockReader, lv: BuiltDisk['lvs'][number]): BlockReader {
  const map = (o: number, l: number) => {
    const out: Array<{ offset: number; length: number; at: number }> = [];
    let at = 0;
    for (const p of lv.pieces) {
      const a = Math.max(o, p.lvOffset), b = Math.min(o + l, p.lvOffset + p.length);
      if (b > a) out.push({ offset: p.diskOffset + (a - p.lvOffset), length: b - a, at: a - o });
    }
    return out;
  };
  return {
    size: lv.size,
    read: async (o, l) => (await dev.readMany(map(o, l).map((x) => ({ offset: x.offset, length: x.length })))).reduce((buf, b, i) => { b.copy(buf, map(o, l)[i]!.at); return buf; }, Buffer.alloc(l)),
    readMany: async (ranges) => Promise.all(ranges.map(async (r) => {
      const m = map(r.offset, r.length);
      const bufs = await dev.readMany(m.map((x) => ({ offset: x.offset, length: x.length })));
      const out = Buffer.alloc(r.length);
      bufs.forEach((b, i) => b.copy(out, m[i]!.at));
      return out;
    })),
  };
}

async function checkDisk(t: ExecutionContext, spec: DiskSpec): Promise<void> {
  const dir = scratchDir(t, 'livesnap-disk-');
  const t0 = Date.now();
  const disk = makeDisk(t, dir, spec);
  t.log(`${spec.label} disk of ${spec.sizeMiB} MiB built in ${Date.now() - t0} ms: ${disk.parts.map((p) => `${p.number}:${p.fs}@${p.offset / MiB}M+${p.size / MiB}M`).join(' ')}; LVs ${disk.lvs.map((l) => `${l.name}(${l.fs}, ${l.segments} segments, ${l.stripes} stripes)`).join(', ')}`);

  // The map and its tree.
  const { map, parts, lvParts } = await withDevice(disk.file, async (d) => {
    const map = await readUsedBlockMap(d, disk.file);
    const parts = await Promise.all(disk.parts.map(async (p) => ({ p, map: await readFileSystem(new SliceReader(d, p.offset, p.size)) })));
    const lvParts = await Promise.all(disk.lvs.map(async (lv) => ({ lv, map: await readFileSystem(lvView(d, lv)) })));
    return { map, parts, lvParts };
  });
  const layout = map.layout!;
  t.is(map.filesystem, spec.label === 'gpt' ? 'gpt' : 'mbr');
  t.false(map.allBlocks);
  t.is(map.blockSize, spec.label === 'gpt' ? 4096 : 512, 'GPT partitions are 1 MiB-aligned (4096-byte blocks); the MBR has one at sector 63 (512)');
  const want: Record<string, string> = { ext4: 'ext4', xfs: 'xfs', btrfs: 'btrfs', ntfs: 'ntfs', swap: 'swap', lvm: 'lvm2', raw: 'unknown' };
  for (const p of disk.parts) {
    const node = layout.children.find((n) => n.kind === 'partition' && n.offset === p.offset);
    t.truthy(node, `partition ${p.number} is in the tree`);
    if (!node) continue;
    t.is(node.size, p.size);
    if (p.fs === 'fat') t.regex(node.content, /^fat(16|32)$/);
    else t.is(node.content, want[p.fs], `partition ${p.number} (${p.fs})`);
    if (p.fs === 'raw') { t.true(node.allBlocks); t.is(node.usedBytes, p.size); t.regex(node.notes.join('\n'), /unknown/); }
    if (p.fs === 'swap') t.is(node.usedBytes, 4096);
  }
  for (const lv of disk.lvs) {
    const node = find(layout, (n) => n.kind === 'lvm-lv' && n.name.endsWith(`/${lv.name}`))[0];
    t.truthy(node, `LV ${lv.name} is in the tree`);
    t.is(node?.content, lv.fs);
    t.is(node?.size, lv.size);
    t.false(node?.allBlocks ?? true);
    if (lv.stripes > 1) t.regex(node!.notes.join('\n'), /striped over 2 PVs/);
  }
  t.true(find(layout, (n) => n.kind === 'lvm-free').length >= 1, 'free PV extents are named');
  for (const g of disk.gaps) {
    const node = layout.children.find((n) => n.kind === 'gap' && n.offset! <= g.offset && n.offset! + n.size > g.offset);
    t.is(node?.content, 'data', 'a gap that holds data is copied and named');
    t.true((node?.usedBytes ?? 0) >= MiB);
  }
  // The sum of the parts (each read alone) plus the tables, PV headers and gaps with data.
  const partsBytes = parts.reduce((n, x) => (x.p.fs === 'lvm' ? n : n + usedBytes(x.map, x.p.size)), 0)
    + lvParts.reduce((n, x) => n + usedBytes(x.map, x.lv.size), 0);
  const overhead = find(layout, (n) => n.kind === 'tables' || n.kind === 'gap').reduce((n, x) => n + x.usedBytes, 0);
  const total = map.usedBlocks * map.blockSize;
  t.log(`disk: ${(total / MiB).toFixed(2)} MiB to copy; parts ${(partsBytes / MiB).toFixed(2)} MiB + tables and gaps ${(overhead / MiB).toFixed(2)} MiB`);
  t.true(Math.abs(total - partsBytes - overhead) <= 0.01 * partsBytes, `whole disk ${total} vs parts ${partsBytes} + overhead ${overhead}`);
  t.true(total >= partsBytes, 'the disk copies at least what every part copies');

  // inspect: the same tree, as text and JSON.
  const ins = livesnap(['inspect', disk.file, '--json']);
  t.is(ins.status, 0, ins.stderr);
  t.deepEqual((lastJson(ins.stdout).layout as LayoutNode), JSON.parse(JSON.stringify(layout)));
  const insText = livesnap(['inspect', disk.file]);
  t.is(insText.status, 0, insText.stderr);
  t.regex(insText.stdout, /├─ partition \d .*ext4/);
  t.regex(insText.stdout, new RegExp(`lv lstest\\d+x\\d+/${spec.lvs![0]!.name}  ext4`));

  // Backups: image and tar; the archive restored to a new image.
  const img = path.join(dir, 'backup.img');
  const tar = path.join(dir, 'backup.tar');
  const restored = path.join(dir, 'restored.img');
  const b1 = livesnap(['backup', disk.file, '--to', img, '--json']);
  t.is(b1.status, 0, b1.stderr);
  const summary = lastJson(b1.stdout);
  t.is(summary.filesystem, map.filesystem);
  t.deepEqual(summary.layout, JSON.parse(JSON.stringify(layout)), 'the backup summary carries the tree');
  const b2 = livesnap(['backup', disk.file, '--to', tar]);
  t.is(b2.status, 0, b2.stderr);
  t.regex(b2.stdout + b2.stderr, /layout/);
  const manifest = JSON.parse(runStatus('tar', ['-xOf', tar, 'manifest.json']).stdout) as { layout?: unknown };
  t.deepEqual(manifest.layout, JSON.parse(JSON.stringify(layout)), 'the archive manifest carries the tree');
  const r = livesnap(['restore', tar, '--to', restored]);
  t.is(r.status, 0, r.stderr);
  t.is(runStatus('cmp', [img, restored]).status, 0, 'image backup and restored archive are identical');
  const v = livesnap(['verify', img, '--against', disk.file]);
  t.is(v.status, 0, v.stdout + v.stderr);

  // Every file system of the restored disk: its own fsck, every file.
  for (const p of disk.parts) {
    if (p.fs === 'lvm' || p.fs === 'raw') continue;
    const loop = loopAt(t, restored, p.offset, p.size, { readOnly: p.fs !== 'ntfs' && p.fs !== 'btrfs' });
    try {
      if (p.fs === 'swap') {
        const a = Buffer.alloc(4096), b = Buffer.alloc(4096);
        const fa = fs.openSync(disk.file, 'r'), fb = fs.openSync(restored, 'r');
        fs.readSync(fa, a, 0, 4096, p.offset); fs.readSync(fb, b, 0, 4096, p.offset);
        fs.closeSync(fa); fs.closeSync(fb);
        t.true(a.equals(b), 'the swap header page is restored');
        t.regex(a.toString('latin1', 4086, 4096), /SWAPSPACE2/);
        continue;
      }
      const kind = p.fs as 'ext4' | 'xfs' | 'btrfs' | 'ntfs' | 'fat';
      t.is(fsck(loop.dev, kind), undefined, `partition ${p.number} (${p.fs}) passes its fsck`);
      t.deepEqual(readFsChecksums(t, loop.dev, kind, path.join(dir, `check-p${p.number}`)), p.checksums!, `partition ${p.number} (${p.fs}): every file matches`);
    } finally {
      loop.detach();
    }
  }
  for (const lv of disk.lvs) {
    const image = gatherLv(restored, lv, path.join(dir, `restored-lv-${lv.name}.img`));
    const loop = loopAt(t, image, 0, lv.size);
    try {
      t.is(fsck(loop.dev, lv.fs), undefined, `LV ${lv.name} (${lv.fs}) passes its fsck`);
      t.deepEqual(readFsChecksums(t, loop.dev, lv.fs, path.join(dir, `check-lv-${lv.name}`)), lv.checksums, `LV ${lv.name}: every file matches`);
    } finally {
      loop.detach();
      fs.rmSync(image);
    }
  }
  t.log(`${spec.label} disk checked in ${Date.now() - t0} ms`);
}

needs('GPT disk: ESP, ext4, swap, gap with data, XFS, btrfs, NTFS, unknown, LVM (linear + two-segment LVs): tree, sizes, backup, restore, fsck, files', async (t) => {
  await checkDisk(t, gptSpec(seedFromEnv(t)));
});

needs('MBR disk: FAT16 at sector 63, ext4, XFS, logicals (swap, btrfs, NTFS, two PVs with a striped LV): tree, sizes, backup, restore, fsck, files', async (t) => {
  await checkDisk(t, mbrSpec(seedFromEnv(t)));
});

needs('GPT disk past 2 TiB: partitions and LVM extents beyond sector 2^32 are mapped exactly, backed up, and their file systems restored intact', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t, 'livesnap-disk-');
  const TiB = 2 ** 40;
  // ext4, then a swap space that carries everything past sector 2^32, then ext4 and a PV out there.
  const swapMiB = (2 * TiB) / MiB - 64;
  const spec: DiskSpec = {
    label: 'gpt', sizeMiB: swapMiB + 64 + 64 + 96 + 8, seed,
    parts: [
      { fs: 'ext4', sizeMiB: 64, dataMiB: 2 },
      { fs: 'swap', sizeMiB: swapMiB },
      { fs: 'ext4', sizeMiB: 64, dataMiB: 3 },
      { fs: 'lvm', sizeMiB: 96 },
    ],
    lvs: [{ name: 'far', fs: 'ext4', sizeMiB: 64, dataMiB: 3 }],
  };
  const disk = makeDisk(t, dir, spec);
  const far = disk.parts[2]!;
  t.true(far.offset / 512 > 2 ** 32, `partition 3 starts at sector ${far.offset / 512}, past 2^32`);
  t.true(disk.lvs[0]!.pieces[0]!.diskOffset / 4096 > 2 ** 29, 'the LV lies past 2 TiB too');
  const { map, farMap, lvMap } = await withDevice(disk.file, async (d) => ({
    map: await readUsedBlockMap(d, disk.file),
    farMap: await readFileSystem(new SliceReader(d, far.offset, far.size)),
    lvMap: await readFileSystem(lvView(d, disk.lvs[0]!)),
  }));
  t.is(map.blockSize, 4096);
  t.false(map.allBlocks, map.notes.join('; '));
  // Block for block: the far partition's map sits exactly at its offset.
  // (mkfs.ext4 picks 1 KiB blocks for 64 MiB: the partition's map in the disk's 4 KiB blocks.)
  const base = far.offset / 4096;
  const fbs = farMap.blockSize;
  const want = new Bitset(far.size / 4096);
  for (const [a, e] of farMap.bitmap.runs()) want.setRange(Math.floor((a * fbs) / 4096), Math.ceil((e * fbs) / 4096));
  let mismatch = 0;
  for (let k = 0; k < want.size; k++) if (map.bitmap.get(base + k) !== want.get(k)) mismatch++;
  t.is(mismatch, 0, 'the map of partition 3 is placed at its offset past sector 2^32');
  const lvNode = find(map.layout!, (n) => n.kind === 'lvm-lv')[0]!;
  t.is(lvNode.usedBytes, usedBytes(lvMap, disk.lvs[0]!.size));
  const img = path.join(dir, 'backup.img');
  const b = livesnap(['backup', disk.file, '--to', img]);
  t.is(b.status, 0, b.stderr);
  t.is(fs.statSync(img).size, disk.size);
  const loop = loopAt(t, img, far.offset, far.size, { readOnly: true });
  try {
    t.is(fsck(loop.dev, 'ext4'), undefined);
    t.deepEqual(readFsChecksums(t, loop.dev, 'ext4', path.join(dir, 'check-far')), far.checksums!);
  } finally {
    loop.detach();
  }
  const lvImg = gatherLv(img, disk.lvs[0]!, path.join(dir, 'far-lv.img'));
  const lvLoop = loopAt(t, lvImg, 0, disk.lvs[0]!.size, { readOnly: true });
  try {
    t.is(fsck(lvLoop.dev, 'ext4'), undefined);
    t.deepEqual(readFsChecksums(t, lvLoop.dev, 'ext4', path.join(dir, 'check-far-lv')), disk.lvs[0]!.checksums);
  } finally {
    lvLoop.detach();
  }
});

needs('a PV on the whole device (no partition table): its LVs read through their mapping, backed up and restored intact', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t, 'livesnap-disk-');
  const disk = makeDisk(t, dir, {
    label: 'none', sizeMiB: 128, seed, parts: [{ fs: 'lvm', sizeMiB: 128 }],
    lvs: [{ name: 'root', fs: 'ext4', sizeMiB: 48, dataMiB: 4, twoSegments: true }],
  });
  const map = await withDevice(disk.file, (d) => readUsedBlockMap(d, disk.file));
  t.is(map.filesystem, 'lvm2');
  t.false(map.allBlocks, map.notes.join('; '));
  const lv = find(map.layout!, (n) => n.kind === 'lvm-lv')[0]!;
  t.is(lv.content, 'ext4');
  t.true(find(map.layout!, (n) => n.kind === 'lvm-free')[0]!.size > 0, 'the extents no LV owns are free');
  t.true(map.usedBlocks * map.blockSize < disk.size / 4, 'free extents are not copied');
  const img = path.join(dir, 'backup.img');
  const b = livesnap(['backup', disk.file, '--to', img]);
  t.is(b.status, 0, b.stderr);
  const lvImg = gatherLv(img, disk.lvs[0]!, path.join(dir, 'root.img'));
  const loop = loopAt(t, lvImg, 0, disk.lvs[0]!.size, { readOnly: true });
  try {
    t.is(fsck(loop.dev, 'ext4'), undefined);
    t.deepEqual(readFsChecksums(t, loop.dev, 'ext4', path.join(dir, 'check-root')), disk.lvs[0]!.checksums);
  } finally {
    loop.detach();
  }
});
