// The NTFS reader against the tools' own view, on many generated volumes (cluster sizes 512 B to
// 64 KiB, 512- and 4096-byte sectors, sizes; files written and deleted through ntfs-3g): the used
// cluster count equals ntfscluster's (clusters minus its free clusters), and the cluster set equals
// partclone.ntfs's domain log. Plus a dirty volume (copied whole) and torn or broken records.
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { ntfsReader, parseNtfsBoot } from '../src/fs/ntfs';
import { CorruptFileSystemError } from '../src/fs/used-map';
import { bitDiff, partcloneDomain } from './helpers/domain';
import { testIf } from './helpers/skip';
import { rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const MiB = 1 << 20;
const needs = testIf({ root: true, commands: ['mkfs.ntfs', 'ntfs-3g', 'ntfscluster', 'partclone.ntfs'] });

interface Config { name: string; sizeMiB: number; args: string[] }
const CONFIGS: Config[] = [
  { name: '8 MiB, 512-byte clusters', sizeMiB: 8, args: ['-c', '512'] },
  { name: '64 MiB, default 4 KiB clusters', sizeMiB: 64, args: [] },
  { name: '100 MiB, 2 KiB clusters', sizeMiB: 100, args: ['-c', '2048'] },
  { name: '160 MiB, 64 KiB clusters', sizeMiB: 160, args: ['-c', '65536'] },
  { name: '120 MiB, 4096-byte sectors', sizeMiB: 120, args: ['-s', '4096'] },
  { name: '300 MiB, 16 KiB clusters', sizeMiB: 300, args: ['-c', '16384'] },
];

function populate(t: ExecutionContext, img: string, dir: string, seed: number, budget: number): void {
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt, { recursive: true });
  run('ntfs-3g', [img, mnt]);
  t.teardown(() => { if (runStatus('mountpoint', ['-q', mnt]).status === 0) runStatus('umount', ['-l', mnt]); });
  try {
    const r = rng(seed);
    const files: string[] = [];
    let used = 0;
    for (let i = 0; used < budget && i < 120; i++) {
      const size = Math.floor(r() * Math.min(budget / 5, 2 * MiB));
      const b = Buffer.alloc(size);
      for (let k = 0; k + 4 <= size; k += 1024) b.writeUInt32LE(Math.floor(r() * 2 ** 32), k);
      const sub = path.join(mnt, `d${i % 5}`);
      fs.mkdirSync(sub, { recursive: true });
      const f = path.join(sub, `f${i}`);
      fs.writeFileSync(f, b);
      files.push(f);
      used += size;
    }
    for (const f of files) if (r() < 0.4) fs.rmSync(f);
  } finally {
    run('umount', [mnt]);
  }
}

async function readMap(file: string) {
  const d = Device.open(file);
  try { return await ntfsReader.read(d); } finally { d.close(); }
}

for (const [i, c] of CONFIGS.entries()) {
  needs(`NTFS: ${c.name} agrees with ntfscluster and partclone.ntfs`, async (t) => {
    const seed = seedFromEnv(t) + i;
    const dir = scratchDir(t, 'livesnap-ntfs-');
    const img = sparseFile(path.join(dir, 'ntfs.img'), c.sizeMiB * MiB);
    run('mkfs.ntfs', ['-q', '-f', '-F', ...c.args, img]);
    populate(t, img, dir, seed, (c.sizeMiB * MiB) / 3);
    const info = runStatus('ntfscluster', ['-i', img]).stdout;
    const num = (re: RegExp) => Number(re.exec(info)?.[1] ?? NaN);
    const clusterSize = num(/bytes per cluster\s*:\s*(\d+)/);
    const freeClusters = num(/bytes of free space\s*:\s*(\d+)/) / clusterSize;
    const map = await readMap(img);
    t.false(map.allBlocks, map.notes.join('; '));
    t.is(map.blockSize, clusterSize);
    const g = parseNtfsBoot(fs.readFileSync(img).subarray(0, 512), c.sizeMiB * MiB);
    const ours = map.bitmap.count(0, g.clusters);
    t.is(ours, g.clusters - freeClusters, `${c.name}: used clusters (ours vs ntfscluster)`);
    // The tail: the sectors past the last cluster (the backup boot sector) are kept.
    t.true(map.bitmap.get(map.totalBlocks - 1));
    const dom = partcloneDomain('partclone.ntfs', img, dir, clusterSize);
    const d = bitDiff(map.bitmap, dom.used, g.clusters);
    t.is(d.count, 0, `${c.name}: cluster set differs from partclone.ntfs's: ${d.examples.join('; ')}`);
    t.log(`${c.name}: ${ours} of ${g.clusters} clusters of ${clusterSize} bytes used`);
  });
}

needs('NTFS: a dirty volume is copied whole; a torn $Bitmap record, a broken FILE magic and a truncated device are refused', async (t) => {
  const dir = scratchDir(t, 'livesnap-ntfs-');
  const img = sparseFile(path.join(dir, 'ntfs.img'), 32 * MiB);
  run('mkfs.ntfs', ['-q', '-f', '-F', img]);
  populate(t, img, dir, 11, 4 * MiB);
  const raw = fs.readFileSync(img);
  const g = parseNtfsBoot(raw.subarray(0, 512), raw.length);
  const rec = (n: number) => g.mftLcn * g.clusterSize + n * g.recordSize;
  const variant = (name: string, edit: (b: Buffer) => void) => {
    const b = Buffer.from(raw);
    edit(b);
    const f = path.join(dir, `${name}.img`);
    fs.writeFileSync(f, b);
    return f;
  };
  // $Volume's VOLUME_INFORMATION flags: the dirty bit.
  const dirty = variant('dirty', (b) => {
    const r = rec(3);
    let p = r + b.readUInt16LE(r + 0x14);
    while (b.readUInt32LE(p) !== 0x70) p += b.readUInt32LE(p + 4);
    const v = p + b.readUInt16LE(p + 20);
    b.writeUInt16LE(b.readUInt16LE(v + 10) | 1, v + 10);
  });
  const m = await readMap(dirty);
  t.true(m.allBlocks);
  t.is(m.usedBlocks, m.totalBlocks);
  t.regex(m.notes.join('\n'), /marked dirty.*every block is copied/);
  const torn = variant('torn', (b) => { b.writeUInt16LE(b.readUInt16LE(rec(6) + 510) ^ 0xffff, rec(6) + 510); });
  t.regex((await t.throwsAsync(readMap(torn), { instanceOf: CorruptFileSystemError }))!.message, /\$Bitmap.*torn/);
  const nomagic = variant('nomagic', (b) => { b.write('BAAD', rec(6), 'latin1'); });
  t.regex((await t.throwsAsync(readMap(nomagic), { instanceOf: CorruptFileSystemError }))!.message, /record 6.*no FILE magic/);
  const cut = path.join(dir, 'cut.img');
  fs.writeFileSync(cut, raw.subarray(0, 16 * MiB));
  t.regex((await t.throwsAsync(readMap(cut), { instanceOf: CorruptFileSystemError }))!.message, /larger than the device/);
});
