// xfs_db's view of an XFS image, the reference the XFS used-block maps are checked against.
import * as fs from 'node:fs';
import { run } from './system';

export interface DbAg {
  bnolevel: number;
  freeblks: number;
  agfl: Set<number>;
}

/** Free extents per AG from `xfs_db freesp -d` (which also lists AGFL blocks), and AGF facts. */
export function xfsDbReference(file: string, agcount: number): { free: Array<Array<[number, number]>>; ags: DbAg[] } {
  const cmds = ['-c', 'freesp -d'];
  for (let a = 0; a < agcount; a++) cmds.push('-c', `agf ${a}`, '-c', 'print bnolevel flfirst fllast flcount freeblks', '-c', `agfl ${a}`, '-c', 'print bno');
  const out = run('xfs_db', ['-r', ...cmds, file]);
  const free: Array<Array<[number, number]>> = Array.from({ length: agcount }, () => []);
  const ags: DbAg[] = [];
  let cur: Partial<Record<string, number>> = {};
  for (const line of out.split('\n')) {
    const ext = /^\s*(\d+)\s+(\d+)\s+(\d+)\s*$/.exec(line);
    if (ext) { free[Number(ext[1])]!.push([Number(ext[2]), Number(ext[2]) + Number(ext[3])]); continue; }
    const kv = /^(\w+) = (\d+)$/.exec(line.trim());
    if (kv) { cur[kv[1]!] = Number(kv[2]); continue; }
    if (line.startsWith('bno[')) {
      const slots = line.replace(/^bno\[[^\]]*\] = /, '').trim().split(/\s+/).map((s) => s.split(':')[1]!);
      const agfl = new Set<number>();
      if (cur.flcount! > 0) {
        for (let i = cur.flfirst!, k = 0; k < cur.flcount!; k++, i = (i + 1) % slots.length) agfl.add(Number(slots[i]));
      }
      ags.push({ bnolevel: cur.bnolevel!, freeblks: cur.freeblks!, agfl });
      cur = {};
    }
  }
  return { free, ags };
}

export function withoutAgfl(free: Array<Array<[number, number]>>, ags: DbAg[]): Array<Array<[number, number]>> {
  return free.map((list, a) => list.filter(([s, e]) => !(e - s === 1 && ags[a]!.agfl.has(s))).sort((x, y) => x[0] - y[0]));
}

/** Free runs of our bitmap, per AG, in AG-relative block numbers. */
export function ourFreeExtents(bitmap: { next(from: number, v: boolean): number }, dblocks: number, agblocks: number, agcount: number) {
  const free: Array<Array<[number, number]>> = Array.from({ length: agcount }, () => []);
  let i = bitmap.next(0, false);
  while (i < dblocks) {
    const end = Math.min(bitmap.next(i, true), dblocks);
    // Split a run at AG boundaries (free extents never cross them).
    for (let s = i; s < end;) {
      const a = Math.floor(s / agblocks);
      const e = Math.min(end, (a + 1) * agblocks);
      free[a]!.push([s - a * agblocks, e - a * agblocks]);
      s = e;
    }
    i = bitmap.next(end, false);
  }
  return free;
}

/** Adjacent free extents on either side could be merged by the bitmap; merge the reference too. */
export function mergeAdjacent(list: Array<[number, number]>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const [s, e] of list) {
    const last = out[out.length - 1];
    if (last && last[1] === s) last[1] = e; else out.push([s, e]);
  }
  return out;
}

export function sbGeometry(file: string) {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(512);
  fs.readSync(fd, b, 0, 512, 0);
  fs.closeSync(fd);
  return { blockSize: b.readUInt32BE(4), dblocks: Number(b.readBigUInt64BE(8)), agblocks: b.readUInt32BE(84), agcount: b.readUInt32BE(88) };
}

