import { Command, Option } from 'clipanion';
import * as fs from 'node:fs';
import { UserError } from '../../util/errors';
import { formatBytes, formatRate } from '../../util/size';
import { LivesnapCommand } from '../base';
import { isS3Url } from '../../s3/location';
import { parseS3Options, type S3Options } from '../../s3/options';

export class RestoreCommand extends LivesnapCommand {
  static override paths = [['restore']];
  static override usage = Command.Usage({
    description: 'Write a backup (image or archive) back to a device or into a new image file',
    details: `
      The backup may be a raw image, or an archive read from a file, a tape device or standard
      input ("-") without seeking; every chunk's checksum is checked as it streams, and a file
      target only gets its name once the archive's trailer has been checked.

      Writes every block the backup stored (the used blocks of the image's file system) to the
      target. A device target must not be mounted and must be at least as large as the image; a file
      target is created sparse (use --force to replace an existing file).

      A file is taken for an archive when it starts like one (and must then be a valid livesnap
      archive), for a raw image when it holds a partition table, LVM2 or a known file system; a raw
      image of unknown contents needs --raw. Empty, cut-off or damaged backups are refused.

      A chain (archives of "livesnap backup <export> --incremental") is restored by naming the full
      backup first and then every incremental after it, in order: each manifest names its backup's
      id and its parent's, and a chain with a gap, a wrong order or another volume is refused before
      anything is written. Each incremental writes its changed blocks over the state before it and
      zeroes the blocks that became free or excluded; the target gets its name only after the last
      archive's checksums were all checked. Blocks a backup excluded (--exclude, swap) read as zeros.
    `,
    examples: [
      ['Restore to a disk', '$0 restore /backup/sdb1.img --to /dev/sdb1'],
      ['Restore into a new sparse file', '$0 restore /backup/sdb1.img --to /var/tmp/copy.img'],
      ['Restore from tape', 'mt -f /dev/nst0 rewind && $0 restore /dev/nst0 --to /dev/sdb1'],
      ['Restore from a stream', 'ssh vault "cat sdb1.tar.zst" | $0 restore - --to /dev/sdb1'],
      ['Restore a chain: the full backup, then each incremental in order', '$0 restore /backup/full.tar /backup/inc1.tar /backup/inc2.tar --to /dev/sdb1'],
      ['Restore from object storage (ranged GETs with retries, every chunk checked)', '$0 restore s3://backups/data-2026-12-01.tar --to /dev/sdb1'],
      ['Restore a raw image of an unformatted volume', '$0 restore /backup/raw.img --to /dev/sdc --raw'],
    ],
  });

  image = Option.String({ name: 'image' });
  more = Option.Rest({ name: 'incremental' });
  to = Option.String('--to', { required: true, description: 'Target block device or image file' });
  force = Option.Boolean('--force', false, { description: 'Overwrite an existing target file' });
  raw = Option.Boolean('--raw', false, { description: 'The image is raw and of unknown contents: restore every block (images of known file systems need no flag)' });

  nextVolume = Option.String('--next-volume-command', { description: 'Archive on several volumes: shell command run before each next one ($LIVESNAP_VOLUME)' });
  s3Endpoint = Option.String('--s3-endpoint', { description: 'An s3://BUCKET/KEY archive: the S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS itself)' });

  private s3(): S3Options | undefined {
    if (this.s3Endpoint === undefined) return undefined;
    if (![this.image, ...this.more].some(isS3Url)) throw new UserError('--s3-endpoint goes with an s3://BUCKET/KEY archive');
    return parseS3Options({ endpoint: this.s3Endpoint });
  }

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { restoreImage } = require('../../jobs/restore') as typeof import('../../jobs/restore');
    const { restoreArchive } = require('../../jobs/archive-restore') as typeof import('../../jobs/archive-restore');
    const { classifyBackup } = require('../../jobs/backup-kind') as typeof import('../../jobs/backup-kind');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const { refuseServed } = require('../../jobs/served-check') as typeof import('../../jobs/served-check'); // eslint-disable-line @typescript-eslint/no-require-imports
    await refuseServed(this.to, 'restore destination');
    const r = this.reporter;
    if (this.more.length) return this.restoreChain();
    if ((await classifyBackup(this.image, { raw: this.raw })) === 'archive') {
      if (this.image !== '-' && !isS3Url(this.image)) refuseImageOnTarget(this.image, this.to);
      const t0 = performance.now();
      const s = await restoreArchive({
        input: this.image,
        s3: this.s3(), onNote: (n: string) => this.reporter.info(`note: ${n}`),
        target: this.to,
        force: this.force,
        nextVolumeCommand: this.nextVolume,
        onManifest: (m) => r.info(`archive of ${m.source} (${m.filesystem}, ${formatBytes(m.volumeSize)}) taken ${m.snapshotTime}`),
        onProgress: (d, t) => r.progress('restore', d, t, `${formatBytes(d)}/${formatBytes(t)}`),
      });
      const ms = performance.now() - t0;
      r.done(
        { image: this.image, target: this.to, format: 'tar', filesystem: s.manifest.filesystem, volumeSize: s.manifest.volumeSize, bytes: s.manifest.storedBytes, chunksVerified: s.chunksVerified, badBlocks: s.trailer.badBlocks, durationMs: ms },
        [`restore complete: ${this.image === '-' ? 'standard input' : this.image} -> ${this.to}`, `  wrote ${formatBytes(s.manifest.storedBytes)} in ${(ms / 1000).toFixed(2)} s (${formatRate(s.manifest.storedBytes, ms)}), ${s.chunksVerified} chunk checksums verified`],
      );
      return 0;
    }
    refuseImageOnTarget(this.image, this.to);
    const res = await restoreImage({
      image: this.image,
      target: this.to,
      force: this.force,
      onMap: (m) => { for (const n of m.notes) r.info(`note: ${n}`); },
      onProgress: (d, t) => r.progress('restore', d, t, `${formatBytes(d)}/${formatBytes(t)}`),
    });
    r.done(
      { image: this.image, target: this.to, filesystem: res.map.filesystem, blockSize: res.map.blockSize, usedBlocks: res.map.usedBlocks, bytes: res.bytes, durationMs: res.durationMs },
      [`restore complete: ${this.image} -> ${this.to}`, `  wrote ${formatBytes(res.bytes)} in ${(res.durationMs / 1000).toFixed(2)} s (${formatRate(res.bytes, res.durationMs)})`],
    );
    return 0;
  }

  private async restoreChain(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { restoreChain } = require('../../jobs/chain-restore') as typeof import('../../jobs/chain-restore');
    const { classifyBackup } = require('../../jobs/backup-kind') as typeof import('../../jobs/backup-kind');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const inputs = [this.image, ...this.more];
    if (this.nextVolume !== undefined || this.raw) throw new UserError(`${this.raw ? '--raw' : '--next-volume-command'} does not go with a chain of archives`, 'restore a chain from archive files, one per backup');
    for (const f of inputs) {
      if (f === '-') throw new UserError('a chain is restored from archive files, not standard input', 'save each archive to a file first');
      if ((await classifyBackup(f, {})) !== 'archive') throw new UserError(`${f} is not a livesnap archive: a chain is made of archives`, 'name the .tar files of the full backup and its incrementals');
      if (!isS3Url(f)) refuseImageOnTarget(f, this.to);
    }
    const r = this.reporter;
    const t0 = performance.now();
    const s = await restoreChain({
      inputs, target: this.to, force: this.force, s3: this.s3(), onNote: (n: string) => this.reporter.info(`note: ${n}`),
      onArchive: (i, m) => r.info(`${i === 0 ? 'full' : 'incremental'} ${m.backup?.id ?? ''} of ${m.source} taken ${m.snapshotTime} (${inputs[i]})`),
      onProgress: (d, t) => r.progress('restore', d, t, `${formatBytes(d)}/${formatBytes(t)}`),
    });
    const ms = performance.now() - t0;
    const last = s.manifests[s.manifests.length - 1]!;
    r.done(
      { images: inputs, target: this.to, format: 'tar', chain: s.manifests.map((m) => ({ id: m.backup?.id ?? null, parent: m.backup?.parent ?? null, kind: m.backup?.kind ?? 'full', snapshotTime: m.snapshotTime })), snapshotTime: last.snapshotTime, volumeSize: last.volumeSize, bytes: s.bytes, zeroedBytes: s.zeroedBytes, chunksVerified: s.summaries.reduce((a, x) => a + x.chunksVerified, 0), durationMs: ms },
      [`restore complete: a chain of ${inputs.length} backups -> ${this.to}, the volume as it was at ${last.snapshotTime}`, `  wrote ${formatBytes(s.bytes)} (zeroed ${formatBytes(s.zeroedBytes)}) in ${(ms / 1000).toFixed(2)} s (${formatRate(s.bytes, ms)}), every chunk checksum verified`],
    );
    return 0;
  }
}

/** The image must not be the target, nor sit on a file system that lives on the target device. */
export function refuseImageOnTarget(image: string, target: string): void {
  let img: fs.Stats, tgt: fs.Stats | undefined;
  try { img = fs.statSync(image); } catch { throw new UserError(`${image}: no such file`, 'name the image file the backup wrote'); }
  if (img.isDirectory()) throw new UserError(`${image} is a directory, not an image`);
  try { tgt = fs.statSync(target); } catch { tgt = undefined; }
  if (!tgt) return;
  if (tgt.isFile() && tgt.ino === img.ino && tgt.dev === img.dev) throw new UserError(`the target ${target} is the image itself`);
  if (tgt.isBlockDevice() && (img.dev === tgt.rdev || (img.isBlockDevice() && img.rdev === tgt.rdev))) {
    throw new UserError(`the image ${image} lives on the target ${target}: restoring would overwrite it while reading it`, 'copy the image to another disk first');
  }
}
