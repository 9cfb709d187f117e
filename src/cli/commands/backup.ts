import { Command, Option } from 'clipanion';
import * as t from 'typanion';
import { runBackup } from '../../jobs/backup';
import { openSource, refuseTargetOnSource } from '../../jobs/source';
import { openBackupTarget } from '../../sink/open-target';
import { UserError } from '../../util/errors';
import { formatBytes, formatRate, parseSize } from '../../util/size';
import { LivesnapCommand } from '../base';

export class BackupCommand extends LivesnapCommand {
  static override paths = [['backup']];
  static override usage = Command.Usage({
    description: 'Back up the used blocks of a volume to an image (or archive)',
    details: `
      Copies only the blocks the file system uses (read from its own bitmaps, see "livesnap inspect")
      into a sparse raw image the size of the volume: free blocks become holes.

      Methods:
      - \`offline\` (default): the volume must not be mounted read-write.
      - \`freeze\`: the volume is mounted; its file system is frozen (FIFREEZE) for the whole copy so
        the image is one instant, then thawed (FITHAW) - always, also on error and Ctrl-C. Writers to
        that file system wait meanwhile; other file systems are not affected. The summary reports
        how long it was frozen.

      The target's form picks the format: \`.img\` or a disk gives a raw sparse image (written as
      "<target>.partial" and renamed when complete); \`.tar\`, \`-\` (standard output) and tape devices
      (/dev/nst0) give a POSIX tar archive (manifest.json, disk.img as a GNU sparse file, trailer.json
      with XXH3-128 chunk checksums) that GNU tar and bsdtar extract to the exact image. Archives are
      written in fixed records (\`--record-size\`), optionally zstd-compressed and split over volumes.
      Unreadable blocks: \`--on-error abort\` (default) stops cleanly; \`--on-error ignore\` writes zeros
      for them, lists them as bad blocks and carries on.
    `,
    examples: [
      ['Back up an unmounted volume to a sparse image', '$0 backup /dev/sdb1 --to /backup/sdb1.img'],
      ['Back up a mounted file system, frozen during the copy', '$0 backup /dev/sdb1 --method freeze --mount /srv/data --to /backup/data.img'],
      ['Stream a tar archive to tape, 256 KiB records', '$0 backup /dev/sdb1 --to /dev/nst0 --record-size 256K'],
      ['Compressed archive on standard output', '$0 backup /dev/sdb1 --to - --compress zstd | ssh vault "cat > sdb1.tar.zst"'],
      ['Keep going past bad blocks', '$0 backup /dev/sdc --to /backup/sdc.img --on-error ignore'],
    ],
  });

  source = Option.String({ name: 'source' });
  to = Option.String('--to', { required: true, description: 'Target: an image file (.img) or a block device' });
  method = Option.String('--method', 'offline', { description: 'offline | freeze', validator: t.isEnum(['offline', 'freeze'] as const) });
  mount = Option.String('--mount', { description: 'Mount point of the source (with --method freeze)' });
  onError = Option.String('--on-error', 'abort', { description: 'abort | ignore: what to do with unreadable blocks', validator: t.isEnum(['abort', 'ignore'] as const) });
  force = Option.Boolean('--force', false, { description: 'Overwrite an existing target file' });
  recordSize = Option.String('--record-size', { description: 'Archive: bytes per write to the target (default 10240, up to 1M; tape drives like 256K)' });
  compress = Option.String('--compress', { description: 'Archive: zstd', validator: t.isEnum(['zstd'] as const) });
  tapeSize = Option.String('--tape-size', { description: 'Archive: split into volumes of this size (e.g. 400G)' });
  nextVolume = Option.String('--next-volume-command', { description: 'Archive: shell command run between volumes ($LIVESNAP_VOLUME = next number); without it, asks on the terminal' });
  format = Option.String('--format', { description: 'raw | tar (default: from the target: .img raw; .tar, - and tape devices tar)', validator: t.isEnum(['raw', 'tar'] as const) });

  protected override dataOnStdout(): boolean {
    return this.to === '-';
  }

  async run(): Promise<number> {
    if (this.method === 'freeze' && !this.mount) throw new UserError('--method freeze needs --mount <mountpoint>', 'name the directory where the source is mounted, e.g. --mount /srv/data');
    if (this.method !== 'freeze' && this.mount) throw new UserError('--mount only goes with --method freeze');
    const source = openSource(this.source, this.method);
    try {
      refuseTargetOnSource(source, this.to);
      const sink = openBackupTarget(this.to, {
        force: this.force,
        format: this.format,
        recordSize: this.recordSize !== undefined ? parseSize(this.recordSize, '--record-size') : undefined,
        compress: this.compress,
        tapeSize: this.tapeSize !== undefined ? parseSize(this.tapeSize, '--tape-size') : undefined,
        nextVolumeCommand: this.nextVolume,
      });
      const r = this.reporter;
      r.info(`backing up ${this.source} to ${sink.description} (${this.method})`);
      const summary = await runBackup({
        source,
        sink,
        method: this.method,
        mount: this.mount,
        onError: this.onError,
        onMap: (m) => {
          r.event('map', { filesystem: m.filesystem, blockSize: m.blockSize, totalBlocks: m.totalBlocks, usedBlocks: m.usedBlocks, notes: m.notes });
          for (const n of m.notes) r.info(`note: ${n}`);
        },
        onProgress: (done, total, bad) => r.progress('backup', done, total, `${formatBytes(done)}/${formatBytes(total)}${bad ? ` bad:${bad}` : ''}`),
      });
      r.done(
        { ...summary, badBlockCount: summary.badBlocks.length },
        [
          `backup complete: ${this.source} -> ${this.to}`,
          `  file system   ${summary.filesystem}, ${summary.blockSize}-byte blocks, ${summary.usedBlocks} of ${summary.totalBlocks} used`,
          `  copied        ${formatBytes(summary.bytes)} in ${(summary.copyMs / 1000).toFixed(2)} s (${formatRate(summary.bytes, summary.copyMs)})`,
          ...(summary.freezeMs !== undefined ? [`  frozen        ${summary.freezeMs.toFixed(0)} ms (${this.mount})`] : []),
          `  bad blocks    ${summary.badBlocks.length ? summary.badBlocks.slice(0, 20).join(', ') + (summary.badBlocks.length > 20 ? ', ...' : '') + ' (written as zeros)' : 'none'}`,
        ],
      );
      return 0;
    } finally {
      source.close();
    }
  }
}
