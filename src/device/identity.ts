// What storage a path reaches, so that two paths naming the same bytes are known to be the same:
// through symlinks and hard links (device and inode), a loop device and its backing file (both
// ways), and a partition and its whole disk. Every lookup runs on the thread pool (fs.promises):
// a path may lie on a file system this process itself serves, and a blocking stat there would wait
// for a request only this thread can answer.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { native } from './native';

export interface Identity {
  /** The path as given. */
  readonly path: string;
  /** What the path itself is. */
  readonly kind: 'file' | 'block' | 'other' | 'missing';
  /** Regular files reached, as "dev:ino" (the file itself, or a loop device's backing file). */
  readonly files: ReadonlyArray<string>;
  /** Block devices reached, as "major:minor" (the device itself, or loop devices over the file). */
  readonly devices: ReadonlyArray<string>;
  /** Whole disks that contain one of `devices` (a partition's disk). */
  readonly disks: ReadonlyArray<string>;
  /** Paths to probe for a served export's lock: the path itself and the other ends of its loops. */
  readonly lockPaths: ReadonlyArray<string>;
}

const majMin = (rdev: number): string => {
  // The kernel's new_encode_dev layout, in plain arithmetic (rdev may exceed 32 bits).
  const major = Math.floor(rdev / 256) % 4096;
  const minor = (rdev % 256) + Math.floor(rdev / 1048576) * 256;
  return `${major}:${minor}`;
};

async function readSys(p: string): Promise<string | undefined> {
  try { return (await fs.promises.readFile(p, 'utf8')).trim(); } catch { return undefined; }
}

/** Loop devices whose backing file is (dev, ino), as "major:minor" and their /dev paths. */
async function loopsBacking(dev: number, ino: number): Promise<Array<{ id: string; node: string }>> {
  let names: string[] = [];
  try { names = (await fs.promises.readdir('/sys/block')).filter((n) => n.startsWith('loop')); } catch { return []; }
  const out: Array<{ id: string; node: string }> = [];
  for (const n of names) {
    const backing = await readSys(`/sys/block/${n}/loop/backing_file`);
    if (!backing) continue;
    try {
      const st = await fs.promises.stat(backing.replace(/ \(deleted\)$/, ''));
      if (st.dev === dev && st.ino === ino) out.push({ id: (await readSys(`/sys/block/${n}/dev`)) ?? '', node: `/dev/${n}` });
    } catch { /* backing file gone */ }
  }
  return out.filter((l) => l.id);
}

/** Resolves what `p` reaches; a path that does not exist reaches nothing (empty lists). */
export async function identify(p: string): Promise<Identity> {
  const files: string[] = [], devices: string[] = [], disks: string[] = [], lockPaths: string[] = [];
  let st: fs.Stats;
  try { st = await fs.promises.stat(p); } catch { return { path: p, kind: 'missing', files, devices, disks, lockPaths }; }
  lockPaths.push(p);
  if (st.isFile()) {
    files.push(`${st.dev}:${st.ino}`);
    for (const l of await loopsBacking(st.dev, st.ino)) { devices.push(l.id); lockPaths.push(l.node); }
  } else if (st.isBlockDevice()) {
    const id = majMin(st.rdev);
    devices.push(id);
    const sys = `/sys/dev/block/${id}`;
    const backing = await readSys(`${sys}/loop/backing_file`);
    if (backing) {
      const file = backing.replace(/ \(deleted\)$/, '');
      try { const b = await fs.promises.stat(file); files.push(`${b.dev}:${b.ino}`); lockPaths.push(file); } catch { /* deleted */ }
    }
    if ((await readSys(`${sys}/partition`)) !== undefined) {
      try {
        const parent = await readSys(path.join(await fs.promises.realpath(sys), '..', 'dev'));
        if (parent) disks.push(parent);
      } catch { /* no parent */ }
    }
  }
  return { path: p, kind: st.isFile() ? 'file' : st.isBlockDevice() ? 'block' : 'other', files, devices, disks, lockPaths };
}

/** Why `a` and `b` name overlapping storage, or undefined when they do not. */
export function overlap(a: Identity, b: Identity): string | undefined {
  const shared = (x: ReadonlyArray<string>, y: ReadonlyArray<string>) => x.find((v) => y.includes(v));
  if (shared(a.files, b.files)) return 'the same file (through a link or a loop device)';
  if (shared(a.devices, b.devices)) return 'the same block device';
  if (shared(a.devices, b.disks) || shared(b.devices, a.disks)) return 'a disk and one of its partitions';
  return undefined;
}

/**
 * The first of `id`'s paths that a served export holds locked (its device, or the backing file of a
 * served loop device), or undefined. Probes with a shared lock, so only an exclusive holder counts.
 */
export async function lockedPath(id: Identity): Promise<string | undefined> {
  for (const p of id.lockPaths) {
    let fd: number;
    try { fd = await native().openAsync(p, { write: false, direct: false }); } catch { continue; }
    try {
      if (!native().lock(fd, 'shared')) return p;
    } finally {
      native().close(fd);
    }
  }
  return undefined;
}
