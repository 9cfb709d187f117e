import { Command } from 'clipanion';
import { ioEngineName } from '../../device/io-ring';
import { TOOL_VERSION } from '../../jobs/version';
import { LivesnapCommand } from '../base';

export class VersionCommand extends LivesnapCommand {
  static override paths = [['version']];
  static override usage = Command.Usage({
    description: 'Print the version, the embedded Node runtime and the I/O engine',
    examples: [['As JSON', '$0 version --json']],
  });

  async run(): Promise<number> {
    let ioEngine = 'unavailable';
    try { ioEngine = ioEngineName(); } catch { /* addon missing: say so below */ }
    const sea = isSea();
    const info = { version: TOOL_VERSION, node: process.version, ioEngine, ioUring: ioEngine === 'io_uring', singleBinary: sea, platform: `${process.platform}-${process.arch}` };
    if (this.json) process.stdout.write(JSON.stringify(info) + '\n');
    else process.stdout.write(`livesnap ${TOOL_VERSION} (node ${process.version}, I/O engine ${ioEngine}${sea ? ', single binary' : ''})\n`);
    return 0;
  }
}

function isSea(): boolean {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return (require('node:sea') as { isSea(): boolean }).isSea();
  } catch {
    return false;
  }
}
