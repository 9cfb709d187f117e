// ArchiveSink: a BackupSink that writes the livesnap tar archive (POSIX pax):
//   manifest.json | pax 'x' header + ustar header "./GNUSparseFile.0/disk.img" (GNU sparse 1.0) |
//   sparse map + data of the used blocks | trailer.json (chunk checksums, bad blocks, status) |
//   two zero blocks | zero padding to a whole record.
// Every byte goes through one RecordWriter (large buffers, whole records out); chunks are hashed in
// place in that buffer once complete, so the data is copied exactly once.
import { xxh128 } from '../device/hash';
import type { BackupSink, DataBatch, FinishInfo, VolumeInfo } from '../sink/sink';
import type { Bitset } from '../util/bitset';
import { UserError } from '../util/errors';
import {
  ARCHIVE_FORMAT, FORMAT_VERSION, MAX_ZERO_RANGES, type ManifestBackup, IMAGE_NAME, IMAGE_PAX_NAME, IMAGE_USTAR_NAME, MANIFEST_NAME, TRAILER_NAME,
  MAX_BAD_BLOCKS, archiveLimitProblem, defaultChunkSize, hex, sealJson, type ChunkRow, type Manifest, type Trailer,
} from './manifest';
import { BLOCK, USTAR_MAX_SIZE, padTo512, paxRecords, smallMember, ustarHeader, type Owner } from './pax-header';
import { RecordWriter } from '../sink/stream/record-writer';
import { StreamTarget, type StreamOptions } from '../sink/stream/target';
import { encodeSparseMap, sparseMapFromBitset, type SparseMap } from './sparse-map';

export interface ArchiveFormatOptions {
  /** Chunk size for checksums (default: 1 MiB, larger for huge volumes). */
  chunkSize?: number;
  /** Aggregation buffer size (default 8 MiB, at least 4 chunks). */
  bufferSize?: number;
}

/** The format's options and its destination's (see sink/stream/target.ts). */
export type ArchiveSinkOptions = ArchiveFormatOptions & StreamOptions;

/** An archive sink on a new stream target. */
export function createArchiveSink(opts: ArchiveSinkOptions): ArchiveSink {
  return new ArchiveSink(new StreamTarget(opts), opts);
}

export class ArchiveSink implements BackupSink {
  readonly description: string;
  readonly recordSize: number;
  private writer!: RecordWriter;
  private map!: SparseMap;
  private chunkSize = 0;
  // data cursor
  private region = 0;
  private nextOffset = 0;
  private regionEnd = 0;
  private stored = 0;
  private dataStart = 0;
  // chunks
  private chunkIndex = 0;
  private chunkStart = 0; // archive offset
  private chunkHashes!: Buffer;
  private chunkOffsets!: Float64Array;
  private srcBuffer: ArrayBuffer | undefined;
  private src: Buffer | undefined;
  private mtime = 0;
  private owner: Owner = { uid: 0, gid: 0, uname: 'root', gname: 'root' };
  private state: 'new' | 'open' | 'done' | 'aborted' = 'new';

  constructor(private readonly target: StreamTarget, private readonly opts: ArchiveFormatOptions = {}) {
    this.recordSize = target.recordSize;
    this.description = `${target.compression === 'zstd' ? 'zstd-compressed ' : ''}tar archive ${target.where}`;
  }

  /** Bytes of the (uncompressed) tar stream so far. */
  get archiveBytes(): number { return this.writer ? this.writer.position : 0; }
  /** Number of the volume being written (multi-volume), else 1. */
  get volume(): number { return this.target.volume; }

  /** Chunks checksummed so far (all of them once finished). */
  get chunkCount(): number { return this.chunkIndex; }

  /** XXH3-128 of the chunk checksums in order: one value that names the archive's whole contents. */
  chunkListDigest(): string {
    return this.chunkHashes ? xxh128(this.chunkHashes.subarray(0, this.chunkIndex * 16)).toString('hex') : '';
  }

  async begin(volume: VolumeInfo, used: Bitset): Promise<void> {
    if (this.state !== 'new') throw new Error('archive sink: begin() called twice');
    this.state = 'open';
    this.map = sparseMapFromBitset(used, volume.blockSize, volume.size);
    const mapBytes = encodeSparseMap(this.map);
    this.chunkSize = this.opts.chunkSize ?? defaultChunkSize(this.map.storedBytes);
    const limit = archiveLimitProblem(this.map.storedBytes, this.chunkSize, this.map.count);
    if (limit) throw new UserError(`cannot write this volume as a livesnap archive: ${limit}`, 'write a raw image instead (--format raw)');
    const chunks = Math.ceil(this.map.storedBytes / this.chunkSize);
    this.chunkHashes = Buffer.alloc(chunks * 16);
    this.chunkOffsets = new Float64Array(chunks);
    this.mtime = Math.floor(volume.snapshotTime.getTime() / 1000);
    const uid = process.getuid?.() ?? 0, gid = process.getgid?.() ?? 0;
    this.owner = { uid, gid, uname: uid === 0 ? 'root' : '', gname: gid === 0 ? 'root' : '' };

    const manifest: Manifest = {
      format: ARCHIVE_FORMAT,
      formatVersion: FORMAT_VERSION,
      toolVersion: volume.toolVersion,
      source: volume.source,
      filesystem: volume.filesystem,
      snapshotTime: volume.snapshotTime.toISOString(),
      volumeSize: volume.size,
      blockSize: volume.blockSize,
      totalBlocks: volume.totalBlocks,
      usedBlocks: volume.usedBlocks,
      storedBytes: this.map.storedBytes,
      sparseRegions: this.map.count,
      sparseMapXxh128: hex(xxh128(mapBytes)),
      checksum: 'xxh3-128',
      chunkSize: this.chunkSize,
      recordSize: this.recordSize,
      compression: this.target.compression,
      notes: volume.notes,
      ...(volume.layout ? { layout: volume.layout } : {}),
      ...(volume.backup ? { backup: manifestBackup(volume) } : {}),
    };

    // The expected size lets an S3 upload size its parts: data, map, and headers with room to spare.
    const output = await this.target.open(this.map.storedBytes + mapBytes.length + (1 << 20));
    const bufferSize = Math.max(this.opts.bufferSize ?? 8 << 20, 4 * this.chunkSize + 2 * this.recordSize);
    this.writer = new RecordWriter(output, this.recordSize, bufferSize, 3);
    await this.writer.write(smallMember(MANIFEST_NAME, sealJson(manifest), this.mtime, this.owner));

    const memberSize = mapBytes.length + this.map.storedBytes;
    const pax: Array<[string, string]> = [
      ['GNU.sparse.major', '1'],
      ['GNU.sparse.minor', '0'],
      ['GNU.sparse.name', IMAGE_NAME],
      ['GNU.sparse.realsize', String(volume.size)],
    ];
    if (memberSize > USTAR_MAX_SIZE) pax.push(['size', String(memberSize)]);
    const paxBody = paxRecords(pax);
    await this.writer.write(ustarHeader({ name: IMAGE_PAX_NAME, size: paxBody.length, mtime: this.mtime, typeflag: 'x', ...this.owner }));
    await this.writer.write(paxBody);
    await this.writer.writeZeros(padTo512(paxBody.length));
    await this.writer.write(ustarHeader({ name: IMAGE_USTAR_NAME, size: memberSize, mtime: this.mtime, typeflag: '0', ...this.owner }));
    await this.writer.write(mapBytes);

    this.dataStart = this.writer.position;
    this.chunkStart = this.dataStart;
    this.writer.holdFrom = this.dataStart;
    this.region = 0;
    this.stored = 0;
    this.setRegion();
  }

  private setRegion(): void {
    if (this.region < this.map.count) {
      this.nextOffset = this.map.regions[this.region * 2]!;
      this.regionEnd = this.nextOffset + this.map.regions[this.region * 2 + 1]!;
    } else {
      this.nextOffset = this.regionEnd = this.map.realSize;
    }
  }

  async write(batch: DataBatch): Promise<void> {
    if (this.state !== 'open') throw new Error(`archive sink: write() while ${this.state}`);
    if (batch.buffer !== this.srcBuffer) { this.srcBuffer = batch.buffer; this.src = Buffer.from(batch.buffer); }
    const src = this.src!;
    const seg = batch.segments;
    const w = this.writer;
    const C = this.chunkSize;
    for (let s = 0; s + 2 < seg.length; s += 3) {
      let off = seg[s]!, len = seg[s + 1]!, bo = seg[s + 2]!;
      if (len === 0) continue;
      if (off !== this.nextOffset || off + len > this.regionEnd) {
        throw new Error(`archive sink: got data for volume bytes ${off}..${off + len} but expected the used region ${this.nextOffset}..${this.regionEnd} next (data must come for exactly the used blocks, in order)`);
      }
      while (len > 0) {
        let avail = w.available;
        if (avail === 0) { await w.flushFull(); avail = w.available; }
        const inChunk = this.stored % C;
        if (inChunk === 0) this.chunkOffsets[this.chunkIndex] = off;
        const n = Math.min(len, avail, C - inChunk);
        src.copy(w.buffer, w.fillOffset, bo, bo + n);
        w.commit(n);
        this.stored += n; off += n; bo += n; len -= n;
        if (inChunk + n === C) this.sealChunk(C);
      }
      this.nextOffset = off;
      if (off === this.regionEnd) { this.region++; this.setRegion(); }
    }
  }

  private sealChunk(length: number): void {
    const h = xxh128(this.writer.view(this.chunkStart, length));
    h.copy(this.chunkHashes, this.chunkIndex * 16);
    this.chunkIndex++;
    this.chunkStart += length;
    this.writer.holdFrom = this.chunkStart;
  }

  async finish(info: FinishInfo): Promise<void> {
    if (this.state !== 'open') throw new Error(`archive sink: finish() while ${this.state}`);
    if (this.stored !== this.map.storedBytes) {
      throw new Error(`archive sink: finished after ${this.stored} of ${this.map.storedBytes} bytes of used-block data (next expected volume offset ${this.nextOffset})`);
    }
    if (info.badBlocks.length > MAX_BAD_BLOCKS) {
      throw new UserError(`${info.badBlocks.length} blocks could not be read, more than an archive records (${MAX_BAD_BLOCKS}): the device is failing`, 'copy what can be read with a raw image (--format raw), or replace the disk');
    }
    const C = this.chunkSize;
    if (this.stored % C !== 0) this.sealChunk(this.stored % C);
    const w = this.writer;
    w.holdFrom = Infinity;
    await w.writeZeros(padTo512(this.stored + 0));
    const rows: ChunkRow[] = [];
    for (let i = 0; i < this.chunkIndex; i++) {
      const len = Math.min(C, this.stored - i * C);
      rows.push([i, this.chunkOffsets[i]!, len, this.chunkHashes.toString('hex', i * 16, i * 16 + 16)]);
    }
    const trailer: Trailer = {
      format: ARCHIVE_FORMAT,
      formatVersion: FORMAT_VERSION,
      status: 'complete',
      storedBytes: this.stored,
      chunkSize: C,
      chunkCount: rows.length,
      chunks: rows,
      badBlocks: [...info.badBlocks].sort((a, b) => a - b),
      finishedTime: new Date().toISOString(),
    };
    await w.write(smallMember(TRAILER_NAME, sealJson(trailer), this.mtime, this.owner));
    await w.writeZeros(2 * BLOCK);
    await w.finish();
    await this.target.commit();
    this.state = 'done';
  }

  async abort(_reason: Error): Promise<void> {
    if (this.state === 'done' || this.state === 'aborted') return;
    this.state = 'aborted';
    await this.target.discard();
  }
}

/** The chain facts of the manifest; zeroed blocks as byte ranges (clamped to the volume). */
function manifestBackup(volume: VolumeInfo): ManifestBackup {
  const b = volume.backup!;
  const zeroRanges: Array<[number, number]> = [];
  if (b.zeroed) {
    for (const [s, e] of b.zeroed.runs()) {
      const off = s * volume.blockSize, end = Math.min(volume.size, e * volume.blockSize);
      if (end > off) zeroRanges.push([off, end - off]);
    }
  }
  if (zeroRanges.length > MAX_ZERO_RANGES) {
    throw new UserError(`this incremental backup would zero ${zeroRanges.length} separate ranges (blocks changed since the parent that are free or excluded now), more than an archive records (${MAX_ZERO_RANGES})`, 'run a full backup (without --incremental)');
  }
  return { id: b.id, parent: b.parent, kind: b.kind, granularity: b.granularity, ...(b.fullBecause ? { fullBecause: b.fullBecause } : {}), excludedBytes: b.excludedBytes, zeroRanges };
}
