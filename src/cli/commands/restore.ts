import { Command, Option } from 'clipanion';
import * as fs from 'node:fs';
import { restoreImage } from '../../jobs/restore';
import { UserError } from '../../util/errors';
import { formatBytes, formatRate } from '../../util/size';
import { LivesnapCommand } from '../base';

export class RestoreCommand extends LivesnapCommand {
  static override paths = [['restore']];
  static override usage = Command.Usage({
    description: 'Write a backup image back to a device or into a new image file',
    details: `
      Writes every block the backup stored (the used blocks of the image's file system) to the
      target. A device target must not be mounted and must be at least as large as the image; a file
      target is created sparse (use --force to replace an existing file).
    `,
    examples: [
      ['Restore to a disk', '$0 restore /backup/sdb1.img --to /dev/sdb1'],
      ['Restore into a new sparse file', '$0 restore /backup/sdb1.img --to /var/tmp/copy.img'],
    ],
  });

  image = Option.String({ name: 'image' });
  to = Option.String('--to', { required: true, description: 'Target block device or image file' });
  force = Option.Boolean('--force', false, { description: 'Overwrite an existing target file' });

  async run(): Promise<number> {
    refuseImageOnTarget(this.image, this.to);
    const r = this.reporter;
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
