import { Command, Option } from 'clipanion';
import { verifyImage } from '../../jobs/restore';
import { UserError } from '../../util/errors';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';

export class VerifyCommand extends LivesnapCommand {
  static override paths = [['verify']];
  static override usage = Command.Usage({
    description: 'Compare a backup image with a device, block by block',
    details: `
      Compares every block the backup stored (the used blocks of the image's file system) with the
      same block on the device. Exit status 0 when all match; 1 with the first differing block and
      the count otherwise.
    `,
    examples: [['Check a backup against its source', '$0 verify /backup/sdb1.img --against /dev/sdb1']],
  });

  image = Option.String({ name: 'image' });
  against = Option.String('--against', { description: 'Device (or image) to compare with' });

  async run(): Promise<number> {
    if (!this.against) throw new UserError('a raw image carries no checksums: verify needs --against <device>', `e.g. livesnap verify ${this.image} --against /dev/sdb1`);
    const r = this.reporter;
    const res = await verifyImage({ image: this.image, against: this.against, onProgress: (d, t) => r.progress('verify', d, t, `${formatBytes(d)}/${formatBytes(t)}`) });
    const ok = res.differingBlocks === 0;
    r.done(
      { image: this.image, against: this.against, match: ok, differingBlocks: res.differingBlocks, firstDifferingBlock: res.firstDifferingBlock ?? null, blockSize: res.map.blockSize, comparedBytes: res.bytes, durationMs: res.durationMs },
      ok
        ? [`verify ok: ${this.image} matches ${this.against} on all ${res.map.usedBlocks} used blocks (${formatBytes(res.bytes)})`]
        : [`verify FAILED: ${res.differingBlocks} of ${res.map.usedBlocks} used blocks differ; first differing block ${res.firstDifferingBlock} (byte offset ${res.firstDifferingBlock! * res.map.blockSize}, ${res.map.blockSize}-byte blocks)`],
    );
    return ok ? 0 : 1;
  }
}
