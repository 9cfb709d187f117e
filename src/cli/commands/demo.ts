import { Command, Option } from 'clipanion';
import { formatBytes, formatRate, parseSize } from '../../util/size';
import { LivesnapCommand } from '../base';

export class DemoCommand extends LivesnapCommand {
  static override paths = [['demo']];
  static override usage = Command.Usage({
    description: 'Run the whole job on a built-in demo volume (needs root)',
    details: `
      Creates a file-backed ext4 volume and SERVES it over NBD, mounts its file system through
      nbdfuse + a direct-I/O loop device, fills it with files, starts a writer that keeps creating,
      overwriting and deleting files, and takes an online backup meanwhile (frozen only for the
      instant of arming). Then restores the image elsewhere, verifies it block by block, runs
      e2fsck on it and compares every file's checksum. Files stay in --dir for you to look at.

      --offline shows the simpler method instead: the mounted file system is frozen for the whole copy.
    `,
    examples: [
      ['Run the demo', '$0 demo'],
      ['A bigger volume elsewhere', '$0 demo --dir /srv/scratch/demo --size 2G --data 1200M'],
      ['The freeze method', '$0 demo --offline'],
    ],
  });

  dir = Option.String('--dir', '/var/tmp/livesnap-demo', { description: 'Where the demo volume and images go (a disk-backed file system)' });
  size = Option.String('--size', '512M', { description: 'Size of the demo volume' });
  data = Option.String('--data', '300M', { description: 'How much file data to generate' });
  seed = Option.String('--seed', '1', { description: 'Seed for the generated files (--offline)' });
  offline = Option.Boolean('--offline', false, { description: 'Freeze the mounted file system for the whole copy instead of serving it' });

  async run(): Promise<number> {
    const r = this.reporter;
    if (!this.offline) return this.online();
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
        ...checkedLines(res),
      ],
    );
    return 0;
  }

  private async online(): Promise<number> {
    const r = this.reporter;
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { runOnlineDemo } = require('../../demo/online-demo') as typeof import('../../demo/online-demo');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const res = await runOnlineDemo({
      dir: this.dir,
      sizeBytes: parseSize(this.size, '--size'),
      dataBytes: parseSize(this.data, '--data'),
      log: (l) => { r.info(l); r.event('step', { message: l }); },
      onProgress: (phase, d, t) => r.progress(phase, d, t),
    });
    const b = res.backup as Record<string, number> & { filesystem: string };
    r.done(
      { ...res, mode: 'online' },
      [
        'demo complete (online):',
        `  volume        ${res.volume} (${b.filesystem}, ${formatBytes(b.size)}), served over NBD, mounted via nbdfuse + loop`,
        `  backup        ${formatBytes(b.bytes)} in ${(b.copyMs / 1000).toFixed(2)} s (${formatRate(b.bytes, b.copyMs)}) while a writer ran (${res.writerOpsDuringBackup} file operations during the backup, ${res.writerOps} in all)`,
        `  instant       freeze window ${b.freezeMs.toFixed(1)} ms; worst write delay ${b.worstWriteDelayMs.toFixed(1)} ms; ${b.blocksSavedByWriters} originals saved to the container`,
        ...checkedLines(res),
      ],
    );
    return 0;
  }
}

/** The closing lines both demos share: how the backup was checked. */
function checkedLines(res: { restoreMs: number; verify: { comparedBytes: number }; filesMatching: number; files: number; dir: string }): string[] {
  return [
    `  restore       ${(res.restoreMs / 1000).toFixed(2)} s`,
    `  verify        all used blocks identical (${formatBytes(res.verify.comparedBytes)} compared)`,
    `  e2fsck -fn    clean`,
    `  files         ${res.filesMatching}/${res.files} checksums match`,
    `  left in       ${res.dir}`,
  ];
}
