// The livesnap command line.
import { Builtins, Cli } from 'clipanion';
import { TOOL_VERSION } from '../jobs/version';
import { BackupCommand } from './commands/backup';
import { DemoCommand } from './commands/demo';
import { InspectCommand } from './commands/inspect';
import { RestoreCommand } from './commands/restore';
import { VerifyCommand } from './commands/verify';
import { VersionCommand } from './commands/version';
import { DaemonCommand, ServeCommand, StopCommand } from './commands/serve';
import { CancelCommand, StatusCommand } from './commands/status';

export function buildCli(): Cli {
  // No colours unless standard output is a terminal: clipanion's help ("--help", no arguments) otherwise
  // goes by $TERM alone (Cli.defaultContext.colorDepth), also into a pipe or a file.
  const cli = new Cli({ binaryLabel: 'livesnap', binaryName: 'livesnap', binaryVersion: TOOL_VERSION, enableCapture: false, enableColors: process.stdout.isTTY ? undefined : false });
  for (const c of [InspectCommand, BackupCommand, RestoreCommand, VerifyCommand, ServeCommand, StatusCommand, CancelCommand, StopCommand, DaemonCommand, DemoCommand, VersionCommand]) cli.register(c);
  cli.register(Builtins.HelpCommand);
  cli.register(Builtins.VersionCommand);
  return cli;
}

export async function main(argv: string[]): Promise<number> {
  const cli = buildCli();
  const ctx = { ...Cli.defaultContext, colorDepth: process.stdout.isTTY ? Cli.defaultContext.colorDepth : 1 };
  return cli.run(argv.length ? argv : ['--help'], ctx);
}
