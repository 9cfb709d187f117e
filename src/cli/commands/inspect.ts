import { Command, Option } from 'clipanion';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';

export class InspectCommand extends LivesnapCommand {
  static override paths = [['inspect']];
  static override usage = Command.Usage({
    description: 'Show the file system, block size and used blocks of a device or image',
    details: `
      Reads the file system's own allocation structures straight from the device (ext2/3/4 block
      group bitmaps, XFS free-space B+trees), never through a mount. For anything else every block
      counts as used, and the output says so.
    `,
    examples: [
      ['Inspect a partition', '$0 inspect /dev/sdb1'],
      ['Machine-readable output', '$0 inspect /var/lib/images/vol.img --json'],
    ],
  });

  device = Option.String({ name: 'device' });

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { Device } = require('../../device/device') as typeof import('../../device/device');
    const { readUsedBlockMap } = require('../../fs/detect') as typeof import('../../fs/detect');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const dev = Device.open(this.device);
    try {
      const map = await readUsedBlockMap(dev);
      const result = {
        device: this.device,
        filesystem: map.filesystem,
        blockSize: map.blockSize,
        totalBlocks: map.totalBlocks,
        usedBlocks: map.usedBlocks,
        freeBlocks: map.totalBlocks - map.usedBlocks,
        size: dev.size,
        usedBytes: Math.min(map.usedBlocks * map.blockSize, dev.size),
        allBlocks: map.allBlocks,
        notes: map.notes,
      };
      if (this.json) {
        process.stdout.write(JSON.stringify(result) + '\n');
      } else {
        const pct = map.totalBlocks ? ((100 * map.usedBlocks) / map.totalBlocks).toFixed(1) : '0';
        process.stdout.write(
          [
            `device       ${this.device}`,
            `size         ${formatBytes(dev.size)} (${dev.size} bytes)`,
            `file system  ${map.filesystem}`,
            `block size   ${map.blockSize}`,
            `blocks       ${map.totalBlocks} total, ${map.usedBlocks} used (${pct}%), ${map.totalBlocks - map.usedBlocks} free`,
            `to copy      ${formatBytes(result.usedBytes)}`,
            ...map.notes.map((n) => `note         ${n}`),
          ].join('\n') + '\n',
        );
      }
      return 0;
    } finally {
      dev.close();
    }
  }
}
