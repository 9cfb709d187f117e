// What restore and verify accept as a backup (issue "The live volume is sacred", items 10, 13, 14):
// damaged, empty and foreign files are errors, never "restore complete" of a guessed raw image;
// crafted manifests are refused by the format's limits before anything is allocated; a volume
// whose size is not a whole number of sectors goes through an archive exactly.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type Manifest, type Trailer } from '../src/archive';
import { encodeSparseMap } from '../src/archive/sparse-map';
import { sealJson } from '../src/archive/manifest';
import { BLOCK, padTo512, paxRecords, smallMember, ustarHeader } from '../src/archive/pax-header';
import { xxh128 } from '../src/device/hash';
import { livesnap } from './helpers/cli';
import { testIf } from './helpers/skip';
import { run, scratchDir } from './helpers/system';

const test = testIf({ root: true, commands: ['tar'] });
const owner = { uid: 0, gid: 0, uname: 'root', gname: 'root' };

/** A livesnap archive built by hand from its parts, so any field can be made wrong (and re-sealed). */
function craft(o: { manifest?: Partial<Manifest>; regions?: Array<[number, number]>; realSize?: number; mapText?: Buffer; trailerSize?: number; chunkSize?: number }): Buffer {
  const realSize = o.realSize ?? 1 << 20;
  const regions = o.regions ?? [[0, 4096]];
  const data = Buffer.concat(regions.map(([, n]) => crypto.randomBytes(n)));
  const f64 = new Float64Array(regions.flat());
  const map = { realSize, regions: f64, count: regions.length, storedBytes: data.length };
  const mapText = o.mapText ?? encodeSparseMap(map);
  const C = o.chunkSize ?? 1 << 20;
  const rows: Trailer['chunks'] = [];
  for (let i = 0; i * C < data.length; i++) rows.push([i, regions[0]![0], Math.min(C, data.length - i * C), Buffer.from(xxh128(data.subarray(i * C, (i + 1) * C))).toString('hex')]);
  const manifest: Manifest = {
    format: 'livesnap-archive', formatVersion: 1, toolVersion: 'test', source: 'crafted', filesystem: 'unknown',
    snapshotTime: new Date(0).toISOString(), volumeSize: realSize, blockSize: 512, totalBlocks: Math.ceil(realSize / 512),
    usedBlocks: Math.ceil(data.length / 512), storedBytes: data.length, sparseRegions: regions.length,
    sparseMapXxh128: Buffer.from(xxh128(mapText)).toString('hex'), checksum: 'xxh3-128', chunkSize: C, recordSize: 10240,
    compression: 'none', notes: [], ...o.manifest,
  };
  const trailer: Trailer = { format: 'livesnap-archive', formatVersion: 1, status: 'complete', storedBytes: data.length, chunkSize: C, chunkCount: rows.length, chunks: rows, badBlocks: [], finishedTime: new Date(0).toISOString() };
  const paxBody = paxRecords([['GNU.sparse.major', '1'], ['GNU.sparse.minor', '0'], ['GNU.sparse.name', 'disk.img'], ['GNU.sparse.realsize', String(realSize)]]);
  const memberSize = mapText.length + data.length;
  const trailerMember = o.trailerSize !== undefined
    ? ustarHeader({ name: 'trailer.json', size: o.trailerSize, mtime: 0, typeflag: '0', ...owner })
    : smallMember('trailer.json', sealJson(trailer), 0, owner);
  const parts = [
    smallMember('manifest.json', sealJson(manifest), 0, owner),
    ustarHeader({ name: './PaxHeaders/disk.img', size: paxBody.length, mtime: 0, typeflag: 'x', ...owner }), paxBody, Buffer.alloc(padTo512(paxBody.length)),
    ustarHeader({ name: './GNUSparseFile.0/disk.img', size: memberSize, mtime: 0, typeflag: '0', ...owner }), mapText, data, Buffer.alloc(padTo512(data.length)),
    trailerMember, Buffer.alloc(2 * BLOCK),
  ];
  const all = Buffer.concat(parts);
  return Buffer.concat([all, Buffer.alloc((10240 - (all.length % 10240)) % 10240)]);
}

function refused(t: import('ava').ExecutionContext, file: string, pattern: RegExp, cmd: 'restore' | 'verify' = 'restore'): void {
  const target = `${file}.restored`;
  const r = cmd === 'restore' ? livesnap(['restore', file, '--to', target]) : livesnap(['verify', file]);
  t.is(r.status, 1, `${path.basename(file)}: ${r.stdout}${r.stderr}`);
  t.notRegex(r.stdout + r.stderr, /complete|archive ok/, path.basename(file));
  t.notRegex(r.stderr, /at .*\.js:\d+|RangeError|TypeError|errno|out of range|Invalid typed array/, `${path.basename(file)}: no internal error leaks: ${r.stderr}`);
  t.regex(r.stderr, pattern, path.basename(file));
  t.false(fs.existsSync(target), 'nothing written');
  t.false(fs.existsSync(`${target}.partial`));
}

test('empty, cut, foreign and damaged backups are errors, not raw images of an unknown file system', (t) => {
  const dir = scratchDir(t, 'backup-input-');
  const good = path.join(dir, 'good.tar');
  fs.writeFileSync(good, craft({}));
  t.is(livesnap(['verify', good]).status, 0, 'the crafted archive is valid as built');

  const empty = path.join(dir, 'empty.tar');
  fs.writeFileSync(empty, '');
  refused(t, empty, /is empty: not a backup/);
  refused(t, empty, /is empty/, 'verify');

  const cut = path.join(dir, 'cut.tar');
  fs.writeFileSync(cut, fs.readFileSync(good).subarray(0, 200));
  refused(t, cut, /neither a livesnap archive nor an image|too small/);
  const cut300 = path.join(dir, 'cut300.tar');
  fs.writeFileSync(cut300, fs.readFileSync(good).subarray(0, 300));
  refused(t, cut300, /too small to be a livesnap archive/);

  const flipped = path.join(dir, 'flipped.tar');
  const f = Buffer.from(fs.readFileSync(good));
  f[258] ^= 0xff;
  fs.writeFileSync(flipped, f);
  refused(t, flipped, /header|checksum|not a livesnap archive/);
  refused(t, flipped, /header|checksum|not a livesnap archive/, 'verify');

  const v7 = path.join(dir, 'v7.tar');
  fs.writeFileSync(path.join(dir, 'hello.txt'), 'hello\n');
  run('tar', ['--format=v7', '-cf', v7, '-C', dir, 'hello.txt']);
  refused(t, v7, /not a livesnap archive/);

  const foreign = path.join(dir, 'random.bin');
  fs.writeFileSync(foreign, crypto.randomBytes(1 << 20));
  refused(t, foreign, /neither a livesnap archive nor an image[\s\S]*--raw/);
  // Named raw, the same bytes are an image of unknown contents: every block comes back.
  const out = path.join(dir, 'random.out');
  const r = livesnap(['restore', foreign, '--to', out, '--raw']);
  t.is(r.status, 0, r.stderr);
  t.true(fs.readFileSync(out).equals(fs.readFileSync(foreign)));
  const rawTar = livesnap(['restore', good, '--to', path.join(dir, 'x.img'), '--raw']);
  t.is(rawTar.status, 1);
  t.regex(rawTar.stderr, /it is an archive, not a raw image/);
});

test('crafted manifests are refused by the format limits before anything is allocated', (t) => {
  const dir = scratchDir(t, 'backup-input-');
  const cases: Array<[string, Parameters<typeof craft>[0], RegExp]> = [
    ['chunk1', { manifest: { chunkSize: 1 } }, /invalid: bad or missing "chunkSize \(a power of two/],
    ['chunk2p40', { manifest: { chunkSize: 2 ** 40 } }, /chunkSize/],
    ['record7', { manifest: { recordSize: 7 } }, /recordSize/],
    ['pib', { manifest: { volumeSize: 2 ** 50, totalBlocks: 2 ** 41 } }, /does not match the manifest's volume size/],
    ['regions', { manifest: { sparseRegions: 2 ** 30 } }, /sparseRegions/],
    ['count', { manifest: { sparseRegions: 3 } }, /it has 2 entries, the manifest says 3 regions/],
    ['unaligned', { regions: [[100, 4096]] }, /not aligned to 512-byte sectors/],
    ['huge-trailer', { trailerSize: 466 << 20 }, /trailer\.json at archive offset \d+ is implausibly large \(488636416 bytes; a valid one is at most \d+\)/],
  ];
  for (const [name, o, pattern] of cases) {
    const file = path.join(dir, `${name}.tar`);
    fs.writeFileSync(file, craft(o));
    refused(t, file, pattern);
  }
});

test('a volume whose size is not a whole number of sectors: offline tar backup, restore and GNU tar give the exact bytes', (t) => {
  const dir = scratchDir(t, 'backup-input-');
  const vol = path.join(dir, 'odd.img');
  fs.writeFileSync(vol, crypto.randomBytes(1_000_000));
  const tarFile = path.join(dir, 'odd.tar');
  const b = livesnap(['backup', vol, '--to', tarFile]);
  t.is(b.status, 0, b.stderr);
  const back = path.join(dir, 'back.img');
  const r = livesnap(['restore', tarFile, '--to', back]);
  t.is(r.status, 0, r.stderr);
  t.true(fs.readFileSync(back).equals(fs.readFileSync(vol)), 'restore gives the exact 1,000,000 bytes');
  t.is(livesnap(['verify', tarFile, '--against', vol]).status, 0);
  const x = path.join(dir, 'x');
  fs.mkdirSync(x);
  run('tar', ['-xf', tarFile, '-C', x]);
  t.true(fs.readFileSync(path.join(x, 'disk.img')).equals(fs.readFileSync(vol)), 'GNU tar extracts the exact bytes');
});
