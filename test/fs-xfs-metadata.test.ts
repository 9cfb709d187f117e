// The XFS metadata-block map against the reference: real file systems (v5, v4, sparse inodes,
// rmapbt + reflink, 1 KiB and 4 KiB blocks, 2..8 AGs, quotas) populated through a mount with every
// directory format, btree-format files, leaf/node/remote xattrs, symlinks and deleted files; then
// `xfs_metadump -a -o` + `xfs_mdrestore` give an image holding only the metadata blocks, and every
// non-zero block of it must be in our map. Our map must also lie inside the used map and leave out
// the data blocks of large files (from xfs_bmap -v). A seeded fuzz flips bytes of captured metadata.
import test from 'ava';
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { CorruptFileSystemError } from '../src/fs/used-map';
import { xfsReader, xfsChecksum } from '../src/fs/xfs';
import { readXfsMetadata, readXfsMetadataCounted } from '../src/fs/xfs-metadata';
import { readMetadataMap } from '../src/fs/metadata-map';
import { loopDevice, rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';
import { testIf } from './helpers/skip';
import { capture, MemReader } from './helpers/mem-reader';

const MiB = 1 << 20;
const needs = { root: true, commands: ['mkfs.xfs', 'xfs_db', 'xfs_metadump', 'xfs_mdrestore', 'xfs_bmap', 'mount', 'umount', 'losetup', 'xfs_io'] };
// Debian's python3 (setup installs it; another one earlier in PATH may lack nothing, but is not the tested one).
const PY = fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
// One at a time: each builds and fills file systems, and the machine is small.
const xfsTest = testIf(needs, { serial: true });

interface Case {
  name: string;
  size: number;
  mkfs: string[];
  mountOpts?: string[];
  /** Fill the file system with small files and delete every other one first (sparse inode chunks). */
  fragment?: boolean;
  reflink?: boolean;
  realtime?: boolean;
  /** Made but not mounted (an external log needs a device of its own to mount with). */
  noMount?: boolean;
  externalLog?: boolean;
  seed: number;
}

interface Made {
  file: string;
  mounted: boolean;
  /** Data extents of large files, as linear fs blocks [start, end). */
  dataExtents: Array<[number, number]>;
  /** Inode numbers of directories expected in each format, for the format check. */
  dirInodes: Record<string, number>;
  bigFileInodes: number[];
}

/** Writes a python helper that sets xattrs (no setfattr here): file, count, value size, name prefix. */
function setXattrs(file: string, count: number, valueSize: number, prefix = 'user.a'): void {
  run(PY, ['-c', `import os,sys\nf=sys.argv[1]\nfor i in range(int(sys.argv[2])): os.setxattr(f, '${prefix}%05d' % i, b'v' * int(sys.argv[3]))`, file, String(count), String(valueSize)]);
}

/** Daddr ranges (512-byte units) of a file's data from `xfs_bmap -v`, as linear blocks. */
function bmapExtents(file: string, blockSize: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const line of run('xfs_bmap', ['-v', file]).split('\n')) {
    const m = /^\s*\d+: \[\d+\.\.\d+\]:\s+(\d+)\.\.(\d+)\s/.exec(line);
    if (m) out.push([(Number(m[1]) * 512) / blockSize, ((Number(m[2]) + 1) * 512) / blockSize]);
  }
  return out;
}

function populate(t: ExecutionContext, mnt: string, c: Case, blockSize: number): Omit<Made, 'file' | 'mounted'> {
  const r = rng(c.seed);
  const dirInodes: Record<string, number> = {};
  if (c.fragment) {
    // Sparse inode chunks: leave free space only in holes smaller than a chunk (31 blocks every
    // 62, punched in a preallocated file), take the contiguous rest the reserve hides with a second
    // preallocation, then make inodes; the allocator must place partial (sparse) chunks.
    const hog = path.join(mnt, 'hog');
    let size = Math.floor((fs.statfsSync(mnt).bavail * blockSize) / blockSize) * blockSize;
    for (let k = 0; k < 64; k++, size -= 64 * blockSize) {
      const r = runStatus('xfs_io', ['-f', '-c', `falloc 0 ${size}`, hog]);
      if (r.status === 0 && !/No space/.test(r.stderr)) break;
    }
    const punches: string[] = [];
    for (let o = 0; o + 62 * blockSize <= size; o += 62 * blockSize) punches.push('-c', `fpunch ${o} ${31 * blockSize}`);
    run('xfs_io', [...punches, hog]);
    runStatus('xfs_io', ['-f', '-c', `falloc 0 ${16 * MiB}`, path.join(mnt, 'hog2')]);
    const early = path.join(mnt, 'early');
    fs.mkdirSync(early);
    try {
      for (let i = 0; i < 2000; i++) fs.writeFileSync(path.join(early, `e${i}`), '');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOSPC') throw e;
    }
    fs.rmSync(hog);
    fs.rmSync(path.join(mnt, 'hog2'));
    run('sync', []);
  }
  // Directories of every format: shortform, block, leaf, node, and two big ones grown in turn so
  // their blocks interleave (more extents than fit in the inode: btree format).
  const sizes: Array<[string, number, number]> = [['short', 5, 8], ['block', 40, 12], ['leaf', 400, 20], ['node', 3000, 20]];
  for (const [name, n, len] of sizes) {
    const d = path.join(mnt, name);
    fs.mkdirSync(d);
    for (let i = 0; i < n; i++) fs.writeFileSync(path.join(d, `${String(i).padStart(len, 'n')}`), '');
    dirInodes[name] = fs.statSync(d).ino;
  }
  const bt1 = path.join(mnt, 'btree1'), bt2 = path.join(mnt, 'btree2');
  fs.mkdirSync(bt1);
  fs.mkdirSync(bt2);
  for (let i = 0; i < 2500; i++) {
    const name = `${String(i).padStart(6, '0')}-${'x'.repeat(200)}`;
    fs.writeFileSync(path.join(bt1, name), '');
    fs.writeFileSync(path.join(bt2, name), '');
  }
  dirInodes.btree = fs.statSync(bt1).ino;
  // Many small files, about half deleted.
  const small = path.join(mnt, 'small');
  fs.mkdirSync(small);
  for (let i = 0; i < 1500; i++) fs.writeFileSync(path.join(small, `s${i}`), Buffer.alloc(1 + Math.floor(r() * 3 * blockSize), i % 251));
  run('sync', []);
  for (let i = 0; i < 1500; i++) if (r() < 0.5) fs.unlinkSync(path.join(small, `s${i}`));
  // Large files: one contiguous, two with a block written every other block (one extent each:
  // btree data forks, one with a two-level tree).
  const big = path.join(mnt, 'big');
  fs.mkdirSync(big);
  fs.writeFileSync(path.join(big, 'contiguous'), Buffer.alloc(16 * MiB, 0xab));
  const blk = Buffer.alloc(blockSize, 0xcd);
  for (const [name, n] of [['sparse1', 600], ['sparse2', blockSize === 1024 ? 5000 : 3000]] as const) {
    const fd = fs.openSync(path.join(big, name), 'w');
    try { for (let i = 0; i < n; i++) fs.writeSync(fd, blk, 0, blockSize, 2 * i * blockSize); } finally { fs.closeSync(fd); }
  }
  // Two big files written in turn, a block at a time with fsync: interleaved physical extents.
  const fa = fs.openSync(path.join(big, 'inter-a'), 'w'), fb = fs.openSync(path.join(big, 'inter-b'), 'w');
  try {
    for (let i = 0; i < 120; i++) {
      fs.writeSync(fa, blk); fs.fsyncSync(fa);
      fs.writeSync(fb, blk); fs.fsyncSync(fb);
    }
  } finally { fs.closeSync(fa); fs.closeSync(fb); }
  // xattrs: shortform, leaf, node, remote values; and a file with many remote values.
  const attrs = path.join(mnt, 'attrs');
  fs.mkdirSync(attrs);
  const af = (n: string) => { const p = path.join(attrs, n); fs.writeFileSync(p, 'x'); return p; };
  setXattrs(af('short'), 3, 10);
  setXattrs(af('leaf'), 60, 40);
  setXattrs(af('node'), 2500, 60);
  setXattrs(af('remote'), 40, 3000);
  setXattrs(path.join(mnt, 'node'), 200, 80, 'user.d');
  // Symlinks: inline and remote (extents format).
  const links = path.join(mnt, 'links');
  fs.mkdirSync(links);
  for (let i = 0; i < 50; i++) fs.symlinkSync(i % 2 ? `t${i}` : `${'/long'.repeat(180)}/${i}`, path.join(links, `l${i}`));
  if (c.reflink) {
    run('cp', ['--reflink=always', path.join(big, 'contiguous'), path.join(big, 'clone')]);
    const fd = fs.openSync(path.join(big, 'clone'), 'r+');
    try { for (let i = 0; i < 64; i++) fs.writeSync(fd, blk, 0, blockSize, i * 37 * blockSize); } finally { fs.closeSync(fd); }
  }
  // Deleted: a whole directory tree and a big file.
  fs.rmSync(path.join(mnt, 'btree2'), { recursive: true });
  fs.rmSync(path.join(big, 'sparse1'));
  run('sync', []);
  const dataExtents: Array<[number, number]> = [];
  const bigFileInodes: number[] = [];
  for (const n of ['contiguous', 'sparse2', 'inter-a', 'inter-b']) {
    dataExtents.push(...bmapExtents(path.join(big, n), blockSize));
    bigFileInodes.push(fs.statSync(path.join(big, n)).ino);
  }
  t.log(`${c.name}: populated; ${dataExtents.length} data extents of large files to check`);
  return { dataExtents, dirInodes, bigFileInodes };
}

function makeCase(t: ExecutionContext, dir: string, c: Case): Made | undefined {
  const file = sparseFile(path.join(dir, `${c.name}.img`), c.size);
  const mk = runStatus('mkfs.xfs', ['-q', '-f', ...c.mkfs, file]);
  if (mk.status !== 0) {
    t.log(`${c.name}: mkfs.xfs ${c.mkfs.join(' ')} refused (${mk.stderr.trim().split('\n').pop()}): case skipped`);
    return undefined;
  }
  const blockSize = run('xfs_db', ['-r', '-c', 'sb 0', '-c', 'print blocksize', file]).trim().split(' = ')[1];
  if (c.noMount) return { file, mounted: false, dataExtents: [], dirInodes: {}, bigFileInodes: [] };
  const dev = loopDevice(t, file);
  const mnt = path.join(dir, `${c.name}.mnt`);
  fs.mkdirSync(mnt);
  let m = runStatus('mount', [...(c.mountOpts ? ['-o', c.mountOpts.join(',')] : []), dev, mnt]);
  if (m.status !== 0 && c.mountOpts) {
    t.log(`${c.name}: mount -o ${c.mountOpts.join(',')} refused (${lastKernelLine()}); mounted without the options`);
    m = runStatus('mount', [dev, mnt]);
  }
  if (m.status !== 0) {
    t.log(`${c.name}: mount refused (${lastKernelLine()}); compared as freshly made`);
    return { file, mounted: false, dataExtents: [], dirInodes: {}, bigFileInodes: [] };
  }
  try {
    return { file, mounted: true, ...populate(t, mnt, c, Number(blockSize)) };
  } finally {
    if (runStatus('umount', [mnt]).status !== 0) runStatus('umount', ['-l', mnt]);
  }
}

function lastKernelLine(): string {
  return runStatus('dmesg', []).stdout.trim().split('\n').pop()?.replace(/^\[[^\]]*\]\s*/, '') ?? '';
}

/** What xfs_db says a block is (for the failure message). */
function describe(file: string, blocks: number[], agblocks: number, blockSize: number): string {
  const cmds = ['-c', 'blockget -n'];
  for (const b of blocks) {
    const agno = Math.floor(b / agblocks), agbno = b % agblocks;
    cmds.push('-c', `fsblock ${agno * 2 ** Math.ceil(Math.log2(agblocks)) + agbno}`, '-c', 'blockuse -n');
  }
  const r = runStatus('xfs_db', ['-r', ...cmds, file]);
  return blocks.map((b) => `block ${b} (AG ${Math.floor(b / agblocks)}, agbno ${b % agblocks}, byte ${b * blockSize})`).join('\n') + '\nxfs_db says:\n' + (r.stdout + r.stderr).slice(0, 4000);
}

/** Linear blocks of the restored metadump image that hold any non-zero byte. */
function nonZeroBlocks(file: string, blockSize: number): number[] {
  const out: number[] = [];
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(blockSize * 1024);
    const size = fs.fstatSync(fd).size;
    for (let off = 0; off < size; off += buf.length) {
      const n = fs.readSync(fd, buf, 0, buf.length, off);
      for (let k = 0; k * blockSize < n; k++) {
        for (let q = k * blockSize; q < (k + 1) * blockSize; q += 8) {
          if (buf.readBigUInt64LE(q) !== 0n) { out.push(off / blockSize + k); break; }
        }
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}

function inodeFormat(file: string, ino: number): { format: string; nextents: number } {
  const o = run('xfs_db', ['-r', '-c', `inode ${ino}`, '-c', 'print core.format core.nextents', file]);
  return { format: /core\.format = \d+ \((\w+)\)/.exec(o)?.[1] ?? o, nextents: Number(/core\.nextents = (\d+)/.exec(o)?.[1]) };
}

async function check(t: ExecutionContext, dir: string, c: Case, made: Made): Promise<{ ours: number; ref: number }> {
  const dev = Device.open(made.file);
  let res, used;
  const t0 = Date.now();
  try {
    res = await readXfsMetadataCounted(dev);
    const ms = Date.now() - t0;
    used = await xfsReader.read(dev);
    t.log(`${c.name}: read in ${ms} ms: ${res.map.notes.join('; ')}`);
    // The public entry point finds XFS and gives the same map.
    t.is((await readMetadataMap(dev)).bitmap.setCount, res.map.bitmap.setCount);
  } finally {
    dev.close();
  }
  const map = res.map;
  t.is(map.filesystem, 'xfs');
  t.is(map.totalBlocks, Math.ceil(c.size / map.blockSize));
  t.regex(map.notes[0]!, /^xfs metadata: \d+ AGs?, [\d,]+ btree blocks, [\d,]+ inode chunks .* (log \d|external log)/);
  const bs = map.blockSize;
  const sb = run('xfs_db', ['-r', '-c', 'sb 0', '-c', 'print agblocks', made.file]);
  const agblocks = Number(/agblocks = (\d+)/.exec(sb)![1]);

  // Reference: every non-zero block of the metadump-restored image is metadata.
  const dump = path.join(dir, `${c.name}.dump`), restored = path.join(dir, `${c.name}.restored`);
  run('xfs_metadump', ['-a', '-o', made.file, dump]);
  run('xfs_mdrestore', [dump, restored]);
  fs.rmSync(dump);
  const ref = nonZeroBlocks(restored, bs);
  fs.rmSync(restored);
  const missed = ref.filter((b) => !map.bitmap.get(b));
  if (missed.length) t.log(describe(made.file, missed.slice(0, 5), agblocks, bs));
  t.is(missed.length, 0, `${c.name}: ${missed.length} of ${ref.length} metadump blocks are not in our map; first: ${missed.slice(0, 10).join(', ')}`);

  // Inside the used map: no free block is called metadata.
  const outside = map.bitmap.clone();
  outside.andNot(used.bitmap);
  const firstOutside = [...outside.runs()].slice(0, 5).map(([s, e]) => `${s}..${e - 1}`);
  if (outside.setCount) t.log(describe(made.file, [outside.next(0, true)], agblocks, bs));
  t.is(outside.setCount, 0, `${c.name}: ${outside.setCount} blocks of the map are free space: ${firstOutside.join(', ')}`);

  // File data is not metadata.
  let dataIn = 0;
  for (const [s, e] of made.dataExtents) dataIn += map.bitmap.count(s, e);
  t.is(dataIn, 0, `${c.name}: ${dataIn} data blocks of large files are in the map`);
  const log = res.counts.logBlocks;
  const meta = map.bitmap.setCount - log;
  const usedNoLog = used.usedBlocks - log - (used.totalBlocks - Math.ceil(c.size / bs));
  t.log(`${c.name}: ${ref.length} metadump blocks, ours ${map.bitmap.setCount} (${meta} without the log), used ${used.usedBlocks} (${usedNoLog} without the log)`);
  if (made.mounted) t.true(meta < usedNoLog / 2, `${c.name}: metadata ${meta} blocks is not small against ${usedNoLog} used`);

  if (c.fragment && made.mounted) t.true(res.counts.sparseChunks > 0, `${c.name}: no sparse inode chunk was made`);
  if (c.externalLog) t.regex(map.notes.join('\n'), /log on an external device/);
  if (c.realtime) t.true(res.counts.specialBlocks > 0, `${c.name}: the realtime bitmap and summary blocks are counted`);
  if (made.mounted) {
    // The formats the population was meant to produce.
    const f = (n: string) => inodeFormat(made.file, made.dirInodes[n]!).format;
    t.is(f('short'), 'local');
    t.is(f('block'), 'extents');
    t.is(f('btree'), 'btree', `${c.name}: the interleaved directory is ${f('btree')} (${inodeFormat(made.file, made.dirInodes.btree!).nextents} extents)`);
    t.is(inodeFormat(made.file, made.bigFileInodes[1]!).format, 'btree');
    t.true(res.counts.directoryBlocks > 0 && res.counts.attrBlocks > 0 && res.counts.symlinkBlocks > 0 && res.counts.bmbtBlocks > 0, JSON.stringify(res.counts));
  }
  return { ours: map.bitmap.setCount, ref: ref.length };
}

xfsTest('xfs metadata map holds every block xfs_metadump copies, inside the used map, without file data', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const rtFile = sparseFile(path.join(dir, 'rt.img'), 200 * MiB);
  const logFile = sparseFile(path.join(dir, 'log.img'), 64 * MiB);
  const cases: Case[] = [
    { name: 'v5-4k-4ag-quota', size: 600 * MiB, mkfs: ['-d', 'agcount=4'], mountOpts: ['uquota', 'pquota'], seed },
    { name: 'v5-1k-sparse-2ag', size: 320 * MiB, mkfs: ['-b', 'size=1024', '-i', 'sparse=1', '-d', 'agcount=2'], fragment: true, seed: seed + 1 },
    { name: 'v5-rmap-reflink-8ag', size: 800 * MiB, mkfs: ['-m', 'rmapbt=1,reflink=1', '-d', 'agcount=8', '-n', 'size=8192'], reflink: true, seed: seed + 2 },
    { name: 'v5-2k-3ag-nofinobt-1k-inodes', size: 400 * MiB, mkfs: ['-b', 'size=2048', '-d', 'agcount=3', '-m', 'finobt=0', '-i', 'size=1024'], seed: seed + 3 },
    // Realtime: this kernel may not mount it (CONFIG_XFS_RT); its bitmap/summary inodes are checked either way.
    { name: 'v5-realtime', size: 300 * MiB, mkfs: ['-r', `rtdev=${rtFile}`], realtime: true, seed: seed + 5 },
    { name: 'v5-external-log', size: 300 * MiB, mkfs: ['-l', `logdev=${logFile}`], noMount: true, externalLog: true, seed: seed + 6 },
    { name: 'v4', size: 400 * MiB, mkfs: ['-m', 'crc=0', '-i', 'sparse=0', '-m', 'finobt=0,rmapbt=0,reflink=0', '-d', 'agcount=2'], seed: seed + 4 },
  ];
  let checked = 0, blocks = 0;
  for (const c of cases) {
    const made = makeCase(t, dir, c);
    if (!made) continue;
    const r = await check(t, dir, c, made);
    checked++;
    blocks += r.ref;
    fs.rmSync(made.file, { force: true });
  }
  t.log(`${checked} file systems checked against xfs_metadump (${blocks} metadata blocks)`);
  t.true(checked >= 4);
});

// ---- fuzz ----

interface Target { name: string; offset: number; length: number; crcOffset?: number }

/** Metadata structures found among the captured sectors, by their magic numbers. */
function targets(mem: MemReader): Target[] {
  const sb = mem.bytes(0, 512);
  const bs = sb.readUInt32BE(4), agblocks = sb.readUInt32BE(84), agcount = sb.readUInt32BE(88), isize = sb.readUInt16BE(104);
  const v5 = (sb.readUInt16BE(100) & 0xf) === 5;
  const crc = (o: number) => (v5 ? o : undefined);
  const out: Target[] = [{ name: 'superblock', offset: 0, length: 512, crcOffset: crc(224) }];
  for (let a = 0; a < agcount; a++) {
    const base = a * agblocks * bs;
    out.push({ name: `AGF ${a}`, offset: base + 512, length: 512, crcOffset: crc(216) });
    out.push({ name: `AGI ${a}`, offset: base + 1024, length: 512, crcOffset: crc(312) });
    out.push({ name: `AGFL ${a}`, offset: base + 1536, length: 512, crcOffset: crc(32) });
  }
  const short = new Set([0x41423342, 0x41423343, 0x49414233, 0x46494233, 0x524d4233, 0x52334643, 0x41425442, 0x41425443, 0x49414254, 0x46494254]);
  for (const s of mem.sectors.keys()) {
    const off = s * 512;
    const m = mem.sectors.get(s)!.readUInt32BE(0);
    if (off % bs === 0 && short.has(m)) out.push({ name: `btree block ${off / bs}`, offset: off, length: bs, crcOffset: crc(52) });
    else if (off % bs === 0 && (m === 0x424d4133 || m === 0x424d4150)) out.push({ name: `bmbt block ${off / bs}`, offset: off, length: bs, crcOffset: crc(64) });
    else if (off % isize === 0 && m >>> 16 === 0x494e) out.push({ name: `inode at byte ${off}`, offset: off, length: isize, crcOffset: crc(100) });
  }
  return out;
}

async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const to = new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new Error(`readXfsMetadata did not finish in ${ms} ms (hang)`)), ms); });
  try { return await Promise.race([p, to]); } finally { clearTimeout(timer); }
}

xfsTest('xfs metadata reader survives random metadata corruption: a map or CorruptFileSystemError, never another error or a hang', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const c: Case = { name: 'fuzz', size: 300 * MiB, mkfs: ['-b', 'size=1024', '-d', 'agcount=2', '-m', 'rmapbt=1'], seed };
  const made = makeCase(t, dir, c)!;
  t.true(made.mounted);
  const mem = await capture(made.file, (r) => readXfsMetadata(r));
  fs.rmSync(made.file);
  const base = await readXfsMetadataCounted(mem);
  t.true(base.counts.bmbtBlocks > 0);
  const ts = targets(mem);
  const kinds = new Map<string, number>();
  for (const x of ts) { const k = x.name.split(' ')[0]!; kinds.set(k, (kinds.get(k) ?? 0) + 1); }
  t.log(`${ts.length} fuzz targets: ${[...kinds].map(([k, n]) => `${n} ${k}`).join(', ')}`);
  // Targeted: a few corruptions must be named.
  const named = async (tg: Target | undefined, edit: (b: Buffer) => void, re: RegExp) => {
    if (!tg) return;
    const b = mem.bytes(tg.offset, tg.length);
    edit(b);
    const e = await t.throwsAsync(readXfsMetadata(mem.withBytes(tg.offset, b)), { instanceOf: CorruptFileSystemError }, tg.name);
    if (e) { t.regex(e.message, re); t.log(`${tg.name}: ${e.message}`); }
  };
  const inode = ts.find((x) => x.name.startsWith('inode'));
  await named(inode, (b) => { b[60] ^= 1; }, /inode \d+ of AG \d+: CRC mismatch/);
  await named(inode, (b) => { b.writeUInt16BE(0, 0); b.writeUInt32LE(xfsChecksum(b, 100), 100); }, /magic 0x0 is not IN/);
  const bmbt = ts.find((x) => x.name.startsWith('bmbt'));
  await named(bmbt, (b) => { b.writeUInt32BE(b.readUInt32BE(60) + 1, 60); b.writeUInt32LE(xfsChecksum(b, 64), 64); }, /extent btree block \d+: owner \d+ is not this inode/);
  await named(ts.find((x) => x.name === 'AGI 1'), (b) => { b.writeUInt32BE(1 << 30, 20); b.writeUInt32LE(xfsChecksum(b, 312), 312); }, /AGI of AG 1: inode btree root \d+ is past the AG end/);
  await named(ts.find((x) => x.name === 'AGFL 0'), (b) => { b.writeUInt32BE(0xdead, 4); b.writeUInt32LE(xfsChecksum(b, 32), 32); }, /AGFL of AG 0: sequence number/);

  const r = rng(seed);
  let corrupt = 0, ok = 0;
  const iterations = 500;
  for (let i = 0; i < iterations; i++) {
    const tg = ts[Math.floor(r() * ts.length)]!;
    const b = mem.bytes(tg.offset, tg.length);
    const flips = 1 + Math.floor(r() * 4);
    for (let k = 0; k < flips; k++) {
      // Headers hold the interesting fields: most flips go to the first 200 bytes.
      const pos = r() < 0.7 ? Math.floor(r() * Math.min(200, tg.length)) : Math.floor(r() * tg.length);
      b[pos] = r() < 0.5 ? b[pos]! ^ (1 << Math.floor(r() * 8)) : Math.floor(r() * 256);
    }
    // Half with the CRC made right again, so the checks behind it are reached.
    if (tg.crcOffset !== undefined && r() < 0.5) b.writeUInt32LE(xfsChecksum(b, tg.crcOffset), tg.crcOffset);
    try {
      const m = await withTimeout(readXfsMetadata(mem.withBytes(tg.offset, b)), 10_000);
      t.is(m.bitmap.size, m.totalBlocks);
      ok++;
    } catch (e) {
      if (e instanceof CorruptFileSystemError) { corrupt++; continue; }
      t.fail(`iteration ${i} (${tg.name}, seed ${seed}): ${(e as Error).stack ?? String(e)}`);
      return;
    }
  }
  t.log(`${iterations} iterations: ${corrupt} CorruptFileSystemError, ${ok} maps`);
  t.true(corrupt > iterations / 10);
});
