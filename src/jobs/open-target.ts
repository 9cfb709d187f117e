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
import { isS3Url, parseS3Url } from '../s3/location';
import type { S3Options } from '../s3/options';

export interface TargetOptions {
  force?: boolean;
  /** An s3:// target's endpoint and part sizes; `note` hears its plan. */
  s3?: S3Options;
  note?: (s: string) => void;
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
  if (isS3Url(target)) return 'tar';
  if (target === '-' || /\.tar(\.zst)?$/i.test(target) || isTapeDevice(target)) return 'tar';
  return 'raw';
}

/**
 * Every check of a target and its archive options, in one place (the CLI, the daemon and its
 * standard-output stream all call it): returns the format.
 */
export function checkTargetOptions(target: string, opts: TargetOptions & { detach?: boolean }): 'raw' | 'tar' {
  const format = targetFormat(target, opts.format);
  if (isS3Url(target)) {
    parseS3Url(target);
    if (format === 'raw') throw new UserError('a raw image cannot go to S3 (it is sparse and written by offset; an object is written once, in order)', 'drop --format raw: an s3:// target takes an archive');
    if (opts.tapeSize !== undefined) throw new UserError('--tape-size splits an archive over tape volumes or files, not S3 objects', 'drop --tape-size: one object holds up to 10,000 parts');
    if (opts.detach) throw new UserError('--detach cannot go with an s3:// target: the archive is uploaded by this command, with its credentials', 'run it in the foreground (nohup or a service unit if it must outlive the shell)');
  }
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
  if (isS3Url(target)) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- the SDK loads only for s3://
    const { S3Destination } = require('../s3/destination') as typeof import('../s3/destination');
    return createArchiveSink({ out: new S3Destination(target, opts.s3, { note: opts.note, force: opts.force }), recordSize: opts.recordSize, compress: opts.compress });
  }
  if (target !== '-' && !isTapeDevice(target)) {
    let st: fs.Stats | undefined;
    try { st = fs.statSync(target); } catch { st = undefined; }
    if (st?.isDirectory()) throw new UserError(`target ${target} is a directory`, 'name a file, e.g. backup.tar');
    if (st?.isFile() && !opts.force) throw new UserError(`target ${target} already exists`, 'choose another name, or pass --force to overwrite it');
  }
  return createArchiveSink({ out: target, recordSize: opts.recordSize, compress: opts.compress, tapeSize: opts.tapeSize, nextVolumeCommand: opts.nextVolumeCommand });
}
