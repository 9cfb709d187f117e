// The btrfs reader against btrfs-progs' own view, on many generated volumes (DUP / single
// metadata and data, mixed block groups, node sizes 4 KiB..64 KiB, no skinny metadata, sha256
// checksums, metadata_uuid, compression, subvolumes and snapshots, files written and deleted by the
// kernel): the physical block set must equal what "btrfs inspect-internal dump-tree" implies (every
// EXTENT_ITEM / METADATA_ITEM mapped through every stripe of its CHUNK_ITEM, plus the superblock
// and its mirrors, the boot area before it and the device tail), and its logical byte count the
// superblock's bytes_used, which is also what partclone.btrfs reports as used (its domain log puts
// data extents at their logical addresses and keeps one copy of DUP metadata, so its block set is
// no reference). Plus a log tree (fsync'ed, not committed): kept, replayed after a restore.
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { btrfsReader, readBtrfsUsage } from '../src/fs/btrfs';
import { readUsedBlockMap } from '../src/fs/detect';
import { CorruptFileSystemError, type UsedBlockMap } from '../src/fs/used-map';
import { Bitset } from '../src/util/bitset';
import { livesnap } from './helpers/cli';
import { bitDiff } from './helpers/domain';
import { serialIf } from './helpers/skip';
import { loopDevice, mount, rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';
import { checksumTree } from './helpers/volumes';

const MiB = 1 << 20;
const needs = serialIf({ root: true, commands: ['mkfs.btrfs', 'btrfs', 'btrfstune', 'losetup', 'mount', 'partclone.btrfs'] });

interface Config { name: string; sizeMiB: number; mkfs: string[]; mountOpts?: string[]; tune?: string[]; snapshots?: boolean }
const CONFIGS: Config[] = [
  { name: 'defaults (DUP metadata, single data)', sizeMiB: 200, mkfs: [] },
  { name: 'single metadata and data', sizeMiB: 160, mkfs: ['-m', 'single', '-d', 'single'] },
  { name: 'DUP data and metadata', sizeMiB: 300, mkfs: ['-m', 'dup', '-d', 'dup'] },
  { name: 'mixed block groups, 64 MiB', sizeMiB: 64, mkfs: ['--mixed'] },
  { name: '64 KiB nodes, zstd compression, snapshots', sizeMiB: 300, mkfs: ['-n', '65536'], mountOpts: ['compress=zstd'], snapshots: true },
  { name: '4 KiB nodes, no skinny metadata', sizeMiB: 200, mkfs: ['-n', '4096', '-O', '^skinny-metadata'] },
  { name: 'sha256 checksums', sizeMiB: 160, mkfs: ['--csum', 'sha256'] },
  { name: 'metadata_uuid (btrfstune -m)', sizeMiB: 160, mkfs: [], tune: ['-m'] },
];

/** Files through the kernel: sizes from tiny (inline) to MiBs, some deleted, some rewritten. */
function fill(mnt: string, seed: number, budget: number, snapshots: boolean): void {
  const r = rng(seed);
  let root = mnt;
  if (snapshots) {
    run('btrfs', ['subvolume', 'create', path.join(mnt, 'vol')]);
    root = path.join(mnt, 'vol');
  }
  const files: string[] = [];
  let used = 0;
  for (let i = 0; used < budget && i < 300; i++) {
    const size = r() < 0.3 ? Math.floor(r() * 2000) : Math.floor(r() * Math.min(budget / 6, 3 * MiB));
    const b = Buffer.alloc(size);
    for (let k = 0; k + 4 <= size; k += 512) b.writeUInt32LE(Math.floor(r() * 2 ** 32), k);
    const dir = path.join(root, `d${i % 6}`);
    fs.mkdirSync(dir, { recursive: true });
    const f = path.join(dir, `f${i}`);
    fs.writeFileSync(f, b);
    files.push(f);
    used += size;
    if (snapshots && i === 40) run('btrfs', ['subvolume', 'snapshot', root, path.join(mnt, 'snap1')]);
  }
  for (const f of files) if (r() < 0.35) fs.rmSync(f);
  run('sync', ['-f', mnt]);
}

/** What dump-tree implies: every extent item on every stripe of its chunk, plus superblocks and the tail. */
function expectedFromDumpTree(dev: string, deviceSize: number, blockSize: number): { set: Bitset; logicalBytes: number; nodeSize: number } {
  const sup = run('btrfs', ['inspect-internal', 'dump-super', dev]);
  const nodeSize = Number(/^nodesize\s+(\d+)/m.exec(sup)![1]);
  const devBytes = Number(/^dev_item\.total_bytes\s+(\d+)/m.exec(sup)![1]);
  const chunks: Array<{ logical: number; length: number; offsets: number[] }> = [];
  let cur: (typeof chunks)[number] | undefined;
  for (const line of run('btrfs', ['inspect-internal', 'dump-tree', '-t', 'chunk', dev]).split('\n')) {
    let m = /key \(FIRST_CHUNK_TREE CHUNK_ITEM (\d+)\)/.exec(line);
    if (m) { cur = { logical: Number(m[1]), length: 0, offsets: [] }; chunks.push(cur); continue; }
    if (/^\s*item \d+ key/.test(line)) { cur = undefined; continue; }
    m = /^\s+length (\d+) owner/.exec(line);
    if (m && cur) cur.length = Number(m[1]);
    m = /^\s+stripe \d+ devid \d+ offset (\d+)/.exec(line);
    if (m && cur) cur.offsets.push(Number(m[1]));
  }
  const set = new Bitset(Math.ceil(deviceSize / blockSize));
  const mark = (a: number, b: number) => set.setRange(Math.floor(a / blockSize), Math.ceil(Math.min(b, deviceSize) / blockSize));
  let logicalBytes = 0;
  for (const line of run('btrfs', ['inspect-internal', 'dump-tree', '-t', 'extent', dev]).split('\n')) {
    const m = /^\s*item \d+ key \((\d+) (EXTENT_ITEM|METADATA_ITEM) (\d+)\)/.exec(line);
    if (!m) continue;
    const start = Number(m[1]);
    const len = m[2] === 'METADATA_ITEM' ? nodeSize : Number(m[3]);
    logicalBytes += len;
    const c = chunks.find((x) => start >= x.logical && start + len <= x.logical + x.length);
    if (!c) throw new Error(`dump-tree: extent ${start} in no chunk`);
    for (const o of c.offsets) mark(o + start - c.logical, o + start - c.logical + len);
  }
  mark(0, 0x10000 + 4096);
  for (const s of [64 << 20, 256 * 2 ** 30]) if (s + 4096 <= devBytes) mark(s, s + 4096);
  mark(devBytes, deviceSize);
  return { set, logicalBytes, nodeSize };
}

async function readMap(file: string): Promise<UsedBlockMap> {
  const d = Device.open(file);
  try { return await btrfsReader.read(d); } finally { d.close(); }
}

function partcloneUsedBlocks(dev: string, dir: string): { blocks: number; blockSize: number } {
  const log = path.join(dir, 'partclone.log');
  runStatus('partclone.btrfs', ['-c', '-s', dev, '-O', '/dev/null', '-L', log]);
  const text = fs.readFileSync(log, 'utf8');
  return { blocks: Number(/Space in use:.*?=\s*(\d+) Blocks/.exec(text)![1]), blockSize: Number(/Block size:\s*(\d+)/.exec(text)![1]) };
}

async function checkConfig(t: ExecutionContext, c: Config, seed: number): Promise<void> {
  const dir = scratchDir(t, 'livesnap-btrfs-');
  const img = sparseFile(path.join(dir, 'btrfs.img'), c.sizeMiB * MiB);
  run('mkfs.btrfs', ['-q', '-f', ...c.mkfs, img]);
  const loop = loopDevice(t, img);
  const mnt = mount(t, loop, path.join(dir, 'mnt'), c.mountOpts ?? []);
  fill(mnt, seed, (c.sizeMiB * MiB) / 4, !!c.snapshots);
  run('umount', [mnt]);
  if (c.tune) run('btrfstune', ['-f', ...c.tune, loop]);
  // Right after umount the kernel (or udev's probe of the change) may still hold the device for a
  // moment, and btrfs check opens it exclusively: look again a few times before calling it a failure.
  let check = runStatus('btrfs', ['check', '--readonly', loop]);
  for (let i = 0; i < 20 && check.status !== 0 && /Device or resource busy/.test(check.stderr); i++) {
    await new Promise((r) => setTimeout(r, 100));
    check = runStatus('btrfs', ['check', '--readonly', loop]);
  }
  t.is(check.status, 0, check.stderr);
  const map = await readMap(img);
  t.false(map.allBlocks);
  const want = expectedFromDumpTree(loop, c.sizeMiB * MiB, map.blockSize);
  const d = bitDiff(map.bitmap, want.set, map.totalBlocks);
  t.is(d.count, 0, `${c.name}: block set differs from dump-tree's: ${d.examples.join('; ')}`);
  const dev = Device.open(img);
  const u = await readBtrfsUsage(dev).finally(() => dev.close());
  t.is(u.extentBytes, want.logicalBytes, 'logical bytes: ours vs dump-tree');
  t.is(u.extentBytes, u.sb.bytesUsed, 'logical bytes: ours vs the superblock');
  if (!c.tune) {
    const pc = partcloneUsedBlocks(loop, dir);
    t.is(pc.blocks, Math.floor(u.extentBytes / pc.blockSize), 'partclone.btrfs\'s used blocks');
  }
  t.log(`${c.name}: ${map.usedBlocks} of ${map.totalBlocks} blocks to copy, ${u.chunks} chunks, ${u.treeBlocks} tree blocks, ${(u.extentBytes / MiB).toFixed(1)} MiB of extents`);
}

for (const [i, c] of CONFIGS.entries()) {
  needs(`btrfs: ${c.name} agrees with dump-tree`, async (t) => {
    await checkConfig(t, c, seedFromEnv(t) + i);
  });
}

needs('btrfs: a log tree (fsync\'ed, not committed) is kept; after backup and restore the mount replays it and the file is there', async (t) => {
  const dir = scratchDir(t, 'livesnap-btrfs-');
  const img = sparseFile(path.join(dir, 'btrfs.img'), 200 * MiB);
  run('mkfs.btrfs', ['-q', '-f', img]);
  const loop = loopDevice(t, img);
  const mnt = mount(t, loop, path.join(dir, 'mnt'), ['commit=300']);
  fill(mnt, 3, 20 * MiB, false);
  const r = rng(99);
  const late = Buffer.alloc(3 * MiB);
  for (let k = 0; k < late.length; k += 4) late.writeUInt32LE(Math.floor(r() * 2 ** 32), k);
  // Written and fsync'ed after the last commit: only the log tree knows about it.
  const fd = fs.openSync(path.join(mnt, 'fsynced.bin'), 'w');
  fs.writeSync(fd, late);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  // The device as a crash would leave it: copied while still mounted.
  const crash = path.join(dir, 'crash.img');
  run('cp', ['--sparse=always', img, crash]);
  run('umount', [mnt]);
  const sup = run('btrfs', ['inspect-internal', 'dump-super', crash]);
  const logRoot = Number(/^log_root\s+(\d+)/m.exec(sup)![1]);
  t.not(logRoot, 0, 'the copy has a log tree');
  const map = await readMap(crash);
  t.false(map.allBlocks);
  t.regex(map.notes.join('\n'), /log tree present.*data extents they name are kept/);
  const out = path.join(dir, 'backup.img');
  const b = livesnap(['backup', crash, '--to', out]);
  t.is(b.status, 0, b.stderr);
  fs.rmSync(img);
  runStatus('btrfs', ['device', 'scan', '--forget']);
  const loop2 = loopDevice(t, out);
  const mnt2 = mount(t, loop2, path.join(dir, 'mnt2'));
  t.true(fs.readFileSync(path.join(mnt2, 'fsynced.bin')).equals(late), 'the fsync\'ed file is replayed from the log tree');
  t.true(checksumTree(mnt2).size > 10);
  run('umount', [mnt2]);
  t.is(runStatus('btrfs', ['check', '--readonly', loop2]).status, 0);
});

needs('btrfs: corrupt superblock, tree block and chunk are refused; xxhash checksums and two devices are copied whole and said so', async (t) => {
  const dir = scratchDir(t, 'livesnap-btrfs-');
  const img = sparseFile(path.join(dir, 'btrfs.img'), 160 * MiB);
  run('mkfs.btrfs', ['-q', '-f', img]);
  const raw = fs.readFileSync(img);
  const variant = (name: string, edit: (b: Buffer) => void) => {
    const b = Buffer.from(raw);
    edit(b);
    const f = path.join(dir, `${name}.img`);
    fs.writeFileSync(f, b);
    return f;
  };
  const sbFlip = variant('sb', (b) => { b[0x10000 + 0x90]! ^= 0x01; });
  t.regex((await t.throwsAsync(readMap(sbFlip), { instanceOf: CorruptFileSystemError }))!.message, /superblock checksum mismatch/);
  // The root tree's block, both DUP copies broken.
  const rootLogical = Number(raw.readBigUInt64LE(0x10000 + 0x50));
  const chunkDump = run('btrfs', ['inspect-internal', 'dump-tree', '-t', 'chunk', img]);
  const m = [...chunkDump.matchAll(/CHUNK_ITEM (\d+)\)[^\n]*\n\s+length (\d+)[^\n]*METADATA[^\n]*\n[\s\S]*?stripe 0 devid 1 offset (\d+)\n\s+[^\n]*\n\s+stripe 1 devid 1 offset (\d+)/g)][0]!;
  const phys = [Number(m[3]), Number(m[4])].map((p) => p + rootLogical - Number(m[1]));
  const oneBad = variant('tree1', (b) => { b[phys[0]! + 200]! ^= 0xff; });
  const map1 = await readMap(oneBad);
  t.false(map1.allBlocks, 'one damaged DUP copy: the mirror is used');
  const bothBad = variant('tree2', (b) => { for (const p of phys) b[p + 200]! ^= 0xff; });
  t.regex((await t.throwsAsync(readMap(bothBad), { instanceOf: CorruptFileSystemError }))!.message, /root tree: tree block at logical \d+: checksum mismatch/);
  // Through detect: refused metadata means every block, with the reason.
  const d = Device.open(bothBad);
  const all = await readUsedBlockMap(d).finally(() => d.close());
  t.true(all.allBlocks);
  t.regex(all.notes.join('\n'), /btrfs metadata cannot be trusted/);
  // xxhash64 checksums: not read here, so copied whole and said so.
  const xx = sparseFile(path.join(dir, 'xx.img'), 160 * MiB);
  run('mkfs.btrfs', ['-q', '-f', '--csum', 'xxhash', xx]);
  const dx = Device.open(xx);
  const mx = await readUsedBlockMap(dx).finally(() => dx.close());
  t.true(mx.allBlocks);
  t.regex(mx.notes.join('\n'), /checksum type 1 \(xxhash64\) is not supported/);
  // Two devices: only one is here.
  const a = sparseFile(path.join(dir, 'a.img'), 160 * MiB), b2 = sparseFile(path.join(dir, 'b.img'), 160 * MiB);
  run('mkfs.btrfs', ['-q', '-f', a, b2]);
  const da = Device.open(a);
  const ma = await readUsedBlockMap(da).finally(() => da.close());
  t.true(ma.allBlocks);
  t.regex(ma.notes.join('\n'), /spans 2 devices/);
});
