// The tape/tar archive format (issue 4): what GNU tar and bsdtar restore from it, fixed records on the
// wire, zstd, multi-volume, and the reader's errors for each kind of bad input.
import test, { type ExecutionContext } from 'ava';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { ArchiveError, createArchiveSink, readArchive, type ArchiveSinkOptions } from '../src/archive';
import { readFileChunks, readVolumes } from '../src/sink/stream/multi-volume';
import { sparseMapFromBitset } from '../src/archive/sparse-map';
import type { BackupSink, VolumeInfo } from '../src/sink/sink';
import { Bitset } from '../src/util/bitset';
import { testIf } from './helpers/skip';
import { rng, run, runStatus, scratchDir, seedFromEnv } from './helpers/system';

const tarTest = testIf({ commands: ['tar', 'bsdtar'] });
const zstdTest = testIf({ commands: ['tar', 'zstd'] });
// Synthetic volumes for the archive tests: a seeded used-block bitmap and deterministic contents.

export interface SynthVolume {
  info: VolumeInfo;
  used: Bitset;
  /** The whole image: data in used blocks, zeros in free blocks. */
  image: Buffer;
}

/** `fraction` of the blocks used, in runs of 1..maxRun blocks; optionally the last block used. */
export function synthVolume(seed: number, opts: { size: number; blockSize: number; fraction: number; maxRun: number; lastUsed?: boolean; firstUsed?: boolean }): SynthVolume {
  const r = rng(seed);
  const blocks = Math.ceil(opts.size / opts.blockSize);
  const used = new Bitset(blocks);
  let b = opts.firstUsed ? 0 : Math.floor(r() * opts.maxRun * 2);
  const meanGap = Math.max(1, Math.round((opts.maxRun / 2) * (1 - opts.fraction) / opts.fraction));
  while (b < blocks) {
    const run = 1 + Math.floor(r() * opts.maxRun);
    used.setRange(b, Math.min(blocks, b + run));
    b += run + 1 + Math.floor(r() * meanGap * 2);
  }
  if (opts.lastUsed) used.set(blocks - 1);
  else used.clearRange(blocks - 4, blocks);
  const image = Buffer.alloc(opts.size);
  let x = (seed ^ 0x5bd1e995) >>> 0 || 1;
  for (const [s, e] of used.runs()) {
    const end = Math.min(e * opts.blockSize, opts.size);
    for (let o = s * opts.blockSize; o + 4 <= end; o += 4) {
      x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      image.writeUInt32LE(x, o);
    }
  }
  const info: VolumeInfo = {
    source: '/dev/synthetic', size: opts.size, blockSize: opts.blockSize, totalBlocks: blocks, usedBlocks: used.count(),
    filesystem: 'ext4', snapshotTime: new Date('2024-05-01T12:00:00Z'), notes: [], toolVersion: 'test',
  };
  return { info, used, image };
}

/** Feeds the volume to a sink like the copier does: batches of up to `batchBytes`, runs split at random points. */
export async function feed(sink: BackupSink, v: SynthVolume, seed: number, batchBytes = 1 << 20, badBlocks: number[] = []): Promise<void> {
  const r = rng(seed + 1);
  await sink.begin(v.info, v.used);
  const buffer = new ArrayBuffer(batchBytes);
  const view = Buffer.from(buffer);
  let segs: number[] = [];
  let fill = 0;
  const flush = async () => {
    if (segs.length) await sink.write({ buffer, segments: Float64Array.from(segs) });
    segs = [];
    fill = 0;
  };
  for (const [s, e] of v.used.runs()) {
    let off = s * v.info.blockSize;
    const end = Math.min(e * v.info.blockSize, v.info.size);
    while (off < end) {
      let n = Math.min(end - off, batchBytes - fill);
      if (r() < 0.3) n = Math.max(1, Math.min(n, Math.floor(r() * n)));
      v.image.copy(view, fill, off, off + n);
      segs.push(off, n, fill);
      fill += n;
      off += n;
      if (fill === batchBytes || r() < 0.05) await flush();
    }
  }
  await flush();
  await sink.finish({ badBlocks });
}

/** Blocks of 512 bytes allocated to a file (stat %b). */
export function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

async function buildArchive(file: string, v: SynthVolume, seed: number, opts: Partial<ArchiveSinkOptions> = {}, badBlocks: number[] = []): Promise<void> {
  await feed(createArchiveSink({ out: file, ...opts }), v, seed, 1 << 20, badBlocks);
}

/** Restores through the reader into a buffer; returns it and the summary. */
async function readBack(input: AsyncIterable<Uint8Array>) {
  let image: Buffer | undefined;
  const summary = await readArchive(input, {
    onManifest(m) { image = Buffer.alloc(m.volumeSize); },
    onData(off, bytes) { bytes.copy(image!, off); },
  });
  return { image: image!, summary };
}

async function readError(file: string | AsyncIterable<Uint8Array>): Promise<ArchiveError> {
  const input = typeof file === 'string' ? readFileChunks(file) : file;
  const e = await readArchive(input, {}).then(() => undefined, (err: unknown) => err);
  if (!(e instanceof ArchiveError)) throw new Error(`expected an ArchiveError, got ${String(e)}`);
  return e;
}

function extractWith(tool: 'tar' | 'bsdtar', archive: string, dir: string, extra: string[] = []): string {
  fs.mkdirSync(dir, { recursive: true });
  run(tool, [...extra, '-xf', archive, '-C', dir]);
  return path.join(dir, 'disk.img');
}

// Proves: GNU tar and bsdtar both give back the exact image (size, bytes) with holes as holes, for a
// mostly-empty volume that ends in a hole and one whose last block is used (with a partial last
// block); `tar -tvf` lists the three members; the reader round-trips the same bytes.
tarTest('GNU tar and bsdtar restore the exact sparse image; tar -tvf lists the members; the reader round-trips', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const cases = [
    { name: 'ends-in-hole', size: 48 << 20, blockSize: 4096, fraction: 0.05, maxRun: 64 },
    { name: 'last-block-used', size: (24 << 20) + 1536, blockSize: 4096, fraction: 0.4, maxRun: 16, lastUsed: true, firstUsed: true },
  ];
  for (const c of cases) {
    const v = synthVolume(seed, c);
    const archive = path.join(dir, `${c.name}.tar`);
    await buildArchive(archive, v, seed);
    t.is(fs.statSync(archive).size % 10240, 0);

    const list = run('tar', ['-tvf', archive]);
    t.regex(list, /manifest\.json[\s\S]*disk\.img[\s\S]*trailer\.json/, c.name);
    t.regex(run('bsdtar', ['-tvf', archive]), /manifest\.json[\s\S]*disk\.img[\s\S]*trailer\.json/);

    for (const tool of ['tar', 'bsdtar'] as const) {
      const img = extractWith(tool, archive, path.join(dir, `${c.name}-${tool}`));
      t.is(fs.statSync(img).size, c.size, `${tool} ${c.name} size`);
      t.true(fs.readFileSync(img).equals(v.image), `${tool} ${c.name} bytes`);
      const stored = sparseMapFromBitset(v.used, c.blockSize, c.size).storedBytes;
      // Holes stay holes: allocation is about the stored data, not the volume size.
      t.true(allocatedBytes(img) <= stored + (1 << 20), `${tool} ${c.name}: ${allocatedBytes(img)} bytes allocated for ${stored} stored`);
    }
    const manifest = JSON.parse(fs.readFileSync(path.join(dir, `${c.name}-tar`, 'manifest.json'), 'utf8'));
    t.is(manifest.volumeSize, c.size);
    t.is(manifest.usedBlocks, v.used.count());
    const { image, summary } = await readBack(readFileChunks(archive));
    t.true(image.equals(v.image), 'reader round trip');
    t.is(summary.trailer.status, 'complete');
    t.is(summary.chunksVerified, Math.ceil(summary.manifest.storedBytes / summary.manifest.chunkSize));
  }
});

// Proves: a heavily fragmented map (tens of thousands of regions) is generated quickly and both tars
// still restore it exactly.
tarTest('a fragmented volume with ~25k sparse regions restores exactly with both tars', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const v = synthVolume(seed, { size: 64 << 20, blockSize: 1024, fraction: 0.5, maxRun: 2 });
  const t0 = process.hrtime.bigint();
  const map = sparseMapFromBitset(v.used, 1024, v.info.size);
  t.log(`${map.count} regions in ${Number(process.hrtime.bigint() - t0) / 1e6} ms`);
  t.true(map.count > 15000);
  const archive = path.join(dir, 'frag.tar');
  await buildArchive(archive, v, seed, { chunkSize: 256 << 10 });
  for (const tool of ['tar', 'bsdtar'] as const) {
    const img = extractWith(tool, archive, path.join(dir, tool));
    t.true(fs.readFileSync(img).equals(v.image), tool);
  }
  t.true((await readBack(readFileChunks(archive))).image.equals(v.image));
});

// Proves: the sparse-map generator joins adjacent used blocks, clamps the last block to the volume
// size, and matches a naive per-block model.
test('sparse map from a bitset matches a naive model', (t) => {
  const r = rng(seedFromEnv(t));
  for (let round = 0; round < 30; round++) {
    const n = 1 + Math.floor(r() * 3000);
    const bs = 512;
    const size = n * bs - Math.floor(r() * bs);
    const b = new Bitset(n);
    for (let i = 0; i < n; i++) if (r() < 0.5) b.set(i);
    const m = sparseMapFromBitset(b, bs, size);
    const model: number[] = [];
    for (const [s, e] of b.runs()) model.push(s * bs, Math.min(e * bs, size) - s * bs);
    t.deepEqual([...m.regions], model);
  }
});

/** A Writable that records the size of every chunk handed to it (via _write or _writev). */
function recordingWritable(sizes: number[]): Writable {
  return new Writable({
    highWaterMark: 1 << 20,
    write(chunk: Buffer, _enc, cb) { sizes.push(chunk.length); setImmediate(cb); },
    writev(chunks, cb) { for (const c of chunks) sizes.push((c.chunk as Buffer).length); setImmediate(cb); },
  });
}

// Proves: every chunk the sink hands to its Writable is exactly recordSize bytes, for 512, 10240 and
// 1 MiB records, with and without compression (there, on the compressed stream).
test('every write to the target Writable is exactly one record', async (t) => {
  const seed = seedFromEnv(t);
  const v = synthVolume(seed, { size: 8 << 20, blockSize: 4096, fraction: 0.3, maxRun: 32 });
  for (const recordSize of [512, 10240, 1 << 20]) {
    for (const compress of [undefined, ...(runStatus('sh', ['-c', 'command -v zstd']).status === 0 ? ['zstd' as const] : [])]) {
      const sizes: number[] = [];
      await feed(createArchiveSink({ out: recordingWritable(sizes), recordSize, compress }), v, seed);
      t.true(sizes.length > 0);
      t.deepEqual([...new Set(sizes)], [recordSize], `record ${recordSize} ${compress ?? ''}`);
    }
  }
});

// Proves, at the system-call level: a separate process writing an archive to a file issues only
// write()/writev() calls whose every buffer is exactly recordSize (strace -v shows each iovec).
testIf({ commands: ['strace'] })('strace: every write(2)/writev(2) buffer to the archive fd is one record', async (t) => {
  const dir = scratchDir(t);
  const out = path.join(dir, 'strace.tar');
  const log = path.join(dir, 'strace.log');
  const mod = path.resolve(__dirname, '../src/archive/index.js');
  const bits = path.resolve(__dirname, '../src/util/bitset.js');
  const script = `
    const { createArchiveSink } = require(${JSON.stringify(mod)});
    const { Bitset } = require(${JSON.stringify(bits)});
    (async () => {
      const used = new Bitset(4096); used.setRange(10, 1000); used.setRange(2000, 2100);
      const info = { source: 'x', size: 4096 * 4096, blockSize: 4096, totalBlocks: 4096, usedBlocks: used.count(), filesystem: 'ext4', snapshotTime: new Date(), notes: [], toolVersion: 't' };
      const s = createArchiveSink({ out: ${JSON.stringify(out)}, recordSize: 10240 });
      await s.begin(info, used);
      const buf = new ArrayBuffer(990 * 4096);
      await s.write({ buffer: buf, segments: Float64Array.from([10 * 4096, 990 * 4096, 0]) });
      await s.write({ buffer: buf, segments: Float64Array.from([2000 * 4096, 100 * 4096, 0]) });
      await s.finish({ badBlocks: [] });
    })().catch((e) => { console.error(e); process.exit(1); });`;
  const r = runStatus('strace', ['-f', '-v', '-s', '0', '-e', 'trace=openat,write,writev,pwrite64,pwritev', '-o', log, process.execPath, '-e', script]);
  t.is(r.status, 0, r.stderr);
  const text = fs.readFileSync(log, 'utf8');
  const fd = new RegExp(`openat\\([^"]*"${out.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}(?:\\.partial)?"[^)]*\\) = (\\d+)`).exec(text)?.[1];
  t.truthy(fd, 'archive open seen');
  const calls = text.split('\n').filter((l) => new RegExp(`(write|writev|pwrite64|pwritev)\\(${fd},`).test(l));
  const lens: number[] = [];
  for (const l of calls) {
    if (/writev\(/.test(l)) for (const m of l.matchAll(/iov_len=(\d+)/g)) lens.push(Number(m[1]));
    else lens.push(Number(/, (\d+)\) = /.exec(l)?.[1]));
  }
  t.log(`${calls.length} syscalls, ${lens.length} buffers`);
  t.true(lens.length > 100);
  t.deepEqual([...new Set(lens)], [10240]);
  t.is(lens.length * 10240, fs.statSync(out).size);
});

// Proves: through a real pipe, `dd bs=R iflag=fullblock` sees the stream as whole records only
// ("N+0 records in": no partial record at the end), and the piped bytes are a valid archive.
tarTest('through a real pipe the stream is a whole number of records', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const v = synthVolume(seed, { size: 8 << 20, blockSize: 4096, fraction: 0.3, maxRun: 32 });
  const out = path.join(dir, 'dd.tar');
  const dd = spawn('dd', ['bs=1536', 'iflag=fullblock', `of=${out}`], { stdio: ['pipe', 'ignore', 'pipe'] });
  let err = '';
  dd.stderr.on('data', (d) => { err += d; });
  const exited = new Promise<number | null>((resolve) => dd.on('close', resolve));
  await feed(createArchiveSink({ out: dd.stdin, recordSize: 1536 }), v, seed);
  t.is(await exited, 0);
  t.regex(err, /^(\d+)\+0 records in\n\1\+0 records out/m);
  t.true((await readBack(readFileChunks(out))).image.equals(v.image));
});

// Proves: --compress zstd output is whole records, starts with the zstd magic, `tar --zstd -xf` restores
// the exact image, and the reader detects and decompresses it.
zstdTest('zstd: tar --zstd -xf restores the image; the reader decompresses it', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const v = synthVolume(seed, { size: 32 << 20, blockSize: 4096, fraction: 0.2, maxRun: 32 });
  const archive = path.join(dir, 'z.tar.zst');
  await buildArchive(archive, v, seed, { compress: 'zstd', recordSize: 10240 });
  const bytes = fs.readFileSync(archive);
  t.is(bytes.length % 10240, 0);
  t.deepEqual([...bytes.subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd]);
  const img = extractWith('tar', archive, path.join(dir, 'x'), ['--zstd']);
  t.true(fs.readFileSync(img).equals(v.image));
  t.is(spawnSync('zstd', ['-t', '-q', archive]).status, 0);
  const { image, summary } = await readBack(readFileChunks(archive));
  t.true(image.equals(v.image));
  t.true(summary.compressed);
  t.is(summary.inputBytes, bytes.length);
});

// Proves: with a tape size the stream is split into volumes of whole records (none larger than the
// tape size), the next-volume command runs between them with LIVESNAP_VOLUME=2,3; the reader reads
// them back from a list of paths and via the command; their concatenation is a valid tar; a failing
// command stops the backup.
tarTest('multi-volume: split into 3 volumes and read back', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const v = synthVolume(seed, { size: 8 << 20, blockSize: 4096, fraction: 0.3, maxRun: 32 });
  const stored = sparseMapFromBitset(v.used, 4096, v.info.size).storedBytes;
  const tapeSize = Math.ceil((stored + 40960) / 3 / 10240) * 10240 + 5000;
  const logFile = path.join(dir, 'volumes.log');
  const base = path.join(dir, 'vol.tar');
  const vols = (n: number) => `${base}.${n}`;
  await buildArchive(base, v, seed, { tapeSize, volumePath: vols, nextVolumeCommand: `echo "$LIVESNAP_VOLUME $LIVESNAP_ARCHIVE" >> ${logFile}` });
  const files = [1, 2, 3].map(vols);
  for (const f of files) {
    const size = fs.statSync(f).size;
    t.is(size % 10240, 0);
    t.true(size <= tapeSize);
  }
  t.false(fs.existsSync(vols(4)));
  t.is(fs.readFileSync(logFile, 'utf8'), `2 ${vols(2)}\n3 ${vols(3)}\n`);
  t.true((await readBack(readVolumes(files))).image.equals(v.image));
  // Same path re-read after running a command (as with a tape changer): it copies volume n into place.
  const slot = path.join(dir, 'slot.tar');
  fs.copyFileSync(vols(1), slot);
  t.true((await readBack(readVolumes({ path: slot, nextVolumeCommand: `cp ${base}.$LIVESNAP_VOLUME ${slot}` }))).image.equals(v.image));
  const cat = path.join(dir, 'all.tar');
  fs.writeFileSync(cat, Buffer.concat(files.map((f) => fs.readFileSync(f))));
  t.true(fs.readFileSync(extractWith('tar', cat, path.join(dir, 'cat'))).equals(v.image));
  // A failing next-volume command aborts.
  const e = await buildArchive(path.join(dir, 'fail.tar'), v, seed, { tapeSize, volumePath: (n) => path.join(dir, `fail.${n}`), nextVolumeCommand: 'exit 3' })
    .then(() => undefined, (err: Error) => err);
  t.regex(String(e), /next-volume command exited with status 3 before volume 2/);
});

// --- bad input -------------------------------------------------------------------------------------

async function sampleArchive(t: ExecutionContext, dir: string) {
  const seed = seedFromEnv(t);
  const v = synthVolume(seed, { size: 8 << 20, blockSize: 4096, fraction: 0.5, maxRun: 16 });
  const file = path.join(dir, 'good.tar');
  await buildArchive(file, v, seed, { chunkSize: 256 << 10 });
  const bytes = fs.readFileSync(file);
  const { summary } = await readBack(readFileChunks(file));
  // Locate the members from the archive itself.
  const dataStart = bytes.indexOf(Buffer.from(`${summary.map.count + 1}\n${summary.map.regions[0]}\n`)) ;
  const mapLen = Math.ceil(Buffer.byteLength(
    [summary.map.count + 1, ...summary.map.regions, v.info.size, 0].join('\n') + '\n') / 512) * 512;
  return { v, file, bytes, summary, mapStart: dataStart, dataStart: dataStart + mapLen };
}

function variant(dir: string, name: string, bytes: Buffer): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, bytes);
  return f;
}

// Proves: each kind of damage is reported with what is wrong and the archive offset (and chunk).
test('bad input: flipped bytes in data, headers, manifest, trailer are named with their offsets', async (t) => {
  const dir = scratchDir(t);
  const { bytes, summary, dataStart } = await sampleArchive(t, dir);
  const C = summary.manifest.chunkSize;

  // Data: a byte in chunk 3.
  const d = Buffer.from(bytes);
  const at = dataStart + 3 * C + 1234;
  d[at] ^= 0x40;
  let e = await readError(variant(dir, 'data.tar', d));
  t.regex(e.message, new RegExp(`^chunk 3 checksum mismatch at archive offset ${dataStart + 3 * C} \\(${C} bytes at volume offset \\d+\\): the image data is corrupt$`));
  t.is(e.chunk, 3);
  t.is(e.archiveOffset, dataStart + 3 * C);

  // The first header (manifest.json's ustar header).
  const h = Buffer.from(bytes); h[10] ^= 1;
  e = await readError(variant(dir, 'hdr.tar', h));
  t.regex(e.message, /^not a livesnap archive: its first 512 bytes are not a tar header \(another kind of file, or damaged at the start\)$/);

  // disk.img's ustar header (after manifest and its pax header): find it by name.
  const imgHdr = bytes.indexOf(Buffer.from('./GNUSparseFile.0/disk.img'));
  const h2 = Buffer.from(bytes); h2[imgHdr + 124 + 3] ^= 1;
  e = await readError(variant(dir, 'hdr2.tar', h2));
  t.regex(e.message, new RegExp(`^tar header checksum mismatch at archive offset ${imgHdr} `));

  // The manifest's JSON: a digit changed -> seal mismatch; a quote removed -> JSON error.
  const mStart = 512;
  const mj = Buffer.from(bytes);
  const pos = mj.indexOf(Buffer.from('"blockSize": 4096')) + 14;
  mj[pos] = 0x35;
  e = await readError(variant(dir, 'man.tar', mj));
  t.is(e.message, `manifest.json at archive offset ${mStart} is corrupt: its checksum does not match its contents`);
  const mj2 = Buffer.from(bytes); mj2[mStart] = 0x20; mj2[mStart + 1] = 0x5d;
  e = await readError(variant(dir, 'man2.tar', mj2));
  t.regex(e.message, /^manifest\.json at archive offset 512 is corrupt: not valid JSON/);

  // The trailer.
  const tStart = bytes.indexOf(Buffer.from('{\n "format": "livesnap-archive",\n "formatVersion": 1,\n "status"'));
  const tr = Buffer.from(bytes); tr[tStart + 60] ^= 1;
  e = await readError(variant(dir, 'trl.tar', tr));
  t.regex(e.message, new RegExp(`^trailer\\.json at archive offset ${tStart} is (corrupt|invalid)`));

  // The sparse map.
  const mp = Buffer.from(bytes);
  const mapAt = dataStart - 1;
  let k = mapAt; while (mp[k] === 0) k--; // last map digit
  mp[k - 1] = mp[k - 1] === 0x31 ? 0x32 : 0x31;
  e = await readError(variant(dir, 'map.tar', mp));
  t.regex(e.message, /GNU sparse map of disk\.img at archive offset \d+ is corrupt/);
});

test('bad input: truncated archive, missing member, wrong record size, archive of another tool', async (t) => {
  const dir = scratchDir(t);
  const { bytes, dataStart, summary } = await sampleArchive(t, dir);
  const C = summary.manifest.chunkSize;

  // Truncated in the data (chunk 2).
  const cut = dataStart + 2 * C + 100;
  let e = await readError(variant(dir, 'trunc.tar', bytes.subarray(0, cut)));
  t.regex(e.message, new RegExp(`^archive truncated at archive offset ${cut}: disk\\.img data ends in chunk 2 `));
  t.is(e.chunk, 2);
  // Truncated in the first header.
  e = await readError(variant(dir, 'trunc0.tar', bytes.subarray(0, 300)));
  t.is(e.message, 'archive truncated at archive offset 300: the tar header of the first member (at archive offset 0) needs 512 bytes, the input ended after 300');

  // Trailer member missing: cut right after disk.img and end the archive properly.
  const trailerHdr = bytes.indexOf(Buffer.from('trailer.json\0'));
  const noTrailer = Buffer.concat([bytes.subarray(0, trailerHdr), Buffer.alloc(10240 - (trailerHdr % 10240) + 10240)]);
  e = await readError(variant(dir, 'notrailer.tar', noTrailer));
  t.is(e.message, `member missing: expected trailer.json after disk.img at archive offset ${trailerHdr}, found the end of the archive (the backup did not complete)`);

  // disk.img missing: manifest then trailer.
  const paxHdr = bytes.indexOf(Buffer.from('./PaxHeaders/disk.img'));
  const noImage = Buffer.concat([bytes.subarray(0, paxHdr), bytes.subarray(trailerHdr)]);
  e = await readError(variant(dir, 'noimage.tar', noImage));
  t.is(e.message, `member missing: expected disk.img after manifest.json at archive offset ${paxHdr}, found 'trailer.json'`);

  // Records of the wrong size: the final record is short (re-blocked or cut in the padding).
  const short = bytes.subarray(0, bytes.length - 1000);
  e = await readError(variant(dir, 'short.tar', short));
  // Where the record padding is shorter than the cut, the cut reaches the end-of-archive blocks and
  // that is what is reported (the padding length depends on the seed's data size).
  t.regex(e.message, new RegExp(`^archive ends at archive offset ${short.length}, inside a record: it was written in 10240-byte records, so it must end at ${bytes.length} \\(records of the wrong size, or truncated\\)$|^archive truncated at archive offset ${short.length}: the end-of-archive blocks`));

  // An archive of another tool.
  const other = path.join(dir, 'other');
  fs.mkdirSync(other);
  fs.writeFileSync(path.join(other, 'foo.txt'), 'hello');
  run('tar', ['-cf', path.join(dir, 'other.tar'), '-C', other, 'foo.txt']);
  e = await readError(path.join(dir, 'other.tar'));
  t.is(e.message, "not a livesnap archive: first member is 'foo.txt', expected manifest.json");
  run('tar', ['--format=pax', '-cf', path.join(dir, 'other-pax.tar'), '-C', other, 'foo.txt']);
  e = await readError(path.join(dir, 'other-pax.tar'));
  t.is(e.message, "not a livesnap archive: first member is 'foo.txt', expected manifest.json");
  // Not a tar at all.
  e = await readError(variant(dir, 'random.bin', Buffer.from('x'.repeat(2000))));
  t.regex(e.message, /^not a livesnap archive: its first 512 bytes are not a tar header/);
  e = await readError(variant(dir, 'empty.bin', Buffer.alloc(0)));
  t.is(e.message, 'not a livesnap archive: the input is empty');
});

// Proves: a corrupt compressed stream is reported (zstd's own error), and a truncated one too.
zstdTest('bad input: corrupt and truncated zstd archives', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const v = synthVolume(seed, { size: 8 << 20, blockSize: 4096, fraction: 0.5, maxRun: 16 });
  const file = path.join(dir, 'a.tar.zst');
  await buildArchive(file, v, seed, { compress: 'zstd' });
  const bytes = fs.readFileSync(file);
  const flipped = Buffer.from(bytes); flipped[Math.floor(bytes.length / 2)] ^= 0x10;
  let e = await readError(variant(dir, 'flip.zst', flipped));
  // zstd may emit garbage before it notices (then a chunk checksum catches it first): either is a
  // correct refusal, but it must be one of the two, naming where.
  t.regex(e.message, /^zstd could not decompress the archive: .*\(the tar stream stopped at archive offset \d+: |^chunk \d+ checksum mismatch at archive offset \d+/);
  e = await readError(variant(dir, 'cut.zst', bytes.subarray(0, Math.floor(bytes.length / 2))));
  t.regex(e.message, /zstd could not decompress the archive|archive truncated/);
});

// Proves: the sink refuses data for free blocks (the sparse map would be wrong), and abort() removes
// the partial file so nothing partial looks complete.
test('sink contract: data outside the used blocks is refused; abort removes the partial file', async (t) => {
  const dir = scratchDir(t);
  const used = new Bitset(256); used.setRange(10, 20);
  const info: VolumeInfo = { source: 'x', size: 256 * 4096, blockSize: 4096, totalBlocks: 256, usedBlocks: 10, filesystem: 'unknown', snapshotTime: new Date(), notes: [], toolVersion: 't' };
  const file = path.join(dir, 'partial.tar');
  const sink: BackupSink = createArchiveSink({ out: file });
  await sink.begin(info, used);
  const buffer = new ArrayBuffer(1 << 16);
  await t.throwsAsync(sink.write({ buffer, segments: Float64Array.from([0, 4096, 0]) }), { message: /got data for volume bytes 0\.\.4096 but expected the used region 40960\.\.81920 next/ });
  await sink.abort(new Error('test'));
  t.false(fs.existsSync(file));
  const s2 = createArchiveSink({ out: path.join(dir, 'short.tar') });
  await s2.begin(info, used);
  await s2.write({ buffer, segments: Float64Array.from([40960, 4096, 0]) });
  await t.throwsAsync(s2.finish({ badBlocks: [] }), { message: /finished after 4096 of 40960 bytes/ });
  await s2.abort(new Error('x'));
});

// Proves: bad blocks reported at finish() land in the trailer.
test('bad blocks are recorded in the trailer', async (t) => {
  const seed = seedFromEnv(t);
  const dir = scratchDir(t);
  const v = synthVolume(seed, { size: 4 << 20, blockSize: 4096, fraction: 0.5, maxRun: 16 });
  const file = path.join(dir, 'bad.tar');
  await buildArchive(file, v, seed, {}, [7, 3]);
  const { summary } = await readBack(readFileChunks(file));
  t.deepEqual(summary.trailer.badBlocks, [3, 7]);
});
