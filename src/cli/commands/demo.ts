import { Command, Option } from 'clipanion';
import { formatBytes, formatRate, parseSize } from '../../util/size';
import { LivesnapCommand } from '../base';

export class DemoCommand extends LivesnapCommand {
  static override paths = [['demo']];
  static override usage = Command.Usage({
    description: 'Run the whole job on a built-in demo volume (needs root)',
    details: `
      Creates a file-backed ext4 volume, fills it with generated files, backs it up while it is
      mounted (frozen for the copy), restores the image elsewhere, verifies it block by block,
      runs e2fsck on it and compares every file's checksum. Files stay in --dir for you to look at.
    `,
    examples: [['Run the demo', '$0 demo'], ['A bigger volume elsewhere', '$0 demo --dir /srv/scratch/demo --size 2G --data 1200M']],
  });

  dir = Option.String('--dir', '/var/tmp/livesnap-demo', { description: 'Where the demo volume and images go (a disk-backed file system)' });
  size = Option.String('--size', '512M', { description: 'Size of the demo volume' });
  data = Option.String('--data', '300M', { description: 'How much file data to generate' });
  seed = Option.String('--seed', '1', { description: 'Seed for the generated files' });

  async run(): Promise<number> {
    const r = this.reporter;
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { runDemo } = require('../../demo/demo') as typeof import('../../demo/demo');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const res = await runDemo({
      dir: this.dir,
      sizeBytes: parseSize(this.size, '--size'),
      dataBytes: parseSize(this.data, '--data'),
      seed: Number(this.seed) || 1,
      log: (l) => { r.info(l); r.event('step', { message: l }); },
      onProgress: (phase, d, t) => r.progress(phase, d, t),
    });
    const b = res.backup;
    r.done(
      { ...res, backup: { ...b, badBlockCount: b.badBlocks.length } },
      [
        'demo complete:',
        `  volume        ${res.volume} (${b.filesystem}, ${formatBytes(b.size)}, ${b.usedBlocks}/${b.totalBlocks} blocks used)`,
        `  backup        ${formatBytes(b.bytes)} copied in ${(b.copyMs / 1000).toFixed(2)} s (${formatRate(b.bytes, b.copyMs)}), frozen ${b.freezeMs?.toFixed(0)} ms`,
        `  restore       ${(res.restoreMs / 1000).toFixed(2)} s`,
        `  verify        all used blocks identical (${formatBytes(res.verify.comparedBytes)} compared)`,
        `  e2fsck -fn    clean`,
        `  files         ${res.filesMatching}/${res.files} checksums match`,
        `  left in       ${res.dir}`,
      ],
    );
    return 0;
  }
}
