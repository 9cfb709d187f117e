// partition:DEVICE — a raw block device (or a spare partition) used as scratch. Opened O_EXCL so a
// mounted or otherwise claimed device is refused; never the protected device itself.
import { Device } from '../device/device';
import { UserError } from '../util/errors';
import { DeviceContainer } from './container-device';

export class PartitionContainer extends DeviceContainer {
  readonly kind = 'partition' as const;

  private constructor(dev: Device, readonly path: string, capacity: number, blockSize: number) {
    super(dev, capacity, blockSize);
  }

  static open(path: string, protectedDevice: Device, blockSize: number, maxBytes?: number): PartitionContainer {
    const dev = Device.open(path, { write: true, exclusive: true });
    if (!dev.isBlockDevice) {
      dev.close();
      throw new UserError(`--container partition:${path} is not a block device`, 'name a spare disk or partition, or use file:PATH for a file');
    }
    const same = dev.isBlockDevice && protectedDevice.isBlockDevice
      ? dev.info.rdevMajor === protectedDevice.info.rdevMajor && dev.info.rdevMinor === protectedDevice.info.rdevMinor
      : false;
    if (same) {
      dev.close();
      throw new UserError(`the container ${path} is the device being backed up`, 'name a different device or partition for --container partition:DEVICE');
    }
    const bytes = Math.min(dev.size, maxBytes ?? Infinity);
    const capacity = Math.floor(bytes / blockSize);
    if (capacity < 1) {
      dev.close();
      throw new UserError(`the container device ${path} is too small (${dev.size} bytes)`);
    }
    return new PartitionContainer(dev, path, capacity, blockSize);
  }

  get description(): string {
    return `partition ${this.path} (${this.capacity * this.blockSize} bytes)`;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.releaseStaging();
    try { this.target.close(); } catch { /* already closed */ }
  }
}
