// A device's stamp at a clean stop: the mtime of the file behind it (a written file or loop backing
// file has a new one) and a hash of its first and last MiB (superblocks, their backups, partition
// tables: a file system mounted or written elsewhere changes them). Compared at the next serve.
import * as fs from 'node:fs';
import type { Device } from '../device/device';
import { xxh128 } from '../device/hash';
import type { DeviceStamp } from './change-map';

const SAMPLE = 1 << 20;

export async function deviceStamp(device: Device, files: ReadonlyArray<string>): Promise<DeviceStamp> {
  let fileMtimeNs: string | null = null;
  for (const f of files) {
    const st = await fs.promises.stat(f, { bigint: true }).catch(() => undefined);
    if (st?.isFile()) { fileMtimeNs = `${st.mtimeNs}:${st.size}`; break; }
  }
  const n = Math.min(SAMPLE, device.size - (device.size % 512));
  const head = n > 0 ? await device.read(0, n) : Buffer.alloc(0);
  const tailAt = Math.max(0, device.size - n - ((device.size - n) % 512));
  const tail = n > 0 ? await device.read(tailAt, n) : Buffer.alloc(0);
  return { fileMtimeNs, sample: xxh128(Buffer.concat([head, tail])).toString('hex') };
}
