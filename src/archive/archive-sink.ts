// ArchiveSink: a BackupSink that writes the livesnap tar archive (POSIX pax):
//   manifest.json | pax 'x' header + ustar header "./GNUSparseFile.0/disk.img" (GNU sparse 1.0) |
//   sparse map + data of the used blocks | trailer.json (chunk checksums, bad blocks, status) |
//   two zero blocks | zero padding to a whole record.
// Every byte goes through one RecordWriter (large buffers, whole records out); chunks are hashed in
// place in that buffer once complete, so the data is copied exactly once.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Writable } from 'node:stream';
import { xxh128 } from '../device/hash';
import type { BackupSink, DataBatch, FinishInfo, VolumeInfo } from '../sink/sink';
import type { Bitset } from '../util/bitset';
import { UserError } from '../util/errors';
import { ZstdRecordOutput } from './compress';
import {
  ARCHIVE_FORMAT, FORMAT_VERSION, IMAGE_NAME, IMAGE_PAX_NAME, IMAGE_USTAR_NAME, MANIFEST_NAME, TRAILER_NAME,
  MAX_BAD_BLOCKS, archiveLimitProblem, defaultChunkSize, hex, sealJson, type ChunkRow, type Manifest, type Trailer,
} from './manifest';
import { VolumeSetOutput } from './multi-volume';
import { BLOCK, USTAR_MAX_SIZE, padTo512, paxRecords, smallMember, ustarHeader, type Owner } from './pax-header';
import { DEFAULT_RECORD_SIZE, FdRecordOutput, RecordWriter, WritableRecordOutput, checkRecordSize, openRecordFile, type RecordOutput } from './record-writer';
import { encodeSparseMap, sparseMapFromBitset, type SparseMap } from './sparse-map';

export interface ArchiveSinkOptions {
  /**
   * A path (file or tape device, truncated/created 0600), '-' for standard output (written with
   * writev(2) on fd 1, faster than process.stdout; do not write anything else to stdout), or a Writable.
   */
  out: string | Writable;
  /** What a Writable `out` is, for errors (default "the archive stream"). */
  outName?: string;
  /** Bytes per write to the target; multiple of 512, 512..1 MiB. Default 10240. */
  recordSize?: number;
  compress?: 'zstd';
  /** zstd level: 1..19, or negative for --fast=N. Default 1. */
  compressLevel?: number;
  /** Split into volumes of at most this many bytes (needs `out` to be a path). */
  tapeSize?: number;
  nextVolumeCommand?: string;
  /** Path of volume n (default: `out` for every volume). */
  volumePath?: (n: number) => string;
  /** Chunk size for checksums (default: 1 MiB, larger for huge volumes). */
  chunkSize?: number;
  /** Aggregation buffer size (default 8 MiB, at least 4 chunks). */
  bufferSize?: number;
}

export function createArchiveSink(opts: ArchiveSinkOptions): ArchiveSink {
  return new ArchiveSink(opts);
}

export class ArchiveSink implements BackupSink {
  readonly description: string;
  readonly recordSize: number;
  private output: RecordOutput | undefined;
  private writer!: RecordWriter;
  private createdFile: string | undefined;
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
  private readonly volumeSet: VolumeSetOutput | undefined;

  constructor(private readonly opts: ArchiveSinkOptions) {
    this.recordSize = checkRecordSize(opts.recordSize ?? DEFAULT_RECORD_SIZE);
    const where = typeof opts.out === 'string' && opts.out !== '-' ? opts.out : 'standard output';
    this.description = `${opts.compress === 'zstd' ? 'zstd-compressed ' : ''}tar archive ${where}`;
    if (opts.tapeSize !== undefined) {
      if (typeof opts.out !== 'string' || opts.out === '-') throw new Error('a multi-volume archive (tape size) needs a file or device path, not a stream');
      this.volumeSet = new VolumeSetOutput({ path: opts.out, volumePath: opts.volumePath, nextVolumeCommand: opts.nextVolumeCommand }, opts.tapeSize, this.recordSize);
    }
  }

  /** Bytes of the (uncompressed) tar stream so far. */
  get archiveBytes(): number { return this.writer ? this.writer.position : 0; }
  /** Number of the volume being written (multi-volume), else 1. */
  get volume(): number { return this.volumeSet?.volume ?? 1; }

  private async openOutput(): Promise<RecordOutput> {
    const r = this.recordSize;
    let base: RecordOutput;
    if (this.volumeSet) base = this.volumeSet;
    else if (this.opts.out === '-') base = new FdRecordOutput(1, r, false);
    else if (typeof this.opts.out === 'string') {
      // A file is written as "<target>.partial" and renamed when complete (as images are), so a
      // backup killed mid-way never leaves something under the final name; devices are written as they are.
      const st = await fs.promises.stat(this.opts.out).catch(() => undefined);
      const toFile = !st || st.isFile();
      const o = await openRecordFile(toFile ? `${this.opts.out}.partial` : this.opts.out, r);
      if (o.regular) this.createdFile = toFile ? `${this.opts.out}.partial` : this.opts.out;
      base = o.out;
    } else {
      base = new WritableRecordOutput(this.opts.out, r, { end: this.opts.out !== process.stdout, where: this.opts.outName });
    }
    if (this.opts.compress === 'zstd') return new ZstdRecordOutput(base, r, this.opts.compressLevel ?? 1);
    return base;
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
      compression: this.opts.compress === 'zstd' ? 'zstd' : 'none',
      notes: volume.notes,
      ...(volume.layout ? { layout: volume.layout } : {}),
    };

    this.output = await this.openOutput();
    const bufferSize = Math.max(this.opts.bufferSize ?? 8 << 20, 4 * this.chunkSize + 2 * this.recordSize);
    this.writer = new RecordWriter(this.output, this.recordSize, bufferSize, 3);
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
      // The last block of a volume whose size is not a whole number of blocks is read whole; the
      // archive stores the volume's bytes only.
      if (off + len > this.map.realSize && off < this.map.realSize) len = this.map.realSize - off;
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
    await this.output!.close();
    if (this.createdFile?.endsWith('.partial') && typeof this.opts.out === 'string') {
      await fs.promises.rename(this.createdFile, this.opts.out);
      await syncDirOf(this.opts.out);
      this.createdFile = undefined;
    }
    this.state = 'done';
  }

  async abort(_reason: Error): Promise<void> {
    if (this.state === 'done' || this.state === 'aborted') return;
    this.state = 'aborted';
    try { this.output?.destroy(); } catch { /* never throws */ }
    // A partial archive file is removed; on a stream or tape there is no trailer, so it never reads as complete.
    if (this.createdFile) await fs.promises.rm(this.createdFile, { force: true }).catch(() => {});
  }
}

/** fsync of a file's directory, so a rename is durable (best effort: some file systems refuse it). */
async function syncDirOf(file: string): Promise<void> {
  const fh = await fs.promises.open(path.dirname(file), 'r').catch(() => undefined);
  if (!fh) return;
  try { await fh.sync(); } catch { /* not supported here */ } finally { await fh.close(); }
}
