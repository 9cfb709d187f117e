// Opening the volume to back up, with the checks that keep the live volume safe:
// an offline backup refuses a volume mounted read-write (its image would be a smear of instants),
// and no target may live on the source (it would be copied into itself, or deadlock a freeze).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../device/device';
import { UserError } from '../util/errors';
import { loopDevicesBacking, mountsOfDevice, type MountEntry } from '../util/mounts';

export function openSource(source: string, method: 'offline' | 'freeze'): Device {
  const dev = Device.open(source, { write: false });
  try {
    if (dev.size < 4096) throw new UserError(`${source} is too small to hold a file system (${dev.size} bytes)`, 'check that you named the right device');
    if (method === 'offline') refuseMountedReadWrite(dev, source);
    return dev;
  } catch (e) {
    dev.close();
    throw e;
  }
}

function refuseMountedReadWrite(dev: Device, source: string): void {
  let mounts: MountEntry[] = [];
  if (dev.isBlockDevice) mounts = mountsOfDevice(dev.info.rdevMajor, dev.info.rdevMinor);
  else {
    for (const loop of loopDevicesBacking(source)) {
      const st = fs.statSync(loop);
      mounts.push(...mountsOfDevice(major(st.rdev), minor(st.rdev)));
    }
  }
  const rw = mounts.find((m) => !m.readOnly);
  if (rw) {
    throw new UserError(
      `${source} is mounted read-write at ${rw.mountPoint}: an offline copy would not be one instant`,
      `back it up consistently with "livesnap backup ${source} --method freeze --mount ${rw.mountPoint} --to ...", or unmount it first`,
    );
  }
}

export function major(rdev: number): number {
  return Number((BigInt(rdev) >> 8n) & 0xfffn);
}
export function minor(rdev: number): number {
  return Number((BigInt(rdev) & 0xffn) | ((BigInt(rdev) >> 12n) & 0xfff00n));
}

/** Refuses a target that is the source itself, or a file on a file system that lives on the source. */
export function refuseTargetOnSource(source: Device, target: string): void {
  if (target === '-' || target.startsWith('s3://')) return;
  let st: fs.Stats | undefined;
  try { st = fs.statSync(target); } catch { st = undefined; }
  const srcStat = fs.statSync(source.path);
  if (st) {
    if (st.isBlockDevice() && source.isBlockDevice && st.rdev === srcStat.rdev) throw new UserError(`the target ${target} is the source device itself`, 'write the backup to another device or file');
    if (st.isFile() && !source.isBlockDevice && st.ino === srcStat.ino && st.dev === srcStat.dev) throw new UserError(`the target ${target} is the source file itself`, 'write the backup to another file');
  }
  const dir = st?.isBlockDevice() ? undefined : path.dirname(path.resolve(target));
  if (dir && source.isBlockDevice) {
    let dst: fs.Stats;
    try { dst = fs.statSync(dir); } catch { throw new UserError(`the target's directory ${dir} does not exist`, 'create it first or choose another target'); }
    if (dst.dev === srcStat.rdev) throw new UserError(`the target ${target} lives on the source ${source.path} (mounted there)`, 'write the backup to a file system on another device');
  }
}
