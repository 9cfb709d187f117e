// manifest.json (first member) and trailer.json (last member). Both are "sealed": the JSON text ends
// with a checksum field holding the XXH3-128 of the text before it, so a flipped byte in either is
// reported as a corrupt manifest/trailer, never mistaken for corrupt data.
import { native } from '../device/native';
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
}

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
  const h = hex(native().xxh128(Buffer.from(prefix, 'utf8')));
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
  const want = hex(native().xxh128(text.subarray(0, at + marker.length)));
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
  need((o.blockSize as number) > 0 && (o.chunkSize as number) > 0 && (o.recordSize as number) % 512 === 0 && (o.recordSize as number) > 0, w, 'blockSize/chunkSize/recordSize', archiveOffset);
  need((o.storedBytes as number) <= (o.volumeSize as number), w, 'storedBytes', archiveOffset);
  need(typeof o.sparseMapXxh128 === 'string' && /^[0-9a-f]{32}$/.test(o.sparseMapXxh128), w, 'sparseMapXxh128', archiveOffset);
  need(typeof o.snapshotTime === 'string' && !Number.isNaN(Date.parse(o.snapshotTime)), w, 'snapshotTime', archiveOffset);
  need(o.compression === 'none' || o.compression === 'zstd', w, 'compression', archiveOffset);
  need(o.checksum === 'xxh3-128', w, 'checksum', archiveOffset);
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
  need(Array.isArray(o.badBlocks) && (o.badBlocks as unknown[]).every(isCount), w, 'badBlocks', archiveOffset);
  const chunks = o.chunks as unknown[];
  for (let i = 0; i < count; i++) {
    const r = chunks[i] as unknown[];
    need(Array.isArray(r) && r[0] === i && isCount(r[1]) && isCount(r[2]) && typeof r[3] === 'string' && /^[0-9a-f]{32}$/.test(r[3] as string), w, `chunks[${i}]`, archiveOffset);
  }
  return o as unknown as Trailer;
}

/** Chunk size for `storedBytes`: 1 MiB, doubled until there are at most 2^20 chunks (trailer <= ~70 MB). */
export function defaultChunkSize(storedBytes: number): number {
  let c = 1 << 20;
  while (storedBytes / c > 1 << 20) c *= 2;
  return c;
}
