// Chooses the sink from the target's form: ".img" or a disk → raw image; ".tar", "-" and tape
// devices → archive. --format overrides.
import * as fs from 'node:fs';
import { UserError } from '../util/errors';
import { checkRecordSize, createArchiveSink, requireZstd } from '../archive';
import { ImageSink } from './image-sink';
import { NullSink } from './null-sink';
import type { BackupSink } from './sink';

export interface TargetOptions {
  force?: boolean;
  format?: 'raw' | 'tar';
  recordSize?: number;
  compress?: 'zstd';
  tapeSize?: number;
  nextVolumeCommand?: string;
}

export function isTapeDevice(target: string): boolean {
  if (/^\/dev\/n?st\d+/.test(target)) return true;
  try {
    const st = fs.statSync(target);
    // SCSI tape character devices: major 9.
    return st.isCharacterDevice() && Number((BigInt(st.rdev) >> 8n) & 0xfffn) === 9;
  } catch {
    return false;
  }
}

export function targetFormat(target: string, format?: 'raw' | 'tar'): 'raw' | 'tar' {
  if (format) return format;
  if (target === '-' || /\.tar(\.zst)?$/i.test(target) || isTapeDevice(target)) return 'tar';
  return 'raw';
}

export function openBackupTarget(target: string, opts: TargetOptions): BackupSink {
  const format = targetFormat(target, opts.format);
  if (format === 'raw') {
    if (target === '-') throw new UserError('a raw image cannot be written to standard output (it is sparse and written by offset)', 'use --format tar for a stream');
    if (target === '/dev/null') return new NullSink();
    return new ImageSink(target, { force: opts.force });
  }
  if (target !== '-' && !isTapeDevice(target)) {
    let st: fs.Stats | undefined;
    try { st = fs.statSync(target); } catch { st = undefined; }
    if (st?.isDirectory()) throw new UserError(`target ${target} is a directory`, 'name a file, e.g. backup.tar');
    if (st?.isFile() && !opts.force) throw new UserError(`target ${target} already exists`, 'choose another name, or pass --force to overwrite it');
  }
  if (opts.compress === 'zstd') requireZstd();
  if (opts.recordSize !== undefined) checkRecordSize(opts.recordSize);
  if (opts.tapeSize !== undefined && target === '-') throw new UserError('--tape-size needs a file or tape device as --to, not standard output');
  return createArchiveSink({ out: target, recordSize: opts.recordSize, compress: opts.compress, tapeSize: opts.tapeSize, nextVolumeCommand: opts.nextVolumeCommand });
}
