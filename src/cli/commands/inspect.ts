import { Command, Option } from 'clipanion';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';

export class InspectCommand extends LivesnapCommand {
  static override paths = [['inspect']];
  static override usage = Command.Usage({
    description: 'Show what a device or image holds (partitions, LVM, file systems) and which blocks a backup copies',
    details: `
      Reads the allocation structures straight from the device, never through a mount: partition
      tables (GPT, MBR with logical partitions), LVM2 physical volumes and their logical volumes,
      and the file systems inside (ext2/3/4 block bitmaps, XFS free-space B+trees, btrfs extent
      tree, NTFS $Bitmap, FAT12/16/32, swap: its header page only). The layout is printed as a
      tree (disk -> partitions -> LVs -> file systems) with each node's size and the bytes a backup
      copies; \`--json\` gives the same tree as \`layout\`. Anything unknown or untrustworthy is
      copied whole, and the output names it.
    `,
    examples: [
      ['Inspect a partition', '$0 inspect /dev/sdb1'],
      ['Inspect a whole disk (partitions, LVM, file systems)', '$0 inspect /dev/sdb'],
      ['Machine-readable output', '$0 inspect /var/lib/images/vol.img --json'],
    ],
  });

  device = Option.String({ name: 'device' });

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { Device } = require('../../device/device') as typeof import('../../device/device');
    const { readUsedBlockMap } = require('../../fs/detect') as typeof import('../../fs/detect');
    const { formatLayout } = require('../../fs/layout') as typeof import('../../fs/layout');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const dev = Device.open(this.device);
    try {
      const map = await readUsedBlockMap(dev, this.device);
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
        layout: map.layout,
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
            ...(map.layout && map.layout.children.length
              ? ['layout', ...formatLayout(map.layout, { notes: true }).map((l) => `  ${l}`)]
              : map.notes.map((n) => `note         ${n}`)),
          ].join('\n') + '\n',
        );
      }
      return 0;
    } finally {
      dev.close();
    }
  }
}
