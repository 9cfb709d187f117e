// Chooses the sink from the target's form: ".img" or a disk → raw image; ".tar", "-" and tape
// devices → archive. --format overrides.
import * as fs from 'node:fs';
import { createArchiveSink } from '../archive';
import { ImageSink } from '../sink/image-sink';
import { NullSink } from '../sink/null-sink';
import type { BackupSink } from '../sink/sink';
import { checkRecordSize } from '../sink/stream/record-writer';
import { requireZstd } from '../sink/stream/zstd';
import { UserError } from '../util/errors';

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

/**
 * Every check of a target and its archive options, in one place (the CLI, the daemon and its
 * standard-output stream all call it): returns the format.
 */
export function checkTargetOptions(target: string, opts: TargetOptions & { detach?: boolean }): 'raw' | 'tar' {
  const format = targetFormat(target, opts.format);
  if (target === '-') {
    if (format === 'raw') throw new UserError('a raw image cannot be written to standard output (it is sparse and written by offset)', 'use --format tar for a stream');
    if (opts.detach) throw new UserError('--detach cannot go with --to -: the archive flows through the CLI', 'write to a file or tape device instead');
    if (opts.tapeSize !== undefined) throw new UserError('--tape-size needs a file or tape device as --to, not standard output');
  }
  if (format === 'tar') {
    if (opts.compress === 'zstd') requireZstd();
    if (opts.recordSize !== undefined) checkRecordSize(opts.recordSize);
  }
  return format;
}

export function openBackupTarget(target: string, opts: TargetOptions): BackupSink {
  const format = checkTargetOptions(target, opts);
  if (format === 'raw') {
    if (target === '/dev/null') return new NullSink();
    return new ImageSink(target, { force: opts.force });
  }
  if (target !== '-' && !isTapeDevice(target)) {
    let st: fs.Stats | undefined;
    try { st = fs.statSync(target); } catch { st = undefined; }
    if (st?.isDirectory()) throw new UserError(`target ${target} is a directory`, 'name a file, e.g. backup.tar');
    if (st?.isFile() && !opts.force) throw new UserError(`target ${target} already exists`, 'choose another name, or pass --force to overwrite it');
  }
  return createArchiveSink({ out: target, recordSize: opts.recordSize, compress: opts.compress, tapeSize: opts.tapeSize, nextVolumeCommand: opts.nextVolumeCommand });
}
