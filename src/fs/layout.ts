// What a device holds, as a tree: disk -> partitions (and the tables, and the gaps between them)
// -> LVM PVs -> LVs -> file systems. Each node says how much of it is copied. `inspect` prints it,
// `--json` gives it as is, and backups carry it in their summary and in the archive manifest.
import { formatBytes } from '../util/size';

export type LayoutKind =
  /** The whole device. */
  | 'device'
  /** The partition tables and what is kept with them (MBR, GPT headers and entries, EBRs). */
  | 'tables'
  | 'partition'
  /** Bytes between partitions (or before the first / after the last) that no partition covers. */
  | 'gap'
  | 'lvm-pv'
  | 'lvm-lv'
  /** PV extents that no LV uses. */
  | 'lvm-free';

export interface LayoutNode {
  kind: LayoutKind;
  /** What the user calls it: "partition 2 \"root\"", "lv vg0/home", "gap". */
  name: string;
  /** File system or container inside ("ext4", "gpt", "lvm2", "swap", "unknown", "zeros", ...). */
  content: string;
  /** Byte offset on the device (absent for an LV: its extents may be anywhere). */
  offset?: number;
  size: number;
  /** Bytes of this node the backup copies. */
  usedBytes: number;
  /** True when the node is copied whole because its contents are unknown or cannot be trusted. */
  allBlocks: boolean;
  notes: string[];
  children: LayoutNode[];
}

export function layoutNode(n: Omit<LayoutNode, 'notes' | 'children' | 'allBlocks'> & Partial<Pick<LayoutNode, 'notes' | 'children' | 'allBlocks'>>): LayoutNode {
  return { allBlocks: false, notes: [], children: [], ...n };
}

const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
const KINDS = new Set<string>(['device', 'tables', 'partition', 'gap', 'lvm-pv', 'lvm-lv', 'lvm-free']);

/** Checks the shape of a tree read back from an archive manifest; returns a reason or undefined. */
export function layoutProblem(v: unknown, depth = 0): string | undefined {
  if (depth > 16) return 'nested too deep';
  if (typeof v !== 'object' || v === null) return 'not an object';
  const o = v as Record<string, unknown>;
  if (typeof o.kind !== 'string' || !KINDS.has(o.kind)) return `unknown kind ${JSON.stringify(o.kind)}`;
  if (typeof o.name !== 'string' || typeof o.content !== 'string') return 'name or content is not a string';
  if (o.offset !== undefined && !isCount(o.offset)) return 'bad offset';
  if (!isCount(o.size) || !isCount(o.usedBytes)) return 'bad size or usedBytes';
  if (typeof o.allBlocks !== 'boolean') return 'bad allBlocks';
  if (!Array.isArray(o.notes) || !o.notes.every((n) => typeof n === 'string')) return 'bad notes';
  if (!Array.isArray(o.children)) return 'bad children';
  for (const c of o.children) {
    const p = layoutProblem(c, depth + 1);
    if (p) return p;
  }
  return undefined;
}

/** Every note of the tree, each prefixed with the node it belongs to. */
export function collectNotes(root: LayoutNode): string[] {
  const out: string[] = [];
  const walk = (n: LayoutNode, top: boolean) => {
    for (const note of n.notes) out.push(top ? note : `${n.name} (${n.content}): ${note}`);
    for (const c of n.children) walk(c, false);
  };
  walk(root, true);
  return out;
}

function pct(used: number, size: number): string {
  return size > 0 ? `${((100 * used) / size).toFixed(1)}%` : '-';
}

/**
 * The tree as text lines, one node a line (notes indented under it when `notes`):
 *   disk.img  gpt  4.00 GiB, copy 1.20 GiB (30.0%)
 *   ├─ partition 1 "EFI"  fat32  256 MiB, copy 1.20 MiB (0.5%)
 */
export function formatLayout(root: LayoutNode, opts: { notes?: boolean } = {}): string[] {
  const out: string[] = [];
  const walk = (n: LayoutNode, prefix: string, last: boolean, top: boolean) => {
    const head = top ? '' : `${prefix}${last ? '└─ ' : '├─ '}`;
    const where = n.offset !== undefined && !top ? ` at ${formatBytes(n.offset)}` : '';
    const whole = n.allBlocks ? ', copied whole' : '';
    out.push(`${head}${n.name}  ${n.content}  ${formatBytes(n.size)}${where}, copy ${formatBytes(n.usedBytes)} (${pct(n.usedBytes, n.size)})${whole}`);
    const childPrefix = top ? '' : `${prefix}${last ? '   ' : '│  '}`;
    if (opts.notes) for (const note of n.notes) out.push(`${childPrefix}${n.children.length ? '│ ' : '  '} note: ${note}`);
    n.children.forEach((c, i) => walk(c, childPrefix, i === n.children.length - 1, false));
  };
  walk(root, '', true, true);
  return out;
}

/** Lines for a backup's closing summary: the tree of a disk (nothing for a single file system). */
export function layoutSummaryLines(layout: LayoutNode | undefined): string[] {
  if (!layout || layout.children.length === 0) return [];
  return ['  layout', ...formatLayout(layout).map((l) => `    ${l}`)];
}
