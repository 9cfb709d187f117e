// file:PATH on another file system: created (never an existing file), preallocated with
// FALLOC_FL_ZERO_RANGE so a full disk shows up now and not in the middle of a backup, written with
// O_DIRECT, removed when the backup ends.
import * as fs from 'node:fs';
import { Device } from '../device/device';
import { DeviceContainer } from './container-device';

export class FileContainer extends DeviceContainer {
  readonly kind = 'file' as const;

  /** Takes over `dev`, an O_DIRECT fd on the preallocated file `path`. */
  constructor(dev: Device, readonly path: string, capacity: number, blockSize: number) {
    super(dev, capacity, blockSize);
  }

  get description(): string {
    return `file ${this.path} (${this.capacity * this.blockSize} bytes)`;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.releaseStaging();
    try { this.target.close(); } catch { /* already closed */ }
    await fs.promises.rm(this.path, { force: true }).catch(() => { /* best effort */ });
  }
}
