// Whole disks for tests, made by the real tools: sfdisk writes the table, each partition gets its
// file system from its own mkfs through a loop device at the partition's offset (losetup -o
// --sizelimit: loop devices here have no partition nodes), and files are written by the kernel
// (ext4, xfs, btrfs), by ntfs-3g (FUSE) or by mtools (FAT: no vfat module here).
//
// LVM without device-mapper: pvcreate / vgcreate / lvcreate run with "--driverloaded n" (LVM
// writes its metadata, never activates), "--devices" (LVM looks at our loop devices only) and
// backups off (nothing under /etc/lvm). An LV's contents are made in a sparse image of the LV's
// size (mkfs + mount + files, as for any volume), then scattered onto the PVs by the segment map
// LVM itself reports (lvs seg_pe_ranges, stripes, stripe_size; pvs pe_start): this works for
// linear, multi-segment and striped LVs alike. Verifying gathers the LV back the same way.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { checksumTree } from '../../src/util/checksum-tree';
import { fillTree } from './volumes';
import { mount, rng, run, runStatus, sparseFile } from './system';

const MiB = 1 << 20;
export type PartFs = 'ext4' | 'xfs' | 'btrfs' | 'ntfs' | 'fat' | 'swap' | 'lvm' | 'raw' | 'gap';

export interface PartSpec {
  fs: PartFs;
  sizeMiB: number;
  dataMiB?: number;
  /** MBR only: a primary partition starting at this sector (e.g. 63, the old DOS alignment). */
  startSector?: number;
  /** fat: 12, 16 or 32 (default: mkfs.vfat's choice). */
  fatBits?: 12 | 16 | 32;
  /** gap: the partition is made, `dataMiB` of seeded bytes written at its start, then deleted (GPT). */
}

export interface LvSpec {
  name: string;
  fs: 'ext4' | 'xfs' | 'btrfs';
  sizeMiB: number;
  dataMiB: number;
  /** Striped over this many PVs (stripe size 64 KiB). */
  stripes?: number;
  /** Grown in a second step after another LV was placed behind it: two segments. */
  twoSegments?: boolean;
}

export interface DiskSpec {
  /** none: no partition table; the one part (a PV or a file system) is the whole device. */
  label: 'gpt' | 'dos' | 'none';
  sizeMiB: number;
  /** dos: partitions after the first `primaries` go into an extended partition as logicals. */
  primaries?: number;
  parts: PartSpec[];
  lvs?: LvSpec[];
  seed: number;
}

export interface BuiltPart {
  number: number;
  offset: number;
  size: number;
  fs: PartFs;
  checksums?: Map<string, string>;
}

export interface LvPiece {
  lvOffset: number;
  diskOffset: number;
  length: number;
}

export interface BuiltLv {
  name: string;
  fs: LvSpec['fs'];
  size: number;
  pieces: LvPiece[];
  segments: number;
  stripes: number;
  checksums: Map<string, string>;
}

export interface BuiltDisk {
  file: string;
  size: number;
  label: DiskSpec['label'];
  parts: BuiltPart[];
  lvs: BuiltLv[];
  vg?: string;
  /** Deleted partitions: gaps that hold data. */
  gaps: BuiltPart[];
}

const LVM_ENV = { ...process.env, LVM_SUPPRESS_FD_WARNINGS: '1' };
const LVM_CONFIG = 'backup { backup = 0 archive = 0 } activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 }';

export function lvm(cmd: string, devices: string[], args: string[]): string {
  const r = runStatus(cmd, ['--driverloaded', 'n', '--devices', devices.join(','), '--config', LVM_CONFIG, ...args], { env: LVM_ENV });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

/** Attaches [offset, offset+size) of `file` to a loop device; detached at teardown (and by `detach`). */
export function loopAt(t: ExecutionContext, file: string, offset: number, size: number, opts: { readOnly?: boolean } = {}): { dev: string; detach: () => void } {
  let dev = '';
  for (let attempt = 0; attempt < 5 && !dev; attempt++) {
    const r = runStatus('losetup', ['-f', '--show', ...(opts.readOnly ? ['-r'] : []), '-o', String(offset), '--sizelimit', String(size), file]);
    if (r.status === 0) dev = r.stdout.trim();
  }
  if (!dev) throw new Error(`losetup could not attach ${file} at ${offset}`);
  let attached = true;
  const detach = () => {
    if (!attached) return;
    attached = false;
    for (let i = 0; i < 20 && runStatus('losetup', ['-d', dev]).status !== 0; i++) run('sleep', ['0.1']);
  };
  t.teardown(detach);
  return { dev, detach };
}

/** Unmounts `dir` (FUSE or kernel) and waits until the mount is gone. */
function unmount(dir: string): void {
  run('umount', [dir]);
  for (let i = 0; i < 50 && runStatus('mountpoint', ['-q', dir]).status === 0; i++) run('sleep', ['0.1']);
}

const MTOOLS_ENV = { ...process.env, MTOOLS_SKIP_CHECK: '1' };

/** Makes a file system on `dev` and fills it; returns its files' checksums (none for swap/raw). */
export function makeFs(t: ExecutionContext, dev: string, kind: Exclude<PartFs, 'lvm'>, dir: string, seed: number, dataMiB: number, opts: { fatBits?: 12 | 16 | 32 } = {}): Map<string, string> | undefined {
  fs.mkdirSync(dir, { recursive: true });
  if (kind === 'swap') { run('mkswap', ['-q', dev]); return undefined; }
  if (kind === 'raw' || kind === 'gap') {
    // Not a file system: a few MiB of seeded bytes at the start, so "unknown" can be told from "zeros".
    const r = rng(seed);
    const b = Buffer.alloc(dataMiB * MiB);
    for (let i = 0; i < b.length; i += 4) b.writeUInt32LE(Math.floor(r() * 2 ** 32), i);
    const fd = fs.openSync(dev, 'r+');
    try { fs.writeSync(fd, b, 0, b.length, 0); } finally { fs.closeSync(fd); }
    return undefined;
  }
  if (kind === 'fat') {
    run('mkfs.vfat', [...(opts.fatBits ? ['-F', String(opts.fatBits)] : []), dev]);
    const src = path.join(dir, 'src');
    fs.mkdirSync(src);
    fillTree(src, seed, dataMiB * MiB);
    const tops = fs.readdirSync(src).map((d) => path.join(src, d));
    if (tops.length) run('mcopy', ['-s', '-Q', '-i', dev, ...tops, '::/'], { env: MTOOLS_ENV });
    const sums = checksumTree(src);
    fs.rmSync(src, { recursive: true, force: true });
    return sums;
  }
  const mnt = path.join(dir, 'mnt');
  if (kind === 'ntfs') {
    run('mkfs.ntfs', ['-q', '-f', dev]);
    fs.mkdirSync(mnt, { recursive: true });
    run('ntfs-3g', [dev, mnt]);
  } else {
    if (kind === 'ext4') run('mkfs.ext4', ['-q', '-F', dev]);
    if (kind === 'xfs') run('mkfs.xfs', ['-q', '-f', dev]);
    if (kind === 'btrfs') run('mkfs.btrfs', ['-q', '-f', dev]);
    mount(t, dev, mnt);
  }
  try {
    fillTree(mnt, seed, dataMiB * MiB);
    run('sync', ['-f', mnt]);
    return checksumTree(mnt);
  } finally {
    unmount(mnt);
  }
}

/** The checksums of the files of a file system on `dev`, read-only (FAT through mtools). */
export function readFsChecksums(t: ExecutionContext, dev: string, kind: 'ext4' | 'xfs' | 'btrfs' | 'ntfs' | 'fat', dir: string): Map<string, string> {
  fs.mkdirSync(dir, { recursive: true });
  if (kind === 'fat') {
    const out = path.join(dir, 'out');
    fs.mkdirSync(out);
    const list = runStatus('mdir', ['-b', '-i', dev, '::/'], { env: MTOOLS_ENV }).stdout.trim().split('\n').filter(Boolean);
    if (list.length) run('mcopy', ['-s', '-Q', '-n', '-i', dev, ...list.map((l) => l.replace(/\/$/, '')), out], { env: MTOOLS_ENV });
    const sums = checksumTree(out);
    fs.rmSync(out, { recursive: true, force: true });
    return sums;
  }
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt, { recursive: true });
  if (kind === 'ntfs') run('ntfs-3g', ['-o', 'ro', dev, mnt]);
  else if (kind === 'btrfs') { runStatus('btrfs', ['device', 'scan', '--forget']); run('mount', ['-o', 'ro', dev, mnt]); }
  else run('mount', ['-o', kind === 'xfs' ? 'ro,norecovery' : 'ro,noload', dev, mnt]);
  try {
    return checksumTree(mnt);
  } finally {
    unmount(mnt);
  }
}

/** The file system's own checker, read-only: returns undefined when clean, else its output. */
export function fsck(dev: string, kind: 'ext4' | 'xfs' | 'btrfs' | 'ntfs' | 'fat'): string | undefined {
  const cmd: Record<typeof kind, [string, string[]]> = {
    ext4: ['e2fsck', ['-fn', dev]],
    xfs: ['xfs_repair', ['-n', dev]],
    btrfs: ['btrfs', ['check', '--readonly', dev]],
    ntfs: ['ntfsfix', ['-n', dev]],
    fat: ['fsck.fat', ['-n', dev]],
  };
  const [c, a] = cmd[kind];
  const r = runStatus(c, a);
  if (r.status !== 0) return `${c} exit ${r.status}: ${r.stdout}\n${r.stderr}`.slice(0, 4000);
  if (kind === 'fat' && /\bbad\b|differ|corrupt|free cluster summary wrong/i.test(r.stdout)) return `fsck.fat: ${r.stdout}`;
  return undefined;
}

const GPT_TYPE: Record<PartFs, string> = {
  ext4: 'linux', xfs: 'linux', btrfs: 'linux', raw: '8DA63339-0007-60C0-C436-083AC8230908', gap: 'linux', swap: 'swap', lvm: 'lvm', fat: 'uefi',
  ntfs: 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7',
};
const DOS_TYPE: Record<PartFs, string> = { ext4: '83', xfs: '83', btrfs: '83', raw: 'da', gap: '83', swap: '82', lvm: '8e', fat: 'c', ntfs: '7' };

interface LvSegmentReport { start: number; count: number; stripes: number; stripeSize: number; ranges: Array<{ dev: string; first: number; last: number }> }

/** The segment map LVM reports for `lv` (extents, stripes, PV ranges), as the test's own truth. */
function lvSegments(devices: string[], vg: string, lv: string): LvSegmentReport[] {
  const j = JSON.parse(lvm('lvs', devices, ['--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', 'lv_name,seg_start_pe,seg_size_pe,stripes,stripe_size,seg_pe_ranges', `${vg}/${lv}`])) as { report: Array<{ lv: Array<Record<string, string>> }> };
  return j.report[0]!.lv.map((r) => ({
    start: Number(r.seg_start_pe),
    count: Number(r.seg_size_pe),
    stripes: Number(r.stripes),
    stripeSize: Number(r.stripe_size),
    ranges: r.seg_pe_ranges!.trim().split(/\s+/).map((s) => {
      const m = /^(.*):(\d+)-(\d+)$/.exec(s)!;
      return { dev: m[1]!, first: Number(m[2]), last: Number(m[3]) };
    }),
  }));
}

/** LV bytes -> disk bytes, in LV order, from LVM's report (64 KiB granularity for stripes). */
function lvPieces(segs: LvSegmentReport[], extent: number, pvDisk: Map<string, number>): LvPiece[] {
  const out: LvPiece[] = [];
  const push = (lvOffset: number, diskOffset: number, length: number) => {
    const last = out[out.length - 1];
    if (last && last.lvOffset + last.length === lvOffset && last.diskOffset + last.length === diskOffset) last.length += length;
    else out.push({ lvOffset, diskOffset, length });
  };
  for (const s of segs) {
    const segBytes = s.count * extent;
    const base = s.start * extent;
    if (s.stripes === 1) {
      const r = s.ranges[0]!;
      push(base, pvDisk.get(r.dev)! + r.first * extent, segBytes);
      continue;
    }
    const ss = s.stripeSize;
    for (let rel = 0; rel < segBytes; rel += ss) {
      const chunk = rel / ss;
      const r = s.ranges[chunk % s.stripes]!;
      push(base + rel, pvDisk.get(r.dev)! + r.first * extent + Math.floor(chunk / s.stripes) * ss, ss);
    }
  }
  return out;
}

/** Copies an LV image onto the disk by its pieces, skipping all-zero 64 KiB chunks (stays sparse). */
function scatter(image: string, disk: string, pieces: LvPiece[]): void {
  const src = fs.openSync(image, 'r');
  const dst = fs.openSync(disk, 'r+');
  const buf = Buffer.alloc(MiB);
  const zero = Buffer.alloc(64 << 10);
  try {
    for (const p of pieces) {
      for (let o = 0; o < p.length; o += buf.length) {
        const n = Math.min(buf.length, p.length - o);
        fs.readSync(src, buf, 0, n, p.lvOffset + o);
        for (let k = 0; k < n; k += zero.length) {
          const m = Math.min(zero.length, n - k);
          if (!buf.subarray(k, k + m).equals(zero.subarray(0, m))) fs.writeSync(dst, buf, k, m, p.diskOffset + o + k);
        }
      }
    }
  } finally {
    fs.closeSync(src);
    fs.closeSync(dst);
  }
}

/** Assembles an LV from a disk image by its pieces into `out` (a sparse file). */
export function gatherLv(disk: string, lv: BuiltLv, out: string): string {
  sparseFile(out, lv.size);
  const src = fs.openSync(disk, 'r');
  const dst = fs.openSync(out, 'r+');
  const buf = Buffer.alloc(MiB);
  const zero = Buffer.alloc(MiB);
  try {
    for (const p of lv.pieces) {
      for (let o = 0; o < p.length; o += buf.length) {
        const n = Math.min(buf.length, p.length - o);
        fs.readSync(src, buf, 0, n, p.diskOffset + o);
        if (!buf.subarray(0, n).equals(zero.subarray(0, n))) fs.writeSync(dst, buf, 0, n, p.lvOffset + o);
      }
    }
  } finally {
    fs.closeSync(src);
    fs.closeSync(dst);
  }
  return out;
}

interface SfdiskPart { node: string; start: number; size: number; type: string }

export function partitionsOf(file: string): Array<{ number: number; offset: number; size: number; type: string }> {
  const j = JSON.parse(run('sfdisk', ['-J', file])) as { partitiontable: { sectorsize?: number; partitions: SfdiskPart[] } };
  const ss = j.partitiontable.sectorsize ?? 512;
  return j.partitiontable.partitions.map((p) => ({ number: Number(/(\d+)$/.exec(p.node)![1]), offset: p.start * ss, size: p.size * ss, type: p.type }));
}

/** Builds the disk: table, file systems, LVM; every loop device is detached before it returns. */
export function makeDisk(t: ExecutionContext, dir: string, spec: DiskSpec): BuiltDisk {
  const file = sparseFile(path.join(dir, 'disk.img'), spec.sizeMiB * MiB);
  const lines = [`label: ${spec.label}`];
  const primaries = spec.primaries ?? 4;
  spec.parts.forEach((p, i) => {
    if (spec.label === 'dos' && i === primaries && spec.parts.length > primaries) lines.push('type=5');
    const start = p.startSector !== undefined ? `start=${p.startSector}, ` : '';
    lines.push(`${start}size=${p.sizeMiB}M, type=${spec.label === 'gpt' ? GPT_TYPE[p.fs] : DOS_TYPE[p.fs]}`);
  });
  let table: Array<{ number: number; offset: number; size: number; type: string }>;
  if (spec.label === 'none') {
    table = [{ number: 0, offset: 0, size: spec.sizeMiB * MiB, type: '' }];
  } else {
    run('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', file], { input: lines.join('\n') + '\n' });
    table = partitionsOf(file).filter((p) => !['5', 'f', '85'].includes(p.type));
  }
  if (table.length !== spec.parts.length) throw new Error(`sfdisk made ${table.length} partitions, ${spec.parts.length} asked`);
  const parts: BuiltPart[] = [];
  const pvLoops: Array<{ dev: string; offset: number; detach: () => void }> = [];
  table.forEach((tp, i) => {
    const p = spec.parts[i]!;
    const part: BuiltPart = { number: tp.number, offset: tp.offset, size: tp.size, fs: p.fs };
    parts.push(part);
    const loop = loopAt(t, file, tp.offset, tp.size);
    if (p.fs === 'lvm') { pvLoops.push({ dev: loop.dev, offset: tp.offset, detach: loop.detach }); return; }
    try {
      part.checksums = makeFs(t, loop.dev, p.fs, path.join(dir, `p${tp.number}`), spec.seed + tp.number, p.dataMiB ?? 4, { fatBits: p.fatBits });
    } finally {
      loop.detach();
    }
  });
  // Gaps: partitions that were written and then deleted from the table.
  for (const p of [...parts].reverse()) {
    if (p.fs === 'gap') run('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', '--delete', file, String(p.number)]);
  }
  const kept = parts.filter((p) => p.fs !== 'gap');
  const lvs: BuiltLv[] = [];
  let vg: string | undefined;
  if (pvLoops.length) {
    const devs = pvLoops.map((l) => l.dev);
    vg = `lstest${spec.seed % 100000}x${process.pid}`;
    lvm('pvcreate', devs, ['-q', '-y', ...devs]);
    lvm('vgcreate', devs, ['-q', vg, ...devs]);
    const extent = Number(JSON.parse(lvm('vgs', devs, ['--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', 'vg_extent_size', vg])).report[0].vg[0].vg_extent_size);
    const pvDisk = new Map<string, number>();
    const pvj = JSON.parse(lvm('pvs', devs, ['--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', 'pv_name,pe_start'])) as { report: Array<{ pv: Array<Record<string, string>> }> };
    for (const r of pvj.report[0]!.pv) pvDisk.set(r.pv_name!, pvLoops.find((l) => l.dev === r.pv_name)!.offset + Number(r.pe_start));
    const specs = spec.lvs ?? [];
    // Two-segment LVs: half now, a spacer LV behind it, the rest later (then the spacer goes: free extents between).
    for (const l of specs) {
      const stripes = l.stripes && l.stripes > 1 ? ['-i', String(l.stripes), '-I', '64k'] : [];
      lvm('lvcreate', devs, ['-q', '-an', '-Zn', '-y', '-L', `${l.twoSegments ? Math.ceil(l.sizeMiB / 2) : l.sizeMiB}M`, '-n', l.name, ...stripes, vg]);
      if (l.twoSegments) lvm('lvcreate', devs, ['-q', '-an', '-Zn', '-y', '-L', '8M', '-n', `${l.name}_spacer`, vg]);
    }
    for (const l of specs) {
      if (!l.twoSegments) continue;
      lvm('lvextend', devs, ['-q', '-L', `${l.sizeMiB}M`, `${vg}/${l.name}`]);
      lvm('lvremove', devs, ['-q', '-y', `${vg}/${l.name}_spacer`]);
    }
    for (const l of specs) {
      const segs = lvSegments(devs, vg, l.name);
      const size = segs.reduce((n, s) => n + s.count, 0) * extent;
      const pieces = lvPieces(segs, extent, pvDisk);
      const img = sparseFile(path.join(dir, `lv-${l.name}.img`), size);
      const loop = loopAt(t, img, 0, size);
      let sums: Map<string, string>;
      try {
        sums = makeFs(t, loop.dev, l.fs, path.join(dir, `lv-${l.name}`), spec.seed + 1000 + lvs.length, l.dataMiB)!;
      } finally {
        loop.detach();
      }
      scatter(img, file, pieces);
      fs.rmSync(img);
      lvs.push({ name: l.name, fs: l.fs, size, pieces, segments: segs.length, stripes: Math.max(...segs.map((s) => s.stripes)), checksums: sums });
    }
    for (const l of pvLoops) l.detach();
  }
  return { file, size: spec.sizeMiB * MiB, label: spec.label, parts: kept, lvs, vg, gaps: parts.filter((p) => p.fs === 'gap') };
}
