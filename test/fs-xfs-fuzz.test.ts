// Parser fuzz: the metadata of small real XFS images (superblock, AGFs, bnobt blocks, log) held in
// memory; random byte flips, half of them with the v5 checksum recomputed so the deeper checks are
// reached. read() must return a consistent map or throw CorruptFileSystemError: never another
// exception, never a hang.
import test from 'ava';
import type { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device, type BlockReader } from '../src/device/device';
import { CorruptFileSystemError, type UsedBlockMap } from '../src/fs/used-map';
import { xfsReader, xfsChecksum } from '../src/fs/xfs';
import { loopDevice, rng, run, runStatus, scratchDir, seedFromEnv, sparseFile } from './helpers/system';
import { testIf } from './helpers/skip';

const MiB = 1 << 20;
const SECTOR = 512;

/** Sparse in-memory image: recorded sectors, zeros elsewhere. Copy-on-write for mutations. */
class MemReader implements BlockReader {
  constructor(readonly size: number, readonly sectors: Map<number, Buffer>) {}
  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.readMany([{ offset, length }]))[0]!;
  }
  async readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    await Promise.resolve();
    return ranges.map((r) => {
      if (r.offset < 0 || r.length < 0 || r.offset + r.length > this.size) throw new RangeError(`read of ${r.length} at ${r.offset} outside the image`);
      const out = Buffer.alloc(r.length);
      const first = Math.floor(r.offset / SECTOR), last = Math.ceil((r.offset + r.length) / SECTOR);
      for (let s = first; s < last; s++) {
        const b = this.sectors.get(s);
        if (!b) continue;
        const from = Math.max(s * SECTOR, r.offset), to = Math.min((s + 1) * SECTOR, r.offset + r.length);
        b.copy(out, from - r.offset, from - s * SECTOR, to - s * SECTOR);
      }
      return out;
    });
  }
  bytes(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    for (let s = offset / SECTOR; s < (offset + length) / SECTOR; s++) this.sectors.get(s)?.copy(out, (s - offset / SECTOR) * SECTOR);
    return out;
  }
  withBytes(offset: number, data: Buffer): MemReader {
    const m = new Map(this.sectors);
    for (let k = 0; k < data.length / SECTOR; k++) m.set(offset / SECTOR + k, Buffer.from(data.subarray(k * SECTOR, (k + 1) * SECTOR)));
    return new MemReader(this.size, m);
  }
}

/** Reads everything the XFS reader reads from a real image into a MemReader. */
async function capture(file: string): Promise<MemReader> {
  const dev = Device.open(file);
  try {
    const sectors = new Map<number, Buffer>();
    const rec: BlockReader = {
      size: dev.size,
      read: (o, l) => rec.readMany([{ offset: o, length: l }]).then((b) => b[0]!),
      readMany: async (ranges) => {
        const bufs = await dev.readMany(ranges);
        ranges.forEach((r, i) => {
          const s0 = Math.floor(r.offset / SECTOR) * SECTOR;
          const e0 = Math.ceil((r.offset + r.length) / SECTOR) * SECTOR;
          for (let s = s0; s < e0; s += SECTOR) if (!sectors.has(s / SECTOR)) sectors.set(s / SECTOR, Buffer.alloc(SECTOR));
        });
        return bufs;
      },
    };
    await xfsReader.read(rec);
    // Fill the recorded sectors with the real bytes.
    const keys = [...sectors.keys()];
    const bufs = await dev.readMany(keys.map((s) => ({ offset: s * SECTOR, length: SECTOR })));
    keys.forEach((s, i) => sectors.set(s, Buffer.from(bufs[i]!)));
    return new MemReader(dev.size, sectors);
  } finally {
    dev.close();
  }
}

interface Target { name: string; offset: number; length: number; crcOffset?: number }

function targets(mem: MemReader): Target[] {
  const sb = mem.bytes(0, SECTOR);
  const bs = sb.readUInt32BE(4), agblocks = sb.readUInt32BE(84), agcount = sb.readUInt32BE(88);
  const v5 = (sb.readUInt16BE(100) & 0xf) === 5;
  const out: Target[] = [{ name: 'superblock', offset: 0, length: SECTOR, crcOffset: v5 ? 224 : undefined }];
  for (let a = 0; a < agcount; a++) out.push({ name: `AGF ${a}`, offset: a * agblocks * bs + SECTOR, length: SECTOR, crcOffset: v5 ? 216 : undefined });
  // bnobt blocks: every recorded block-aligned block starting with ABTB / AB3B.
  for (const s of mem.sectors.keys()) {
    const off = s * SECTOR;
    if (off % bs !== 0) continue;
    const m = mem.sectors.get(s)!.readUInt32BE(0);
    if (m === 0x41425442 || m === 0x41423342) out.push({ name: `bnobt block at ${off / bs}`, offset: off, length: bs, crcOffset: v5 ? 52 : undefined });
  }
  return out;
}

function checkConsistent(t: ExecutionContext, m: UsedBlockMap, size: number): void {
  t.is(m.filesystem, 'xfs');
  t.is(m.totalBlocks, Math.ceil(size / m.blockSize));
  t.is(m.bitmap.size, m.totalBlocks);
  t.is(m.usedBlocks, m.bitmap.count());
  t.true(m.bitmap.get(0), 'block 0 (superblock) is used');
  if (m.allBlocks) t.is(m.usedBlocks, m.totalBlocks);
}

async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const to = new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new Error(`read() did not finish in ${ms} ms (hang)`)), ms); });
  try { return await Promise.race([p, to]); } finally { clearTimeout(timer); }
}

async function fuzz(t: ExecutionContext, mem: MemReader, seed: number, iterations: number): Promise<void> {
  const r = rng(seed);
  const ts = targets(mem);
  t.log(`${ts.length} fuzz targets (${ts.filter((x) => x.name.startsWith('bnobt')).length} bnobt blocks)`);
  const base = await xfsReader.read(mem);
  checkConsistent(t, base, mem.size);
  t.false(base.allBlocks);
  let corrupt = 0, ok = 0;
  for (let i = 0; i < iterations; i++) {
    const tg = ts[Math.floor(r() * ts.length)]!;
    const b = mem.bytes(tg.offset, tg.length);
    const flips = 1 + Math.floor(r() * 4);
    // Header bytes are where the interesting fields are: bias flips towards the first 128 bytes.
    for (let k = 0; k < flips; k++) {
      const pos = r() < 0.7 ? Math.floor(r() * Math.min(128, tg.length)) : Math.floor(r() * tg.length);
      b[pos] = r() < 0.5 ? b[pos]! ^ (1 << Math.floor(r() * 8)) : Math.floor(r() * 256);
    }
    if (tg.crcOffset !== undefined && r() < 0.5) b.writeUInt32LE(xfsChecksum(b, tg.crcOffset), tg.crcOffset);
    const m = mem.withBytes(tg.offset, b);
    try {
      const res = await withTimeout(xfsReader.read(m), 5000);
      checkConsistent(t, res, m.size);
      ok++;
    } catch (e) {
      if (e instanceof CorruptFileSystemError) { corrupt++; continue; }
      t.fail(`iteration ${i} (${tg.name}, seed ${seed}): ${(e as Error).stack ?? e}`);
      return;
    }
  }
  t.log(`${iterations} iterations: ${corrupt} CorruptFileSystemError, ${ok} maps`);
}

testIf({ root: true, commands: ['mkfs.xfs', 'mount', 'umount', 'losetup'] })('xfs reader survives random metadata corruption (v5 with a 2-level bnobt, and v4)', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  // v5, 1 KiB blocks, fragmented free space.
  const f5 = sparseFile(path.join(dir, 'v5.img'), 300 * MiB);
  run('mkfs.xfs', ['-q', '-f', '-b', 'size=1024', '-d', 'agcount=2', f5]);
  const dev = loopDevice(t, f5);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  run('mount', [dev, mnt]);
  try {
    const r = rng(seed);
    const names: string[] = [];
    for (let i = 0; i < 5000; i++) {
      const n = path.join(mnt, `f${i}`);
      fs.writeFileSync(n, Buffer.alloc(1 + Math.floor(r() * 4096), i & 0xff));
      names.push(n);
    }
    run('sync', []);
    names.forEach((n, i) => { if (i % 2) fs.unlinkSync(n); });
  } finally {
    run('umount', [mnt]);
  }
  const mem5 = await capture(f5);
  fs.rmSync(f5);
  await fuzz(t, mem5, seed, 300);
  // v4 (no CRCs: every flip reaches the parser); freshly made, as this kernel may not mount v4.
  const f4 = sparseFile(path.join(dir, 'v4.img'), 300 * MiB);
  const mk = runStatus('mkfs.xfs', ['-q', '-f', '-m', 'crc=0', '-i', 'sparse=0', '-m', 'finobt=0,rmapbt=0,reflink=0', '-n', 'ftype=0', f4]);
  if (mk.status !== 0) {
    t.log(`v4 part skipped: mkfs.xfs -m crc=0 refused (${mk.stderr.trim().split('\n').pop()})`);
    return;
  }
  const mem4 = await capture(f4);
  fs.rmSync(f4);
  await fuzz(t, mem4, seed ^ 0x5a5a5a5a, 150);
});
