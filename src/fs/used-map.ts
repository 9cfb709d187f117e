// The used-block map (seed 001, FIG. 13 step 1306): which blocks of a volume hold data and must
// be copied. Read straight from the device's own structures, never through a mounted file system.
import { Bitset } from '../util/bitset';
import type { LayoutNode } from './layout';

/** What a map was read from: a file system, or a container of volumes (partition table, LVM PV). */
export type FileSystemKind =
  | 'ext2' | 'ext3' | 'ext4' | 'xfs' | 'btrfs' | 'ntfs' | 'fat12' | 'fat16' | 'fat32' | 'swap'
  | 'gpt' | 'mbr' | 'lvm2'
  | 'unknown';

export interface UsedBlockMap {
  filesystem: FileSystemKind;
  /** Bytes per block: the file system's block size (512 for an unknown file system). */
  blockSize: number;
  /** Blocks covering the whole device: ceil(device size / blockSize). */
  totalBlocks: number;
  usedBlocks: number;
  /** Bit i set = block i must be copied. Bits past the file system's end (device tail) are set. */
  bitmap: Bitset;
  /**
   * Human-readable facts the user must be told: e.g. "unknown file system: every block is copied",
   * "journal needs recovery: used the newest committed journal copies of 3 bitmap blocks",
   * "group descriptor 7 is corrupt: every block is copied".
   */
  notes: string[];
  /** True when the map is not the file system's own but "everything" (unknown fs or a fallback). */
  allBlocks: boolean;
  /**
   * What the device holds, as a tree (disk -> partitions -> LVs -> file systems), each node with
   * its used and total bytes. Set by detect.ts for every device it reads.
   */
  layout?: LayoutNode;
}

/**
 * Thrown by a file-system reader when its metadata cannot be trusted (bad checksum, a pointer past
 * the end of the device, impossible geometry). The caller falls back to copying every block and
 * tells the user why: a backup must never skip a block because a bitmap lied.
 */
export class CorruptFileSystemError extends Error {
  constructor(readonly filesystem: FileSystemKind, message: string) {
    super(message);
    this.name = 'CorruptFileSystemError';
  }
}

/** A reader per file system: `probe` looks at magic numbers only; `read` builds the map. */
export interface FileSystemReader {
  kind: FileSystemKind | 'ext';
  probe(reader: import('../device/device').BlockReader): Promise<boolean>;
  read(reader: import('../device/device').BlockReader): Promise<UsedBlockMap>;
}

/**
 * The map at another block size (a snapshot's, 4096): a block is used when any byte of it is
 * used in `map`. `totalBlocks` is the volume at that size.
 */
export function usedAtBlockSize(map: UsedBlockMap, blockSize: number, totalBlocks: number): Bitset {
  const used = new Bitset(totalBlocks);
  const fbs = map.blockSize;
  for (const [s, e] of map.bitmap.runs()) {
    used.setRange(Math.floor((s * fbs) / blockSize), Math.min(totalBlocks, Math.ceil((e * fbs) / blockSize)));
  }
  return used;
}
