// The protection map (seed 003): blocks the user does not want in a backup. File patterns under the
// mounted file system (--exclude, repeatable) and swap files (--exclude-swap, on by default: active
// ones from /proc/swaps, and files near the top whose first page ends in a swap signature) are
// resolved to device blocks with FIEMAP. Extents are read before and after the instant and only
// blocks in both are excluded, so a block that moved to a wanted file around the instant is kept.
// The file system must start at byte 0 of the volume (FIEMAP's physical offsets are relative to it).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileExtents } from '../device/fsctl';
import { Bitset } from '../util/bitset';
import { UserError } from '../util/errors';

export interface ProtectionSpec {
  /** Where the volume's file system is mounted (--freeze or --mount). */
  mount?: string;
  /** --exclude PATTERN: relative to the mount point; "*" within a name, "**" any depth, "?" one character. */
  patterns: string[];
  /** --exclude-swap (default on). */
  excludeSwap: boolean;
}

export interface Excluded {
  /** Files whose blocks were left out, relative to the mount point. */
  files: string[];
  extents: Float64Array[];
}

const SWAP_SIGNATURES = ['SWAPSPACE2', 'SWAP-SPACE'];
const MAX_FILES = 1_000_000;

/** A glob as a regular expression over '/'-separated relative paths. */
export function globToRegExp(glob: string): RegExp {
  if (glob === '' || glob.includes('\0')) throw new UserError(`--exclude "${glob}": an empty pattern`, 'e.g. --exclude "tmp/**" or --exclude "*.tmp"');
  const g = glob.replace(/^\/+/, '');
  let re = '';
  for (let i = 0; i < g.length; i++) {
    const c = g[i]!;
    if (c === '*' && g[i + 1] === '*') {
      i++;
      if (g[i + 1] === '/') { i++; re += '(?:.*/)?'; } else re += '.*';
    } else if (c === '*') re += '[^/]*';
    else if (c === '?') re += '[^/]';
    else re += c.replace(/[.+^${}()|[\]\\]/g, '\\$&');
  }
  // A pattern without a slash matches a name at any depth (as tar and rsync do).
  return new RegExp(g.includes('/') ? `^${re}(?:/.*)?$` : `(?:^|/)${re}(?:/.*)?$`);
}

/** Checks the spec's patterns (the CLI and the daemon both call it). */
export function checkProtection(spec: ProtectionSpec): void {
  for (const p of spec.patterns) globToRegExp(p);
  if (spec.patterns.length && !spec.mount) throw new UserError('--exclude needs the mounted file system: give --freeze MOUNTPOINT or --mount MOUNTPOINT', 'e.g. --mount /srv/data --exclude "tmp/**"');
}

async function activeSwapFiles(): Promise<string[]> {
  const text = await fs.promises.readFile('/proc/swaps', 'utf8').catch(() => '');
  return text.split('\n').slice(1).map((l) => l.split(/\s+/)).filter((f) => f[1] === 'file').map((f) => f[0]!.replace(/\\040/g, ' '));
}

async function hasSwapSignature(file: string, size: number): Promise<boolean> {
  if (size < 40960) return false;
  const fh = await fs.promises.open(file, 'r').catch(() => undefined);
  if (!fh) return false;
  try {
    const b = Buffer.alloc(10);
    for (const page of [4096, 8192, 16384, 65536]) {
      if (page > size) break;
      await fh.read(b, 0, 10, page - 10);
      if (SWAP_SIGNATURES.some((s) => b.toString('latin1').startsWith(s))) return true;
    }
    return false;
  } finally { await fh.close(); }
}

/** The files the spec excludes, with their extents now (fdatasync'd first by FIEMAP_FLAG_SYNC unless `sync` is false). */
export async function resolveExcluded(spec: ProtectionSpec, sync: boolean): Promise<Excluded> {
  const out: Excluded = { files: [], extents: [] };
  if (!spec.mount) return out;
  const root = path.resolve(spec.mount);
  const rootDev = (await fs.promises.stat(root)).dev;
  const res = spec.patterns.map(globToRegExp);
  const picked = new Set<string>();
  if (spec.excludeSwap) {
    for (const f of await activeSwapFiles()) if (f.startsWith(root + '/')) picked.add(path.relative(root, f));
  }
  // One walk of the file system (not into other mounts): pattern matches, and swap files near the top.
  let seen = 0;
  const walk = async (rel: string, depth: number): Promise<void> => {
    const dir = path.join(root, rel);
    const names = await fs.promises.readdir(dir).catch(() => [] as string[]);
    for (const n of names) {
      if (++seen > MAX_FILES) throw new UserError(`--exclude: more than ${MAX_FILES} files under ${root}`, 'exclude whole directories with fewer, broader patterns');
      const r = rel ? `${rel}/${n}` : n;
      const st = await fs.promises.lstat(path.join(root, r)).catch(() => undefined);
      if (!st || st.dev !== rootDev) continue;
      if (st.isDirectory()) { await walk(r, depth + 1); continue; }
      if (!st.isFile()) continue;
      if (res.some((re) => re.test(r))) picked.add(r);
      else if (spec.excludeSwap && depth <= 1 && await hasSwapSignature(path.join(root, r), st.size)) picked.add(r);
    }
  };
  if (res.length || spec.excludeSwap) await walk('', 0);
  for (const r of [...picked].sort()) {
    const ext = await fileExtents(path.join(root, r), sync).catch(() => undefined);
    if (!ext) continue;
    out.files.push(r);
    out.extents.push(ext);
  }
  return out;
}

// FIEMAP extent flags that make the physical offset meaningless for a block backup.
const FIEMAP_EXTENT_UNKNOWN = 0x2, FIEMAP_EXTENT_DELALLOC = 0x4, FIEMAP_EXTENT_ENCODED = 0x8, FIEMAP_EXTENT_NOT_ALIGNED = 0x100, FIEMAP_EXTENT_DATA_INLINE = 0x200, FIEMAP_EXTENT_SHARED = 0x2000;
const SKIP = [FIEMAP_EXTENT_UNKNOWN, FIEMAP_EXTENT_DELALLOC, FIEMAP_EXTENT_ENCODED, FIEMAP_EXTENT_NOT_ALIGNED, FIEMAP_EXTENT_DATA_INLINE, FIEMAP_EXTENT_SHARED];

/** Whole blocks (of `blockSize`) inside the files' extents. Shared (reflinked) extents are kept. */
export function excludedBlockSet(ex: Excluded, blockSize: number, totalBlocks: number): Bitset {
  const b = new Bitset(totalBlocks);
  for (const e of ex.extents) {
    for (let i = 0; i + 3 < e.length; i += 4) {
      const phys = e[i + 1]!, len = e[i + 2]!, flags = e[i + 3]!;
      if (SKIP.some((f) => Math.floor(flags / f) % 2 === 1)) continue;
      const first = Math.ceil(phys / blockSize), end = Math.min(totalBlocks, Math.floor((phys + len) / blockSize));
      if (end > first) b.setRange(first, end);
    }
  }
  return b;
}
