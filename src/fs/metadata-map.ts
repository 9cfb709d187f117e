// The metadata-block map (seed 004, claim 10): which blocks of a file system hold its structure
// rather than file data, for `--hold metadata`. A superset is always safe (holding one block more
// costs only a wait); a block missed is a structure that may be newer than the instant, so every
// reader errs on the side of "metadata".
import type { BlockReader } from '../device/device';
import type { Bitset } from '../util/bitset';
import type { FileSystemKind } from './used-map';

export interface MetadataMap {
  filesystem: FileSystemKind;
  /** Bytes per block of `bitmap` (the file system's block size). */
  blockSize: number;
  /** ceil(device size / blockSize). */
  totalBlocks: number;
  /** Bit i set = block i holds metadata as of the read. */
  bitmap: Bitset;
  /** What the user should be told ("3 directories, 12 extent-tree blocks, journal 64 MiB"). */
  notes: string[];
}

/** The file systems whose metadata blocks livesnap can name; anything else is refused up front. */
export const METADATA_FILESYSTEMS = 'ext2/3/4 or XFS';

/** Reads the metadata map of the file system on `reader`; throws CorruptFileSystemError or UserError. */
export async function readMetadataMap(reader: BlockReader): Promise<MetadataMap> {
  const [{ extReader }, { xfsReader }] = await Promise.all([import('./ext4'), import('./xfs')]);
  if (await extReader.probe(reader)) return (await import('./ext4-metadata')).readExtMetadata(reader);
  if (await xfsReader.probe(reader)) return (await import('./xfs-metadata')).readXfsMetadata(reader);
  const { recognise } = await import('./detect');
  const { UserError } = await import('../util/errors');
  const found = (await recognise(reader)) ?? 'no file system livesnap recognises';
  throw new UserError(`--hold metadata knows the metadata blocks of ${METADATA_FILESYSTEMS} file systems only, and this volume holds ${found}`, 'use --hold all or --hold backup-blocks');
}
