// Streaming reader for restore and verify: one pass, no seeking (file, standard input, tape, or the
// volumes of a multi-volume set). Detects a zstd stream by its magic (28 B5 2F FD) and decompresses it
// through `zstd -d`. Offsets in errors are byte offsets in the tar stream (for a compressed archive:
// in the decompressed tar stream).
//
// Checksums: each chunk of stored data is hashed as it streams; the trailer with the expected hashes
// comes last, so data handed to onData is UNVERIFIED until readArchive() resolves. A restore must
// treat its output as incomplete until then (and mark/remove it if readArchive rejects).
//
// Records: the reader accepts reads of any size. The archive must end on a whole record of the
// manifest's recordSize (for a compressed archive: the compressed byte count); a shorter end is
// reported as "records of the wrong size or truncated". After the end-of-archive blocks and the record
// padding the reader stops reading (a tape may hold more after a file mark).
import type { Readable } from 'node:stream';
import { xxh128 } from '../device/hash';
import { ZSTD_MAGIC, zstdDecompress } from '../sink/stream/zstd';
import { ArchiveError } from './errors';
import {
  IMAGE_NAME, MANIFEST_NAME, MAX_MANIFEST_BYTES, TRAILER_NAME, hex, maxTrailerBytes, unsealJson, validateManifest, validateTrailer, type Manifest, type Trailer,
} from './manifest';
import { BLOCK, isZeroBlock, padTo512, parsePaxRecords, parseUstarHeader } from './pax-header';
import type { SparseMap } from './sparse-map';

export interface ArchiveHandler {
  onManifest?(manifest: Manifest): void | Promise<void>;
  /** The image layout, before any data: holes are everything outside `map.regions`. */
  onSparseMap?(map: SparseMap): void | Promise<void>;
  /** Image bytes at volume `offset` (ascending). `bytes` is only valid until the call (or its promise) returns. */
  onData?(offset: number, bytes: Buffer): void | Promise<void>;
}

export interface ArchiveSummary {
  manifest: Manifest;
  trailer: Trailer;
  map: SparseMap;
  /** Bytes of the tar stream (decompressed). */
  archiveBytes: number;
  /** Bytes read from the input (compressed, if compressed). */
  inputBytes: number;
  compressed: boolean;
  chunksVerified: number;
}

export type ArchiveInput = Readable | AsyncIterable<Uint8Array>;

/** Pull-based bytes with an archive offset; errors name where the stream ended. */
class ByteSource {
  private cur: Buffer = Buffer.alloc(0);
  private pos = 0;
  offset = 0;
  eof = false;

  constructor(private readonly it: AsyncIterator<Uint8Array>) {}

  private async fill(): Promise<boolean> {
    while (this.pos >= this.cur.length) {
      if (this.eof) return false;
      const r = await this.it.next();
      if (r.done) { this.eof = true; return false; }
      const v = r.value;
      this.cur = Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
      this.pos = 0;
    }
    return true;
  }

  /** Up to `max` bytes as a view (valid until the next call); null at end of input. */
  async piece(max: number): Promise<Buffer | null> {
    if (!(await this.fill())) return null;
    const n = Math.min(max, this.cur.length - this.pos);
    const v = this.cur.subarray(this.pos, this.pos + n);
    this.pos += n;
    this.offset += n;
    return v;
  }

  /** Exactly n bytes (a copy if they span reads); `what` names them if the input ends first. */
  async exact(n: number, what: string): Promise<Buffer> {
    const start = this.offset;
    if ((await this.fill()) && this.pos + n <= this.cur.length) {
      const v = this.cur.subarray(this.pos, this.pos + n);
      this.pos += n;
      this.offset += n;
      return v;
    }
    const out = Buffer.alloc(n);
    let got = 0;
    while (got < n) {
      const p = await this.piece(n - got);
      if (!p) throw new ArchiveError(`archive truncated at archive offset ${this.offset}: ${what} (at archive offset ${start}) needs ${n} bytes, the input ended after ${got}`, this.offset);
      p.copy(out, got);
      got += p.length;
    }
    return out;
  }
}

interface Member { name: string; size: number; typeflag: string; headerOffset: number; pax: Map<string, string> }

async function readMember(src: ByteSource, context: string): Promise<Member | null> {
  let pax = new Map<string, string>();
  let longName: string | undefined;
  for (;;) {
    const headerOffset = src.offset;
    const b = await src.exact(BLOCK, `the tar header ${context}`);
    if (isZeroBlock(b)) return null;
    const h = parseUstarHeader(b, headerOffset);
    if (h.typeflag === 'x' || h.typeflag === 'g' || h.typeflag === 'L') {
      if (h.size > 64 << 20) throw new ArchiveError(`extended header at archive offset ${headerOffset} is implausibly large (${h.size} bytes)`, headerOffset);
      const bodyOffset = src.offset;
      const body = await src.exact(h.size + padTo512(h.size), `the extended header body ${context}`);
      if (h.typeflag === 'x') pax = parsePaxRecords(body.subarray(0, h.size), bodyOffset);
      if (h.typeflag === 'L') longName = body.subarray(0, h.size).toString('utf8').replace(/\0+$/, '');
      continue;
    }
    const name = pax.get('path') ?? longName ?? h.name;
    const size = pax.has('size') ? Number(pax.get('size')) : h.size;
    if (!Number.isSafeInteger(size) || size < 0) throw new ArchiveError(`bad member size in the pax header before archive offset ${headerOffset}`, headerOffset);
    return { name, size, typeflag: h.typeflag, headerOffset, pax };
  }
}

const displayName = (m: Member) => m.pax.get('GNU.sparse.name') ?? m.name.replace(/^\.\//, '');

async function readJsonMember(src: ByteSource, m: Member, limit: number): Promise<{ body: Buffer; offset: number }> {
  if (m.size > limit) throw new ArchiveError(`${m.name} at archive offset ${m.headerOffset} is implausibly large (${m.size} bytes; a valid one is at most ${limit})`, m.headerOffset);
  const offset = src.offset;
  const all = await src.exact(m.size + padTo512(m.size), `member ${m.name}`);
  return { body: Buffer.from(all.subarray(0, m.size)), offset };
}

async function parseSparseMapText(src: ByteSource, realSize: number, memberSize: number, mapStart: number, manifestRegions: number): Promise<{ map: SparseMap; bytes: Buffer }> {
  const blocks: Buffer[] = [];
  let expected = -1;
  let regions = new Float64Array(0);
  let got = 0; // numbers after the count
  let partial = '';
  const bad = (why: string) => new ArchiveError(`the GNU sparse map of ${IMAGE_NAME} at archive offset ${mapStart} is corrupt: ${why}`, mapStart);
  const complete = () => expected >= 0 && got === expected * 2;
  while (!complete()) {
    if (blocks.length * BLOCK >= memberSize) throw bad('it runs past the end of the member');
    const b = Buffer.from(await src.exact(BLOCK, `the sparse map of ${IMAGE_NAME}`));
    blocks.push(b);
    const text = partial + b.toString('latin1');
    const lines = text.split('\n');
    partial = lines.pop()!;
    for (const line of lines) {
      if (!/^[0-9]{1,16}$/.test(line)) throw bad(`"${line.slice(0, 20)}" is not a decimal number`);
      const v = Number(line);
      if (expected < 0) {
        // The count is checked against the (sealed) manifest before anything is allocated for it.
        if (v !== manifestRegions && v !== manifestRegions + 1) throw bad(`it has ${v} entries, the manifest says ${manifestRegions} regions`);
        if (v > memberSize / 2) throw bad(`${v} entries cannot fit`);
        expected = v;
        regions = new Float64Array(expected * 2);
      } else {
        regions[got++] = v;
      }
      if (complete()) break;
    }
    if (!complete() && partial.length > 40) throw bad('a line is too long');
  }
  // The rest of the last block is padding: zeros.
  let count = 0, stored = 0, end = 0;
  for (let k = 0; k < expected; k++) {
    const off = regions[k * 2]!, size = regions[k * 2 + 1]!;
    if (off < end || off + size > realSize) throw bad(`entry ${k} (${off}, ${size}) is out of order or beyond the image size ${realSize}`);
    if (size === 0) {
      if (k !== expected - 1) throw bad(`entry ${k} is empty but not last`);
      continue;
    }
    // Regions are whole 512-byte sectors; only the one that ends the image may end inside one.
    if (off % BLOCK !== 0 || (size % BLOCK !== 0 && off + size !== realSize)) throw bad(`entry ${k} (${off}, ${size}) is not aligned to 512-byte sectors`);
    regions[count * 2] = off;
    regions[count * 2 + 1] = size;
    count++;
    stored += size;
    end = off + size;
  }
  return { map: { realSize, regions: regions.subarray(0, count * 2), count, storedBytes: stored }, bytes: Buffer.concat(blocks) };
}

/** Reads, checks and delivers a whole archive. Rejects with an ArchiveError saying what and where. */
export async function readArchive(input: ArchiveInput, handler: ArchiveHandler = {}): Promise<ArchiveSummary> {
  const raw = (input as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
  // Sniff the first bytes for zstd.
  const head: Uint8Array[] = [];
  let headLen = 0;
  while (headLen < 4) {
    const r = await raw.next();
    if (r.done) break;
    head.push(r.value);
    headLen += r.value.length;
  }
  if (headLen === 0) throw new ArchiveError('not a livesnap archive: the input is empty', 0);
  const first = Buffer.concat(head.map((h) => Buffer.from(h.buffer, h.byteOffset, h.byteLength)));
  const compressed = first.subarray(0, 4).equals(ZSTD_MAGIC);
  let inputBytes = 0;
  let it: AsyncIterator<Uint8Array>;
  let dec: ReturnType<typeof zstdDecompress> | undefined;
  if (compressed) {
    dec = zstdDecompress(raw, [first]);
    it = dec.output[Symbol.asyncIterator]();
  } else {
    it = (async function* () {
      inputBytes += first.length;
      yield first;
      for (;;) {
        const r = await raw.next();
        if (r.done) return;
        inputBytes += r.value.length;
        yield r.value;
      }
    })();
  }
  const src = new ByteSource(it);
  try {
    const summary = await readTar(src, handler, compressed);
    if (dec) {
      // The tar stream is complete: the rest of the decompressed stream is record padding (zeros),
      // and the compressed input must end here, on a whole record.
      for (let p = await src.piece(1 << 20); p; p = await src.piece(1 << 20)) {
        for (let i = 0; i < p.length; i++) if (p[i] !== 0) throw new ArchiveError(`non-zero bytes after the end of the archive at archive offset ${src.offset - p.length + i}`, src.offset - p.length + i);
      }
      inputBytes = await dec.finished;
      if (inputBytes % summary.manifest.recordSize !== 0) {
        throw new ArchiveError(`the compressed archive is ${inputBytes} bytes, not a whole number of ${summary.manifest.recordSize}-byte records (records of the wrong size, or truncated)`, summary.archiveBytes);
      }
    }
    return { ...summary, inputBytes: compressed ? inputBytes : src.offset };
  } catch (e) {
    if (dec) {
      // A decompression failure explains a truncated/corrupt tar stream better than the parser can.
      // If the decompressed stream ended, zstd has stopped on its own: wait for its verdict.
      if (!src.eof) dec.kill();
      const z = await dec.finished.then(() => undefined, (err: Error) => err);
      if (z) throw new ArchiveError(`${z.message} (the tar stream stopped at archive offset ${src.offset}: ${(e as Error).message})`, src.offset, e instanceof ArchiveError ? e.chunk : undefined);
    }
    throw e;
  } finally {
    dec?.kill();
    void raw.return?.();
  }
}

async function readTar(src: ByteSource, handler: ArchiveHandler, compressed: boolean): Promise<Omit<ArchiveSummary, 'inputBytes'>> {
  // 1. manifest.json
  const m1 = await readMember(src, 'of the first member');
  if (!m1) throw new ArchiveError('not a livesnap archive: it starts with an end-of-archive block (empty tar)', 0);
  if (m1.name !== MANIFEST_NAME) {
    throw new ArchiveError(`not a livesnap archive: first member is '${displayName(m1)}', expected ${MANIFEST_NAME}`, m1.headerOffset);
  }
  const mj = await readJsonMember(src, m1, MAX_MANIFEST_BYTES);
  const manifest = validateManifest(unsealJson(mj.body, MANIFEST_NAME, mj.offset), mj.offset);
  if (manifest.compression === 'zstd' && !compressed) {
    // Fine for reading (someone ran zstd -d first), but the record check then applies to the tar stream.
  }
  await handler.onManifest?.(manifest);

  // 2. disk.img: pax header with GNU sparse 1.0 keys, then the data.
  const m2 = await readMember(src, `after ${MANIFEST_NAME}`);
  if (!m2 || displayName(m2) !== IMAGE_NAME) {
    throw new ArchiveError(`member missing: expected ${IMAGE_NAME} after ${MANIFEST_NAME} at archive offset ${m2?.headerOffset ?? src.offset - BLOCK}, found ${m2 ? `'${displayName(m2)}'` : 'the end of the archive'}`, m2?.headerOffset ?? src.offset - BLOCK);
  }
  const px = m2.pax;
  if (px.get('GNU.sparse.major') !== '1' || px.get('GNU.sparse.minor') !== '0') {
    throw new ArchiveError(`${IMAGE_NAME} at archive offset ${m2.headerOffset} is not a GNU sparse 1.0 member`, m2.headerOffset);
  }
  const realSize = Number(px.get('GNU.sparse.realsize'));
  if (realSize !== manifest.volumeSize) {
    throw new ArchiveError(`${IMAGE_NAME} at archive offset ${m2.headerOffset}: GNU.sparse.realsize ${px.get('GNU.sparse.realsize')} does not match the manifest's volume size ${manifest.volumeSize}`, m2.headerOffset);
  }
  const mapStart = src.offset;
  const { map, bytes: mapBytes } = await parseSparseMapText(src, realSize, m2.size, mapStart, manifest.sparseRegions);
  if (hex(xxh128(mapBytes)) !== manifest.sparseMapXxh128) {
    throw new ArchiveError(`the GNU sparse map of ${IMAGE_NAME} at archive offset ${mapStart} is corrupt: its checksum does not match the manifest`, mapStart);
  }
  if (map.storedBytes !== manifest.storedBytes || m2.size !== mapBytes.length + map.storedBytes) {
    throw new ArchiveError(`${IMAGE_NAME} at archive offset ${m2.headerOffset}: member size ${m2.size} does not match its sparse map (${mapBytes.length} + ${map.storedBytes} bytes)`, m2.headerOffset);
  }
  await handler.onSparseMap?.(map);

  // 3. The data, hashed per chunk as it streams.
  const C = manifest.chunkSize;
  const dataStart = src.offset;
  const nChunks = Math.ceil(map.storedBytes / C);
  const hashes = Buffer.alloc(nChunks * 16);
  const chunkOffsets = new Float64Array(nChunks);
  const staging = Buffer.allocUnsafe(Math.min(C, Math.max(map.storedBytes, 1)));
  let stagingFill = 0;
  let stored = 0;
  let chunk = 0;
  const onData = handler.onData?.bind(handler);
  for (let k = 0; k < map.count; k++) {
    let off = map.regions[k * 2]!;
    let left = map.regions[k * 2 + 1]!;
    while (left > 0) {
      const inChunk = stored % C;
      const p = await src.piece(Math.min(left, C - inChunk));
      if (!p) {
        throw new ArchiveError(`archive truncated at archive offset ${src.offset}: ${IMAGE_NAME} data ends in chunk ${chunk} (${map.storedBytes - stored} of ${map.storedBytes} data bytes missing)`, src.offset, chunk);
      }
      if (inChunk === 0) chunkOffsets[chunk] = off;
      const chunkLen = Math.min(C, map.storedBytes - chunk * C);
      if (inChunk === 0 && p.length === chunkLen) {
        xxh128(p).copy(hashes, chunk * 16);
        chunk++;
      } else {
        p.copy(staging, stagingFill);
        stagingFill += p.length;
        if (stagingFill === chunkLen) {
          xxh128(staging.subarray(0, chunkLen)).copy(hashes, chunk * 16);
          chunk++;
          stagingFill = 0;
        }
      }
      if (onData) { const r = onData(off, p); if (r) await r; }
      stored += p.length; off += p.length; left -= p.length;
    }
  }
  await src.exact(padTo512(map.storedBytes), `the padding of ${IMAGE_NAME}`);

  // 4. trailer.json
  const m3 = await readMember(src, `after ${IMAGE_NAME}`);
  if (!m3 || m3.name !== TRAILER_NAME) {
    const at = m3?.headerOffset ?? src.offset - BLOCK;
    throw new ArchiveError(`member missing: expected ${TRAILER_NAME} after ${IMAGE_NAME} at archive offset ${at}, found ${m3 ? `'${displayName(m3)}'` : 'the end of the archive'} (the backup did not complete)`, at);
  }
  const tj = await readJsonMember(src, m3, maxTrailerBytes(nChunks));
  const trailer = validateTrailer(unsealJson(tj.body, TRAILER_NAME, tj.offset), manifest, tj.offset);
  for (let i = 0; i < nChunks; i++) {
    const row = trailer.chunks[i]!;
    const len = Math.min(C, map.storedBytes - i * C);
    const at = dataStart + i * C;
    if (row[1] !== chunkOffsets[i] || row[2] !== len) {
      throw new ArchiveError(`chunk ${i} at archive offset ${at}: the trailer places it at volume offset ${row[1]} (${row[2]} bytes) but the sparse map puts it at ${chunkOffsets[i]} (${len} bytes)`, at, i);
    }
    if (row[3] !== hashes.toString('hex', i * 16, i * 16 + 16)) {
      throw new ArchiveError(`chunk ${i} checksum mismatch at archive offset ${at} (${len} bytes at volume offset ${row[1]}): the image data is corrupt`, at, i);
    }
  }

  // 5. End of archive: a second zero block, then zero padding to a whole record.
  const eoaAt = src.offset;
  const eoa = await src.exact(BLOCK, 'the end-of-archive blocks');
  if (!isZeroBlock(eoa)) {
    const m4 = await readMember(new ByteSource((async function* () { yield eoa; })()), '').catch(() => null);
    throw new ArchiveError(`unexpected member ${m4 ? `'${displayName(m4)}'` : ''} after ${TRAILER_NAME} at archive offset ${eoaAt}: not a livesnap archive, or corrupt`.replace('  ', ' '), eoaAt);
  }
  const eoa2 = await src.exact(BLOCK, 'the end-of-archive blocks');
  if (!isZeroBlock(eoa2)) throw new ArchiveError(`the end-of-archive block at archive offset ${eoaAt + BLOCK} is not zeros`, eoaAt + BLOCK);
  const archiveBytes = src.offset;
  if (!compressed) {
    const R = manifest.recordSize;
    const end = Math.ceil(archiveBytes / R) * R;
    while (src.offset < end) {
      const p = await src.piece(end - src.offset);
      if (!p) {
        throw new ArchiveError(`archive ends at archive offset ${src.offset}, inside a record: it was written in ${R}-byte records, so it must end at ${end} (records of the wrong size, or truncated)`, src.offset);
      }
      for (let i = 0; i < p.length; i++) if (p[i] !== 0) throw new ArchiveError(`non-zero bytes in the record padding at archive offset ${src.offset - p.length + i}`, src.offset - p.length + i);
    }
  }
  return { manifest, trailer, map, archiveBytes, compressed, chunksVerified: nChunks };
}
