// dumpe2fs's view of an ext2/3/4 image, the reference the used-block maps are checked against.
// dumpe2fs exits non-zero on some images that still print every group (e.g. a journal that needs
// recovery), so its output is parsed whatever the status; a missing field is an error.
import { Bitset } from '../../src/util/bitset';
import { runStatus } from './system';

export interface DumpInfo {
  blockSize: number;
  blockCount: number;
  firstBlock: number;
  free: Bitset;
  features: string[];
}

/** dumpe2fs's view: geometry and the union of every group's "Free blocks:" ranges. */
export function dumpe2fs(file: string): DumpInfo {
  const out = runStatus('dumpe2fs', [file]).stdout;
  const num = (re: RegExp) => {
    const m = re.exec(out);
    if (!m) throw new Error(`dumpe2fs output lacks ${re}`);
    return Number(m[1]);
  };
  const blockSize = num(/^Block size:\s+(\d+)/m);
  const blockCount = num(/^Block count:\s+(\d+)/m);
  const firstBlock = num(/^First block:\s+(\d+)/m);
  const features = (/^Filesystem features:\s+(.*)$/m.exec(out)?.[1] ?? '').trim().split(/\s+/);
  const free = new Bitset(blockCount);
  for (const m of out.matchAll(/^\s+Free blocks: ?(.*)$/gm)) {
    for (const part of m[1]!.split(',').map((s) => s.trim()).filter(Boolean)) {
      const [a, b] = part.split('-').map(Number);
      free.setRange(a!, (b ?? a!) + 1);
    }
  }
  return { blockSize, blockCount, firstBlock, free, features };
}

