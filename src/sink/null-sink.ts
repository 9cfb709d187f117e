// "--to /dev/null": reads every used block and throws the data away. Shows that a device reads
// back cleanly end to end, and measures the read rate alone (bench/offline-backup uses it).
import type { BackupSink } from './sink';

export class NullSink implements BackupSink {
  readonly randomAccess = true;
  readonly description = 'nowhere (/dev/null: read test)';
  async begin(): Promise<void> {}
  async write(): Promise<void> {}
  async finish(): Promise<void> {}
  async abort(): Promise<void> {}
}
