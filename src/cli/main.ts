// The livesnap command line.
import { Builtins, Cli } from 'clipanion';
import { fstatSync, writeSync } from 'node:fs';
import { TOOL_VERSION } from '../jobs/version';
import { ApplianceCommand } from './commands/appliance';
import { BackupCommand } from './commands/backup';
import { DemoCommand } from './commands/demo';
import { InspectCommand } from './commands/inspect';
import { KeygenCommand } from './commands/keygen';
import { ReplicaCommand, ReplicaRecoverCommand, ReplicaStatusCommand } from './commands/replica';
import { RestoreCommand } from './commands/restore';
import { S3AbortCommand, S3UploadsCommand } from './commands/s3';
import { VerifyCommand } from './commands/verify';
import { VersionCommand } from './commands/version';
import { DaemonCommand, ServeCommand, StopCommand } from './commands/serve';
import { CancelCommand, StatusCommand } from './commands/status';
import { SnapshotCommand } from './commands/snapshot';

const COMMANDS = [InspectCommand, BackupCommand, RestoreCommand, VerifyCommand, ServeCommand, SnapshotCommand, StatusCommand, CancelCommand, StopCommand, ReplicaCommand, ReplicaStatusCommand, ReplicaRecoverCommand, ApplianceCommand, S3UploadsCommand, S3AbortCommand, KeygenCommand, DaemonCommand, DemoCommand, VersionCommand];

export function buildCli(): Cli {
  // No colours unless standard output is a terminal: clipanion's help ("--help", no arguments) otherwise
  // goes by $TERM alone (Cli.defaultContext.colorDepth), also into a pipe or a file.
  const cli = new Cli({ binaryLabel: 'livesnap', binaryName: 'livesnap', binaryVersion: TOOL_VERSION, enableCapture: false, enableColors: stdoutIsTTY() ? undefined : false });
  for (const c of COMMANDS) cli.register(c);
  cli.register(Builtins.HelpCommand);
  cli.register(Builtins.VersionCommand);
  return cli;
}

export async function main(argv: string[]): Promise<number> {
  // libuv's pool (4 threads by default) runs every native batch: the copier's large reads must not
  // queue client writes behind them. Read by libuv when the pool first starts, i.e. after this line.
  process.env.UV_THREADPOOL_SIZE ??= '16';
  const cli = buildCli();
  // "livesnap", "livesnap --help", "livesnap -h": the very text clipanion's help command prints
  // (Builtins.HelpCommand writes cli.usage() to stdout and exits 0), without first compiling the
  // argument parser of every command (a few ms of start-up time).
  if (argv.length === 0 || (argv.length === 1 && (argv[0] === '--help' || argv[0] === '-h'))) {
    writeStdout(cli.usage());
    return 0;
  }
  // (clipanion adds the rest of Cli.defaultContext itself; not spreading it here keeps its stdin unread.)
  const ctx = { colorDepth: stdoutIsTTY() ? Cli.defaultContext.colorDepth : 1 };
  // clipanion reports a usage error (unknown option, a value its validator refuses) on the context's
  // stdout; it belongs on stderr, where scripts look for errors and where it cannot be taken for a
  // backup's --json output. Our commands write their output to process.stdout themselves, so for
  // them a context whose stdout is stderr carries only those reports; clipanion's own commands
  // (help in its forms, --version) print their text there and keep stdout.
  let command: ReturnType<Cli['process']>;
  try {
    command = cli.process(argv, ctx);
  } catch (e) {
    process.stderr.write(cli.error(e, { colored: false }));
    return 1;
  }
  const ours = !command.help && COMMANDS.some((c) => command instanceof c);
  return cli.run(command, ours ? { ...ctx, stdout: process.stderr } : ctx);
}

/**
 * process.stdout.isTTY, without creating process.stdout (its stream machinery is ~3 ms of startup)
 * when the answer is plain: a terminal is a character device, and none of Linux's memory devices
 * (major 1: /dev/null, /dev/zero, ...) is one. Anything else asks process.stdout.
 */
function stdoutIsTTY(): boolean {
  try {
    const st = fstatSync(1);
    if (!st.isCharacterDevice()) return false;
    if (st.rdev < 2 ** 32 && ((st.rdev >>> 8) & 0xfff) === 1) return false;
  } catch { /* no fd 1: let process.stdout say */ }
  return !!process.stdout.isTTY;
}

/** Writes to fd 1 directly (see stdoutIsTTY); on any error (EAGAIN, EPIPE, ...) the rest goes through process.stdout as usual. */
function writeStdout(text: string): void {
  const buf = Buffer.from(text);
  let done = 0;
  try {
    while (done < buf.length) done += writeSync(1, buf, done);
  } catch {
    process.stdout.write(buf.subarray(done));
  }
}
