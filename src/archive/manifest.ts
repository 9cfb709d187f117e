// manifest.json (first member) and trailer.json (last member). Both are "sealed": the JSON text ends
// with a checksum field holding the XXH3-128 of the text before it, so a flipped byte in either is
// reported as a corrupt manifest/trailer, never mistaken for corrupt data.
import { xxh128 } from '../device/hash';
import { layoutProblem, type LayoutNode } from '../fs/layout';
import type { FileSystemKind } from '../fs/used-map';
import { ArchiveError } from './errors';

export const ARCHIVE_FORMAT = 'livesnap-archive';
export const FORMAT_VERSION = 1;
export const MANIFEST_NAME = 'manifest.json';
export const IMAGE_NAME = 'disk.img';
/** The ustar name of the sparse member, as GNU tar writes it; tar restores it as GNU.sparse.name. */
export const IMAGE_USTAR_NAME = './GNUSparseFile.0/disk.img';
export const IMAGE_PAX_NAME = './PaxHeaders/disk.img';
export const TRAILER_NAME = 'trailer.json';
const SEAL_KEY = 'xxh128';

// Limits of the format: a reader allocates nothing a valid archive cannot need, and a writer never
// writes past them. Chunk sizes are powers of two; a chunk's row in the trailer is under 100 bytes.
export const MIN_CHUNK_SIZE = 64 << 10;
export const MAX_CHUNK_SIZE = 256 << 20;
export const MAX_CHUNKS = 1 << 22;
/** Data regions of the sparse map (16 bytes each in memory, up to ~34 in the archive). */
export const MAX_SPARSE_REGIONS = 1 << 24;
export const MAX_BAD_BLOCKS = 1 << 20;
export const MAX_MANIFEST_BYTES = 16 << 20;
const MAX_BLOCK_SIZE = 16 << 20;
const MIN_RECORD = 512, MAX_RECORD = 1 << 20;

/** Largest trailer a valid archive of `chunks` chunks can have (rows, bad blocks, fixed fields). */
export function maxTrailerBytes(chunks: number): number {
  return (64 << 10) + chunks * 100 + MAX_BAD_BLOCKS * 18;
}

export interface Manifest {
  format: typeof ARCHIVE_FORMAT;
  formatVersion: number;
  toolVersion: string;
  source: string;
  filesystem: FileSystemKind;
  /** ISO 8601 */
  snapshotTime: string;
  volumeSize: number;
  blockSize: number;
  totalBlocks: number;
  usedBlocks: number;
  /** Bytes of image data stored in disk.img (the used blocks, the last one clamped to the volume). */
  storedBytes: number;
  /** Data regions in the GNU sparse map (the map may hold one more entry: the end-of-image hole). */
  sparseRegions: number;
  /** XXH3-128 (hex) of the sparse map text as stored (padded to 512). */
  sparseMapXxh128: string;
  checksum: 'xxh3-128';
  /** Chunk i = bytes [i*chunkSize, (i+1)*chunkSize) of the stored data (the used regions, concatenated). */
  chunkSize: number;
  /** Record size of the (compressed, if compressed) byte stream. */
  recordSize: number;
  compression: 'none' | 'zstd';
  notes: string[];
  /** What the volume holds, as `inspect` shows it (absent in archives written before it existed). */
  layout?: LayoutNode;
  /** Its place in a chain (online backups of a served export; absent in older archives). */
  backup?: ManifestBackup;
}

/** A backup's chain facts: an incremental's disk.img holds only the blocks changed since `parent`. */
export interface ManifestBackup {
  id: string;
  parent: string | null;
  kind: 'full' | 'incremental';
  granularity: number;
  fullBecause?: string;
  excludedBytes: number;
  /** [volume offset, length]: changed since the parent but free or excluded now: zeros after applying. */
  zeroRanges: Array<[number, number]>;
}

export const MAX_ZERO_RANGES = 1 << 18;
const BACKUP_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/;

/** One row per chunk: [index, volume offset of its first byte, length, XXH3-128 hex]. */
export type ChunkRow = [number, number, number, string];

export interface Trailer {
  format: typeof ARCHIVE_FORMAT;
  formatVersion: number;
  status: 'complete';
  storedBytes: number;
  chunkSize: number;
  chunkCount: number;
  chunks: ChunkRow[];
  /** Blocks (blockSize units) that could not be read and are stored as zeros. */
  badBlocks: number[];
  finishedTime: string;
}

export function hex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
}

/** JSON text of `obj` with a last field `"xxh128": "<hash of everything before that field>"`. */
export function sealJson(obj: object): Buffer {
  const body = JSON.stringify(obj, null, 1);
  const prefix = `${body.slice(0, body.lastIndexOf('}')).trimEnd()},\n "${SEAL_KEY}": "`;
  const h = hex(xxh128(Buffer.from(prefix, 'utf8')));
  return Buffer.from(`${prefix}${h}"\n}\n`, 'utf8');
}

/** Parses a sealed JSON member; `what` and `archiveOffset` name it in errors. */
export function unsealJson(text: Buffer, what: string, archiveOffset: number): Record<string, unknown> {
  let obj: unknown;
  try {
    obj = JSON.parse(text.toString('utf8'));
  } catch (e) {
    throw new ArchiveError(`${what} at archive offset ${archiveOffset} is corrupt: not valid JSON (${(e as Error).message})`, archiveOffset);
  }
  const marker = Buffer.from(`"${SEAL_KEY}": "`);
  const at = text.lastIndexOf(marker);
  if (typeof obj !== 'object' || obj === null || at < 0) throw new ArchiveError(`${what} at archive offset ${archiveOffset} is not a livesnap ${what} (no ${SEAL_KEY} seal)`, archiveOffset);
  const want = hex(xxh128(text.subarray(0, at + marker.length)));
  const got = (obj as Record<string, unknown>)[SEAL_KEY];
  if (got !== want) throw new ArchiveError(`${what} at archive offset ${archiveOffset} is corrupt: its checksum does not match its contents`, archiveOffset);
  return obj as Record<string, unknown>;
}

function need(cond: boolean, what: string, field: string, archiveOffset: number): void {
  if (!cond) throw new ArchiveError(`${what} at archive offset ${archiveOffset} is invalid: bad or missing "${field}"`, archiveOffset);
}

const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

export function validateManifest(o: Record<string, unknown>, archiveOffset: number): Manifest {
  const w = MANIFEST_NAME;
  need(o.format === ARCHIVE_FORMAT, w, 'format', archiveOffset);
  if (o.formatVersion !== FORMAT_VERSION) {
    throw new ArchiveError(`${w} at archive offset ${archiveOffset}: format version ${String(o.formatVersion)} is not supported (this livesnap reads version ${FORMAT_VERSION})`, archiveOffset);
  }
  for (const f of ['volumeSize', 'blockSize', 'totalBlocks', 'usedBlocks', 'storedBytes', 'sparseRegions', 'chunkSize', 'recordSize']) need(isCount(o[f]), w, f, archiveOffset);
  const pow2 = (v: number) => v > 0 && 2 ** Math.round(Math.log2(v)) === v;
  const bs = o.blockSize as number, cs = o.chunkSize as number, rs = o.recordSize as number;
  need(pow2(bs) && bs >= 512 && bs <= MAX_BLOCK_SIZE, w, `blockSize (a power of two, 512..${MAX_BLOCK_SIZE})`, archiveOffset);
  need(pow2(cs) && cs >= MIN_CHUNK_SIZE && cs <= MAX_CHUNK_SIZE, w, `chunkSize (a power of two, ${MIN_CHUNK_SIZE}..${MAX_CHUNK_SIZE})`, archiveOffset);
  need(rs % 512 === 0 && rs >= MIN_RECORD && rs <= MAX_RECORD, w, `recordSize (a multiple of 512, ${MIN_RECORD}..${MAX_RECORD})`, archiveOffset);
  need((o.storedBytes as number) <= (o.volumeSize as number), w, 'storedBytes (more than the volume)', archiveOffset);
  need(Math.ceil((o.storedBytes as number) / cs) <= MAX_CHUNKS, w, `chunkSize (more than ${MAX_CHUNKS} chunks)`, archiveOffset);
  need((o.usedBlocks as number) <= (o.totalBlocks as number), w, 'usedBlocks (more than totalBlocks)', archiveOffset);
  need((o.sparseRegions as number) <= MAX_SPARSE_REGIONS, w, `sparseRegions (at most ${MAX_SPARSE_REGIONS})`, archiveOffset);
  need(typeof o.sparseMapXxh128 === 'string' && /^[0-9a-f]{32}$/.test(o.sparseMapXxh128), w, 'sparseMapXxh128', archiveOffset);
  need(typeof o.snapshotTime === 'string' && !Number.isNaN(Date.parse(o.snapshotTime)), w, 'snapshotTime', archiveOffset);
  need(o.compression === 'none' || o.compression === 'zstd', w, 'compression', archiveOffset);
  need(o.checksum === 'xxh3-128', w, 'checksum', archiveOffset);
  if (o.backup !== undefined) {
    const b = o.backup as Record<string, unknown>;
    const size = o.volumeSize as number;
    need(typeof b === 'object' && b !== null, w, 'backup', archiveOffset);
    need(typeof b.id === 'string' && BACKUP_ID.test(b.id), w, 'backup.id', archiveOffset);
    need(b.parent === null || (typeof b.parent === 'string' && BACKUP_ID.test(b.parent)), w, 'backup.parent', archiveOffset);
    need(b.kind === 'full' ? b.parent === null : b.kind === 'incremental' && b.parent !== null, w, 'backup.kind', archiveOffset);
    need(isCount(b.granularity) && pow2(b.granularity as number), w, 'backup.granularity', archiveOffset);
    need(isCount(b.excludedBytes), w, 'backup.excludedBytes', archiveOffset);
    need(b.fullBecause === undefined || typeof b.fullBecause === 'string', w, 'backup.fullBecause', archiveOffset);
    const z = b.zeroRanges;
    need(Array.isArray(z) && z.length <= MAX_ZERO_RANGES, w, 'backup.zeroRanges', archiveOffset);
    let end = 0;
    for (const r of z as unknown[]) {
      need(Array.isArray(r) && r.length === 2 && isCount(r[0]) && isCount(r[1]) && (r[1] as number) > 0 && (r[0] as number) >= end && (r[0] as number) + (r[1] as number) <= size, w, 'backup.zeroRanges (ascending ranges inside the volume)', archiveOffset);
      end = (r as number[])[0]! + (r as number[])[1]!;
    }
  }
  if (o.layout !== undefined) {
    const why = layoutProblem(o.layout);
    if (why) throw new ArchiveError(`${w} at archive offset ${archiveOffset} is invalid: bad "layout" (${why})`, archiveOffset);
  }
  return o as unknown as Manifest;
}

export function validateTrailer(o: Record<string, unknown>, m: Manifest, archiveOffset: number): Trailer {
  const w = TRAILER_NAME;
  need(o.format === ARCHIVE_FORMAT, w, 'format', archiveOffset);
  if (o.status !== 'complete') {
    throw new ArchiveError(`${w} at archive offset ${archiveOffset}: the backup is not complete (status ${JSON.stringify(o.status)})`, archiveOffset);
  }
  need(o.storedBytes === m.storedBytes, w, 'storedBytes', archiveOffset);
  need(o.chunkSize === m.chunkSize, w, 'chunkSize', archiveOffset);
  const count = Math.ceil(m.storedBytes / m.chunkSize);
  need(o.chunkCount === count && Array.isArray(o.chunks) && o.chunks.length === count, w, 'chunks', archiveOffset);
  need(Array.isArray(o.badBlocks) && o.badBlocks.length <= MAX_BAD_BLOCKS && (o.badBlocks as unknown[]).every((b) => isCount(b) && b < Math.ceil(m.volumeSize / m.blockSize)), w, 'badBlocks', archiveOffset);
  const chunks = o.chunks as unknown[];
  for (let i = 0; i < count; i++) {
    const r = chunks[i] as unknown[];
    need(Array.isArray(r) && r[0] === i && isCount(r[1]) && isCount(r[2]) && typeof r[3] === 'string' && /^[0-9a-f]{32}$/.test(r[3] as string), w, `chunks[${i}]`, archiveOffset);
  }
  return o as unknown as Trailer;
}

/** Chunk size for `storedBytes`: 1 MiB, doubled until there are at most 2^20 chunks (trailer <= ~70 MB),
 *  up to the largest chunk the format allows (then up to MAX_CHUNKS chunks: 1 PiB stored). */
export function defaultChunkSize(storedBytes: number): number {
  let c = 1 << 20;
  while (storedBytes / c > 1 << 20 && c < MAX_CHUNK_SIZE) c *= 2;
  return c;
}

/** Why a writer cannot write an archive of these numbers, or undefined. */
export function archiveLimitProblem(storedBytes: number, chunkSize: number, sparseRegions: number): string | undefined {
  if (Math.ceil(storedBytes / chunkSize) > MAX_CHUNKS) return `${storedBytes} bytes in ${chunkSize}-byte chunks is more than the format's ${MAX_CHUNKS} chunks`;
  if (sparseRegions > MAX_SPARSE_REGIONS) return `the used blocks form ${sparseRegions} separate regions, more than the format's ${MAX_SPARSE_REGIONS}`;
  return undefined;
}
