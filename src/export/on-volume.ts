// Is a path, or a mount point, on a given volume? Device numbers cannot follow every stack (a file
// system mounted from a loop device over nbdfuse over our own NBD socket), so the question is
// answered by the file systems themselves: the superblock of the device holding the path against
// the superblock of the volume. Everything runs on the thread pool: the path may be on a file
// system this process serves.
import * as fs from 'node:fs';
import { Device, type BlockReader } from '../device/device';
import { fsFingerprint } from '../fs/fingerprint';
import { readMounts } from '../util/mounts';

/** The /dev node of block device "major:minor", if the kernel names one. */
async function devNode(majMin: string): Promise<string | undefined> {
  try {
    const uevent = await fs.promises.readFile(`/sys/dev/block/${majMin}/uevent`, 'utf8');
    const m = /^DEVNAME=(.+)$/m.exec(uevent);
    return m ? `/dev/${m[1]}` : undefined;
  } catch { return undefined; }
}

const majMinOf = (dev: number) => `${Math.floor(dev / 256) % 4096}:${(dev % 256) + Math.floor(dev / 1048576) * 256}`;

/** The block device holding the file system that `p` (or, when it does not exist yet, its directory) is on. */
export async function deviceHolding(p: string): Promise<string | undefined> {
  let st: fs.Stats | undefined;
  for (let q = p; ; q = q.replace(/\/[^/]*$/, '') || '/') {
    st = await fs.promises.stat(q).catch(() => undefined);
    if (st || q === '/') break;
  }
  if (!st) return undefined;
  const id = majMinOf(st.dev);
  const node = await devNode(id);
  if (node) return node;
  // btrfs and others report an anonymous device: the mount table names the real one.
  const m = readMounts().reverse().find((e) => `${e.major}:${e.minor}` === id && e.source.startsWith('/dev/'));
  return m?.source;
}

/** The fingerprint of the file system on a device node, read through the kernel (no O_DIRECT). */
export async function fingerprintOf(node: string): Promise<string | undefined> {
  let dev: Device;
  try { dev = await Device.openAsync(node, { write: false, direct: false }); } catch { return undefined; }
  try { return await fsFingerprint(dev); } catch { return undefined; } finally { dev.close(); }
}

export async function fingerprintOfVolume(volume: BlockReader): Promise<string | undefined> {
  try { return await fsFingerprint(volume); } catch { return undefined; }
}

/** The /dev node a mount entry's file system lives on. */
export async function deviceOfMount(m: { major: number; minor: number; source: string }): Promise<string | undefined> {
  return (await devNode(`${m.major}:${m.minor}`)) ?? (m.source.startsWith('/dev/') ? m.source : undefined);
}

/** The mount entry whose mount point is exactly `dir` (after resolving links), looked up off-thread. */
export async function mountEntryAt(dir: string) {
  let real: string;
  try { real = await fs.promises.realpath(dir); } catch { return undefined; }
  const all = readMounts().filter((m) => m.mountPoint === real);
  return all[all.length - 1];
}
