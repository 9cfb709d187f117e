// Picks the reader for a device: a partition table (GPT, MBR), an LVM PV, or a file system, and
// composes whole disks from their parts. It falls back to "every block" — loudly — whenever the
// contents are unknown or their metadata cannot be trusted.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import { btrfsReader } from './btrfs';
import { MapBuilder } from './compose';
import { readPartitionedDisk } from './disk';
import { extReader } from './ext4';
import { fatReader } from './fat';
import { probeGpt, readGpt } from './gpt';
import { collectNotes, layoutNode, type LayoutNode } from './layout';
import { probeLvm, scanPvs } from './lvm';
import { looksLikeMbr, readMbr } from './mbr';
import { ntfsReader } from './ntfs';
import { swapReader } from './swap';
import { CorruptFileSystemError, type FileSystemReader, type UsedBlockMap } from './used-map';
import { xfsReader } from './xfs';

/**
 * File systems in the order they are tried. Those whose signature sits in sector 0 come before ext
 * (its magic at byte 1080 is only two bytes) and btrfs (64 KiB in); swap's signature ends page 0.
 */
const READERS: FileSystemReader[] = [swapReader, ntfsReader, fatReader, xfsReader, extReader, btrfsReader];
const KNOWN = 'ext2/3/4, xfs, btrfs, ntfs, fat, swap, LVM2, GPT, MBR';

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

function usedBytesOf(map: UsedBlockMap, size: number): number {
  return Math.min(map.usedBlocks * map.blockSize, size);
}

/** The node of a volume holding one file system (or nothing known). */
function volumeNode(map: UsedBlockMap, name: string, size: number): LayoutNode {
  return layoutNode({ kind: 'device', name, content: map.filesystem, size, usedBytes: usedBytesOf(map, size), allBlocks: map.allBlocks, notes: [...map.notes] });
}

/**
 * The map of a volume that holds a file system (a partition, an LV, a whole device): the first
 * reader whose probe matches; unknown or untrustworthy contents are copied whole, said so.
 */
export async function readFileSystem(reader: BlockReader, what = 'the device'): Promise<UsedBlockMap> {
  for (const fs of READERS) {
    if (!(await fs.probe(reader))) continue;
    try {
      return await fs.read(reader);
    } catch (e) {
      if (e instanceof CorruptFileSystemError) {
        return allBlocksMap(reader.size, `${e.filesystem} metadata cannot be trusted (${e.message}): every block is copied`, 4096);
      }
      // A reader that asked for bytes past the volume's end followed a pointer no check caught.
      if (e instanceof RangeError) {
        return allBlocksMap(reader.size, `${fs.kind} metadata points past the end of ${what} (${e.message}): every block is copied`, 4096);
      }
      throw e;
    }
  }
  return allBlocksMap(reader.size, `no known file system or volume manager (${KNOWN}) found on ${what}: every block is copied`, 4096);
}

/** readFileSystem, with the volume's layout node. */
export async function readVolume(reader: BlockReader, name: string): Promise<{ map: UsedBlockMap; node: LayoutNode }> {
  const map = await readFileSystem(reader, name);
  return { map, node: volumeNode(map, name, reader.size) };
}

async function sector0(reader: BlockReader): Promise<Buffer | undefined> {
  return reader.size >= 512 ? reader.read(0, 512) : undefined;
}

/** A PV directly on the device (no partition table). */
async function readWholePv(reader: BlockReader, name: string): Promise<UsedBlockMap> {
  const plan = await scanPvs([{ where: 'the device', reader, offset: 0 }]);
  // PV data areas and extents are sector-aligned; 4096 when every LVM boundary allows it.
  const bs = plan.boundaries().every((b) => b % 4096 === 0) ? 4096 : 512;
  const builder = new MapBuilder(reader.size, bs);
  const [pvNode] = await plan.mark(builder, readVolume);
  const used = builder.bitmap.count();
  const layout = layoutNode({ kind: 'device', name, content: 'lvm2', size: reader.size, usedBytes: Math.min(used * bs, reader.size), allBlocks: pvNode!.allBlocks, notes: pvNode!.notes, children: pvNode!.children });
  return { filesystem: 'lvm2', blockSize: bs, totalBlocks: builder.totalBlocks, usedBlocks: used, bitmap: builder.bitmap, notes: collectNotes(layout), allBlocks: pvNode!.allBlocks, layout };
}

/**
 * The used-block map of a whole device: a partitioned disk (GPT, then MBR), a PV, or one file
 * system. `name` labels the top of the layout tree (the path the user gave).
 */
export async function readUsedBlockMap(reader: BlockReader, name = 'device'): Promise<UsedBlockMap> {
  const s0 = await sector0(reader);
  const tableFailed = (kind: 'gpt' | 'mbr', e: CorruptFileSystemError): UsedBlockMap => {
    const map = allBlocksMap(reader.size, `${kind.toUpperCase()} partition table cannot be trusted (${e.message}): the whole disk is copied`, 4096, kind);
    map.layout = volumeNode(map, name, reader.size);
    return map;
  };
  if (await probeGpt(reader)) {
    try {
      return await readPartitionedDisk(reader, await readGpt(reader), name, readVolume);
    } catch (e) {
      if (e instanceof CorruptFileSystemError && (e.filesystem === 'gpt' || e.filesystem === 'mbr')) return tableFailed('gpt', e);
      throw e;
    }
  }
  if (await probeLvm(reader)) return readWholePv(reader, name);
  // An NTFS boot sector's code runs over the MBR's entry area; its signature settles it first.
  const ntfs = s0 !== undefined && s0.toString('latin1', 3, 11) === 'NTFS    ';
  if (s0 && !ntfs && looksLikeMbr(s0)) {
    try {
      return await readPartitionedDisk(reader, await readMbr(reader), name, readVolume);
    } catch (e) {
      if (e instanceof CorruptFileSystemError && e.filesystem === 'mbr') return tableFailed('mbr', e);
      throw e;
    }
  }
  const map = await readFileSystem(reader);
  map.layout = volumeNode(map, name, reader.size);
  return map;
}

/**
 * What a device or image positively holds, by magic numbers only (cheap): a partition table, an
 * LVM PV or a known file system's kind; undefined when nothing known is there.
 */
export async function recognise(reader: BlockReader): Promise<string | undefined> {
  if (await probeGpt(reader)) return 'gpt';
  if (await probeLvm(reader)) return 'lvm2';
  const s0 = await sector0(reader);
  const ntfs = s0 !== undefined && s0.toString('latin1', 3, 11) === 'NTFS    ';
  if (s0 && !ntfs && looksLikeMbr(s0)) return 'mbr';
  for (const fs of READERS) if (await fs.probe(reader)) return fs.kind;
  return undefined;
}
