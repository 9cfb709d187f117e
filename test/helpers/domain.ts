// partclone's view of a volume: "partclone.<fs> -D" writes a ddrescue domain log whose "+" lines
// are the byte ranges it would copy. Read into a Bitset of `blockSize` units for comparison.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Bitset } from '../../src/util/bitset';
import { runStatus } from './system';

export interface Domain {
  /** Bytes the domain log covers (partclone's idea of the file system's size). */
  size: number;
  used: Bitset;
  /** "+" ranges that do not start or end on a block boundary. */
  unaligned: number;
}

export function partcloneDomain(tool: string, source: string, dir: string, blockSize: number): Domain {
  const log = path.join(dir, `${path.basename(source)}.domain`);
  const r = runStatus(tool, ['-D', '-s', source, '-o', log, '-L', `${log}.log`]);
  if (r.status !== 0) throw new Error(`${tool} -D failed (${r.status}): ${r.stderr.slice(-2000)}`);
  const text = fs.readFileSync(log, 'utf8');
  const ranges: Array<[number, number]> = [];
  let size = 0;
  for (const line of text.split('\n')) {
    const m = /^0x([0-9A-Fa-f]+)\s+0x([0-9A-Fa-f]+)\s+([+?-])/.exec(line);
    if (!m) continue;
    const a = parseInt(m[1]!, 16), n = parseInt(m[2]!, 16);
    size = Math.max(size, a + n);
    if (m[3] === '+') ranges.push([a, a + n]);
  }
  const used = new Bitset(Math.ceil(size / blockSize));
  let unaligned = 0;
  for (const [a, b] of ranges) {
    if (a % blockSize || b % blockSize) unaligned++;
    used.setRange(Math.floor(a / blockSize), Math.ceil(b / blockSize));
  }
  return { size, used, unaligned };
}

/** Blocks set in exactly one of two bitsets over [0, n), with a few examples. */
export function bitDiff(a: Bitset, b: Bitset, n: number): { count: number; examples: string[] } {
  let count = 0;
  const examples: string[] = [];
  for (let i = 0; i < n; i++) {
    if (a.get(i) !== b.get(i)) {
      count++;
      if (examples.length < 6) examples.push(`block ${i}: ${a.get(i) ? 'ours' : 'theirs'} only`);
    }
  }
  return { count, examples };
}
