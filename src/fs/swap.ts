// Linux swap space: only its header page (signature, UUID, label, bad-page list) is kept. What is
// paged out is not needed after a restore (a restored swap space is empty). A swap space that holds
// a hibernation image is different: resuming needs it, so it is copied whole.
import type { BlockReader } from '../device/device';
import { Bitset } from '../util/bitset';
import { CorruptFileSystemError, type FileSystemReader, type UsedBlockMap } from './used-map';

const PAGE_SIZES = [4096, 8192, 16384, 65536];
const SWAP = ['SWAPSPACE2', 'SWAP-SPACE'];
const HIBERNATION = ['S1SUSPEND', 'S2SUSPEND', 'ULSUSPEND', 'LINHIB0001', 'S1SUSPEND\0'];

/** The page size whose last 10 bytes of page 0 carry a swap or hibernation signature. */
async function findSignature(reader: BlockReader): Promise<{ pageSize: number; signature: string } | undefined> {
  const sizes = PAGE_SIZES.filter((p) => p <= reader.size);
  if (!sizes.length) return undefined;
  const bufs = await reader.readMany(sizes.map((p) => ({ offset: p - 10, length: 10 })));
  for (let i = 0; i < sizes.length; i++) {
    const text = bufs[i]!.toString('latin1');
    for (const s of [...SWAP, ...HIBERNATION]) if (text.startsWith(s)) return { pageSize: sizes[i]!, signature: s.replace(/\0/g, '') };
  }
  return undefined;
}

export const swapReader: FileSystemReader = {
  kind: 'swap',

  async probe(reader: BlockReader): Promise<boolean> {
    return (await findSignature(reader)) !== undefined;
  },

  async read(reader: BlockReader): Promise<UsedBlockMap> {
    const sig = await findSignature(reader);
    if (!sig) throw new CorruptFileSystemError('swap', 'no swap signature at the end of the first page');
    const bs = sig.pageSize;
    const totalBlocks = Math.ceil(reader.size / bs);
    if (!SWAP.includes(sig.signature)) {
      return {
        filesystem: 'swap', blockSize: bs, totalBlocks, usedBlocks: totalBlocks, bitmap: new Bitset(totalBlocks, true), allBlocks: true,
        notes: [`swap space holds a hibernation image (signature ${sig.signature}): copied whole so that the system can resume`],
      };
    }
    const head = await reader.read(0, Math.min(bs, reader.size));
    const notes = [`swap space (${sig.signature}, ${bs}-byte pages): only the header page is copied; a restored swap space is empty`];
    if (sig.signature === 'SWAPSPACE2' && head.length >= 1052) {
      const lastPage = head.readUInt32LE(1028);
      const bad = head.readUInt32LE(1032);
      if (lastPage > 0 && (lastPage + 1) * bs > reader.size) notes.push(`its header says ${lastPage + 1} pages, more than the ${totalBlocks} the volume holds`);
      if (bad > 0) notes.push(`${Math.min(bad, 637)} bad pages listed in its header`);
    }
    const bitmap = new Bitset(totalBlocks);
    bitmap.set(0);
    return { filesystem: 'swap', blockSize: bs, totalBlocks, usedBlocks: 1, bitmap, notes, allBlocks: false };
  },
};
