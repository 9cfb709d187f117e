// Picks the file-system reader for a volume and falls back to "every block" — loudly — whenever
// the file system is unknown or its metadata cannot be trusted.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import { CorruptFileSystemError, type FileSystemReader, type UsedBlockMap } from './used-map';
import { extReader } from './ext4';
import { xfsReader } from './xfs';

const READERS: FileSystemReader[] = [extReader, xfsReader];

/** A map that copies every block (512-byte units unless a block size is known). */
export function allBlocksMap(size: number, note: string, blockSize = 512, filesystem: UsedBlockMap['filesystem'] = 'unknown'): UsedBlockMap {
  const totalBlocks = Math.ceil(size / blockSize);
  return {
    filesystem,
    blockSize,
    totalBlocks,
    usedBlocks: totalBlocks,
    bitmap: new Bitset(totalBlocks, true),
    notes: [note],
    allBlocks: true,
  };
}

export async function readUsedBlockMap(reader: BlockReader): Promise<UsedBlockMap> {
  for (const fs of READERS) {
    if (!(await fs.probe(reader))) continue;
    try {
      return await fs.read(reader);
    } catch (e) {
      if (e instanceof CorruptFileSystemError) {
        return allBlocksMap(reader.size, `${e.filesystem} metadata cannot be trusted (${e.message}): every block is copied`, 4096);
      }
      throw e;
    }
  }
  return allBlocksMap(reader.size, 'no known file system (ext2/3/4, xfs) found: every block is copied', 4096);
}
