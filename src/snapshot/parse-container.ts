// --container: memory:SIZE (default memory:64M), file:PATH[:SIZE], partition:DEVICE[:SIZE].
// A file:PATH that turns out to live on the protected volume itself becomes an "inside" container:
// we write a marker block into the new file, find it with FIEMAP, and read it back from the protected
// device at that address. Only if it is there byte for byte are the extents the protected device's.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../device/device';
import { fileExtents } from '../device/fsctl';
import { UserError } from '../util/errors';
import { parseSize } from '../util/size';
import type { Container } from './container';
import { FileContainer } from './container-file';
import { InsideContainer, slotsFromExtents } from './container-inside';
import { MemoryContainer } from './container-memory';
import { PartitionContainer } from './container-partition';

export type ContainerSpec =
  | { kind: 'memory'; size: number }
  | { kind: 'file'; path: string; size: number }
  | { kind: 'partition'; path: string; size?: number };

export const DEFAULT_CONTAINER_BYTES = 64 << 20;

export function parseContainer(text: string | undefined): ContainerSpec {
  const t = (text ?? '').trim();
  if (t === '' || t === 'memory') return { kind: 'memory', size: DEFAULT_CONTAINER_BYTES };
  const colon = t.indexOf(':');
  const kind = colon < 0 ? t : t.slice(0, colon);
  const rest = colon < 0 ? '' : t.slice(colon + 1);
  const hint = 'write memory:SIZE (e.g. memory:256M), file:PATH[:SIZE] or partition:DEVICE';
  switch (kind) {
    case 'memory':
      return { kind: 'memory', size: positive(parseSize(rest, 'container size'), t) };
    case 'file':
    case 'partition': {
      if (!rest) throw new UserError(`--container ${t}: a path is missing`, hint);
      // The size is an optional last ":SIZE" part; a path may itself contain colons.
      const m = /^(.*):(\d+(?:\.\d+)?[a-zA-Z]*)$/.exec(rest);
      const p = m ? m[1]! : rest;
      if (!p.startsWith('/')) throw new UserError(`--container ${t}: the path must be absolute`, hint);
      const size = m ? positive(parseSize(m[2]!, 'container size'), t) : undefined;
      return kind === 'file' ? { kind, path: p, size: size ?? DEFAULT_CONTAINER_BYTES } : { kind, path: p, size };
    }
    default:
      throw new UserError(`--container ${t}: unknown container kind "${kind}"`, hint);
  }
}

function positive(n: number, t: string): number {
  if (!(n > 0)) throw new UserError(`--container ${t}: the size must be more than zero`);
  return n;
}

/** Opens (creates, preallocates) the container. Done BEFORE arming: it may take a while. */
export async function openContainer(spec: ContainerSpec, protectedDevice: Device, blockSize: number): Promise<Container> {
  switch (spec.kind) {
    case 'memory':
      return new MemoryContainer(spec.size, blockSize);
    case 'partition':
      return PartitionContainer.open(spec.path, protectedDevice, blockSize, spec.size);
    case 'file':
      return openFileContainer(spec.path, spec.size, protectedDevice, blockSize);
  }
}

// Every file operation here runs on the thread pool: the file may lie inside the volume this
// process serves (the inside container), where a blocking call would wait for NBD requests that only
// this thread can answer.
async function openFileContainer(file: string, size: number, protectedDevice: Device, blockSize: number): Promise<Container> {
  const bytes = Math.floor(size / blockSize) * blockSize;
  if (bytes < blockSize) throw new UserError(`--container file:${file}: ${size} bytes holds no ${blockSize}-byte block`);
  const dir = path.dirname(file);
  if (!(await fs.promises.stat(dir).then((st) => st.isDirectory(), () => false))) throw new UserError(`--container file:${file}: the directory ${dir} does not exist`);
  let fh: fs.promises.FileHandle | undefined;
  try {
    fh = await fs.promises.open(file, 'wx', 0o600);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new UserError(`--container file:${file} already exists`, 'name a new file: livesnap creates it and removes it after the backup (a file left by a backup that was killed can be removed)');
    }
    throw e;
  }
  let dev: Device | undefined;
  try {
    const marker = crypto.randomBytes(blockSize);
    await fh.write(marker, 0, blockSize, 0);
    await fh.sync();
    await fh.close();
    fh = undefined;
    dev = await Device.openAsync(file, { write: true });
    try {
      await dev.zeroRange(blockSize, bytes - blockSize);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOSPC') throw new UserError(`--container file:${file}: no space for ${bytes} bytes there`, 'choose a smaller size or another file system');
      throw e;
    }
    await dev.sync();
    const inside = await findInside(file, marker, protectedDevice, blockSize);
    if (inside) {
      dev.close();
      dev = undefined;
      if (!protectedDevice.writable) throw new UserError(`--container file:${file} is inside the protected volume, which is open read-only`);
      return new InsideContainer(protectedDevice, file, inside, blockSize);
    }
    const c = new FileContainer(dev, file, bytes / blockSize, blockSize);
    dev = undefined;
    return c;
  } catch (e) {
    await fh?.close().catch(() => {});
    try { dev?.close(); } catch { /* closed */ }
    await fs.promises.rm(file, { force: true }).catch(() => {});
    throw e;
  }
}

/** The slot offsets on the protected device if `file` lives on it, else undefined. */
async function findInside(file: string, marker: Buffer, protectedDevice: Device, blockSize: number): Promise<Float64Array | undefined> {
  let ext: Float64Array;
  try { ext = await fileExtents(file, true); } catch { return undefined; }
  for (let i = 0; i + 3 < ext.length; i += 4) {
    if (ext[i] !== 0) continue;
    const phys = ext[i + 1]!;
    if (phys % 512 !== 0 || phys + blockSize > protectedDevice.size) return undefined;
    const got = await protectedDevice.read(phys, blockSize);
    if (!got.equals(marker)) return undefined;
    const slots = slotsFromExtents(ext, blockSize, protectedDevice.size);
    if (slots.length === 0) throw new UserError(`--container file:${file}: none of its extents is aligned to ${blockSize}-byte blocks`);
    return slots;
  }
  return undefined;
}
