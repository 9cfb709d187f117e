// Starting the daemon in the background: the same program (node + script, or the single binary)
// re-executed as "livesnap daemon", its output in daemon.log beside the control socket.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { UserError } from '../util/errors';
import { isDaemonRunning } from './client';

/** How to run this same program again: node + script, or the single binary alone. */
export function selfCommand(): string[] {
  let sea = false;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    sea = (require('node:sea') as { isSea(): boolean }).isSea();
  } catch { /* not a single binary */ }
  return sea ? [] : [process.argv[1]!];
}

export async function startDaemon(controlPath: string): Promise<string> {
  const dir = path.dirname(controlPath);
  const logFile = path.join(dir, 'daemon.log');
  let log: number;
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    log = fs.openSync(logFile, 'a', 0o600);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') {
      throw new UserError(
        `cannot start the livesnap daemon: no permission to write its log ${logFile}${process.getuid?.() !== 0 ? ' (you are not root)' : ''}`,
        'serving a device needs root (run with sudo); or give the daemon a control socket in a directory of your own: --control ~/livesnap.sock',
      );
    }
    throw e;
  }
  const child = spawn(process.execPath, [...selfCommand(), 'daemon', '--control', controlPath], {
    detached: true,
    stdio: ['ignore', log, log],
    env: { ...process.env, NODE_OPTIONS: '' },
  });
  child.unref();
  fs.closeSync(log);
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (await isDaemonRunning(controlPath)) return logFile;
    if (child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const tail = fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8').trim().split('\n').slice(-5).join('\n') : '';
  throw new UserError(`the livesnap daemon did not start${tail ? `:\n${tail}` : ''}`, `see ${logFile}`);
}
