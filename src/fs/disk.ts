// A partitioned disk's map: the union of every partition's map (placed at its offset), the tables
// themselves with the first and last MiB (boot loaders and the GPT live there), and every byte no
// partition covers unless it reads as zeros (a gap may hold boot code: copied, and said so).
import type { BlockReader } from '../device/device';
import { formatBytes } from '../util/size';
import { chooseBlockSize, MapBuilder } from './compose';
import { collectNotes, layoutNode, type LayoutNode } from './layout';
import { probeLvm, scanPvs, type PvInput } from './lvm';
import type { Partition, PartitionTable } from './partition-types';
import { SliceReader } from './slice-reader';
import type { UsedBlockMap } from './used-map';

const MiB = 1 << 20;
/** Gap scans read this much per range and this many ranges per batch. */
const SCAN_CHUNK = MiB;
const SCAN_BATCH = 16;

type Interval = [number, number];

function subtract(from: Interval[], cuts: Interval[]): Interval[] {
  let out = from.filter(([a, b]) => b > a);
  for (const [c, d] of cuts) {
    const next: Interval[] = [];
    for (const [a, b] of out) {
      if (d <= a || c >= b) { next.push([a, b]); continue; }
      if (c > a) next.push([a, c]);
      if (d < b) next.push([d, b]);
    }
    out = next;
  }
  return out;
}

function union(list: Interval[]): Interval[] {
  const s = list.filter(([a, b]) => b > a).sort((x, y) => x[0] - y[0]);
  const out: Interval[] = [];
  for (const [a, b] of s) {
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

const total = (list: Interval[]) => list.reduce((n, [a, b]) => n + (b - a), 0);

function partitionName(p: Partition): string {
  return `partition ${p.number}${p.label ? ` "${p.label}"` : ''} (${p.typeName})`;
}

/** Marks the blocks of [start, end) that hold anything but zeros; returns how many bytes hold data. */
async function scanGap(reader: BlockReader, builder: MapBuilder, start: number, end: number): Promise<number> {
  const bs = builder.blockSize;
  const zero = Buffer.alloc(bs);
  let data = 0;
  const ranges: Interval[] = [];
  for (let p = start; p < end; p += SCAN_CHUNK) ranges.push([p, Math.min(end, p + SCAN_CHUNK)]);
  for (let i = 0; i < ranges.length; i += SCAN_BATCH) {
    const part = ranges.slice(i, i + SCAN_BATCH);
    const bufs = await reader.readMany(part.map(([a, b]) => ({ offset: a, length: b - a })));
    part.forEach(([a], k) => {
      const buf = bufs[k]!;
      // Block by block on the device's grid (the first and last may be partial).
      let pos = a;
      while (pos < a + buf.length) {
        const next = Math.min(a + buf.length, (Math.floor(pos / bs) + 1) * bs);
        const slice = buf.subarray(pos - a, next - a);
        if (!slice.equals(zero.subarray(0, slice.length))) {
          builder.markBytes(pos, next);
          data += next - pos;
        }
        pos = next;
      }
    });
  }
  return data;
}

export type VolumeMapper = (reader: BlockReader, name: string) => Promise<{ map: UsedBlockMap; node: LayoutNode }>;

export async function readPartitionedDisk(reader: BlockReader, table: PartitionTable, name: string, readVolume: VolumeMapper): Promise<UsedBlockMap> {
  const size = reader.size;
  const parts = table.partitions;
  // Which partitions are LVM PVs: their volume groups are settled before anything is marked.
  const pvInputs: PvInput[] = [];
  const pvOf = new Map<Partition, PvInput>();
  for (const p of parts) {
    const slice = new SliceReader(reader, p.offset, p.size);
    if (await probeLvm(slice)) {
      const input = { where: partitionName(p), reader: slice, offset: p.offset };
      pvInputs.push(input);
      pvOf.set(p, input);
    }
  }
  const plan = await scanPvs(pvInputs);
  const boundaries = [...parts.flatMap((p) => [p.offset, p.offset + p.size]), ...plan.boundaries()];
  const bs = chooseBlockSize(boundaries);
  const builder = new MapBuilder(size, bs);
  const root = layoutNode({ kind: 'device', name, content: table.kind, size, usedBytes: 0, notes: [...table.notes] });
  root.notes.unshift(`${table.kind.toUpperCase()}, ${parts.length} partition${parts.length === 1 ? '' : 's'}, ${bs}-byte blocks (${bs === 4096 ? 'every partition and LVM boundary is 4 KiB-aligned' : 'some partition or LVM boundary is not 4 KiB-aligned'})`);

  // The tables, and what no partition covers in the first and last MiB.
  const covered: Interval[] = parts.map((p) => [p.offset, p.offset + p.size]);
  const kept = union([...subtract([[0, Math.min(MiB, size)], [Math.max(0, size - MiB), size]], covered), ...table.tableRanges]);
  for (const [a, b] of kept) builder.markBytes(a, b);
  const tablesNode = layoutNode({ kind: 'tables', name: 'partition tables and boot area', content: table.kind, offset: 0, size: total(kept), usedBytes: total(kept),
    notes: ['the tables, and the parts of the first and last MiB no partition covers (boot loaders live there): copied'] });
  const children: LayoutNode[] = [tablesNode];

  // Each partition's contents, at its offset.
  const pvNodes = new Map<Partition, LayoutNode>();
  if (pvInputs.length) {
    const nodes = await plan.mark(builder, readVolume);
    pvInputs.forEach((input, i) => {
      const p = [...pvOf].find(([, v]) => v === input)![0];
      pvNodes.set(p, nodes[i]!);
    });
  }
  const partNodes = new Map<Partition, LayoutNode>();
  for (const p of parts) {
    const pname = partitionName(p);
    const pv = pvNodes.get(p);
    if (pv) {
      const node = layoutNode({ kind: 'partition', name: pname, content: 'lvm2', offset: p.offset, size: p.size, usedBytes: pv.usedBytes, allBlocks: pv.allBlocks, notes: pv.notes, children: pv.children });
      if (pv.name !== 'LVM physical volume') node.notes.unshift(pv.name);
      partNodes.set(p, node);
      continue;
    }
    const { map, node } = await readVolume(new SliceReader(reader, p.offset, p.size), pname);
    builder.markVolume(map, p.offset, p.size);
    node.kind = 'partition';
    node.offset = p.offset;
    if (map.filesystem === 'unknown') node.notes.unshift(`type ${p.typeName}: contents unknown, copied whole`);
    partNodes.set(p, node);
  }

  // Gaps between partitions: scanned, and copied where they hold anything but zeros.
  const gaps = subtract([[0, size]], [...covered, ...kept]);
  let zeroGaps = 0, zeroBytes = 0;
  const gapNodes: LayoutNode[] = [];
  for (const [a, b] of gaps) {
    const data = await scanGap(reader, builder, a, b);
    if (data === 0 && b - a < MiB) { zeroGaps++; zeroBytes += b - a; continue; }
    gapNodes.push(layoutNode({
      kind: 'gap', name: 'gap', content: data ? 'data' : 'zeros', offset: a, size: b - a, usedBytes: builder.usedBytes(a, b),
      notes: [data ? `${formatBytes(data)} of it hold data (boot code, or what an old partition left): copied` : 'reads as zeros: left as a hole'],
    }));
  }
  if (zeroGaps) root.notes.push(`${zeroGaps} small gap${zeroGaps === 1 ? '' : 's'} between partitions (${formatBytes(zeroBytes)}) read as zeros: left as holes`);

  // The tree in disk order: tables first, then partitions and gaps by offset.
  const ordered = [...parts.map((p) => partNodes.get(p)!), ...gapNodes].sort((x, y) => x.offset! - y.offset!);
  children.push(...ordered);
  root.children = children;
  const used = builder.bitmap.count();
  root.usedBytes = Math.min(used * bs, size);
  return { filesystem: table.kind, blockSize: bs, totalBlocks: builder.totalBlocks, usedBlocks: used, bitmap: builder.bitmap, notes: collectNotes(root), allBlocks: false, layout: root };
}
