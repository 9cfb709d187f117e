// Real volumes for tests: a sparse file, a file system made by the real mkfs, files written through
// a real mount (so allocation is the kernel's), some deleted so free space is fragmented.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { checksumTree } from '../../src/util/checksum-tree';
import { loopDevice, mount, rng, run, runStatus, sparseFile } from './system';

export interface TestVolume {
  file: string;
  loop: string;
  /** sha256 of each file (relative path) that exists after the deletions. */
  checksums: Map<string, string>;
}

export { checksumTree };

export function fillTree(root: string, seed: number, bytes: number): void {
  const r = rng(seed);
  let written = 0, n = 0;
  while (written < bytes) {
    const size = Math.min(bytes - written, 1 + Math.floor(r() * 400_000));
    const dir = path.join(root, `d${n % 7}`);
    fs.mkdirSync(dir, { recursive: true });
    const b = Buffer.alloc(size);
    for (let i = 0; i + 4 <= size; i += 4096) b.writeUInt32LE(Math.floor(r() * 2 ** 32), i);
    b.write(`file ${n} seed ${seed}`);
    fs.writeFileSync(path.join(dir, `f${n}`), b);
    written += size;
    n++;
  }
  for (let i = 0; i < n; i += 3) fs.rmSync(path.join(root, `d${i % 7}`, `f${i}`));
}

/** An unmounted volume on a loop device with a file system and files (mkfs args e.g. ['-t','ext4']). */
export function makeVolume(t: ExecutionContext, dir: string, opts: { sizeMiB: number; mkfs: string[]; seed: number; dataMiB: number; keepMounted?: boolean }): TestVolume & { mnt?: string } {
  const file = sparseFile(path.join(dir, 'vol.img'), opts.sizeMiB << 20);
  const loop = loopDevice(t, file);
  run(opts.mkfs[0]!, [...opts.mkfs.slice(1), loop]);
  const mnt = mount(t, loop, path.join(dir, 'mnt'));
  fillTree(mnt, opts.seed, opts.dataMiB << 20);
  run('sync', ['-f', mnt]);
  const checksums = checksumTree(mnt);
  if (!opts.keepMounted) run('umount', [mnt]);
  return { file, loop, checksums, mnt: opts.keepMounted ? mnt : undefined };
}

/** Mounts an image read-only through a fresh loop device and returns its files' checksums. */
export function checksumsOfImage(t: ExecutionContext, image: string, dir: string): Map<string, string> {
  const loop = loopDevice(t, image, { readOnly: true });
  const mnt = mount(t, loop, dir, ['ro']);
  const sums = checksumTree(mnt);
  runStatus('umount', [mnt]);
  return sums;
}
