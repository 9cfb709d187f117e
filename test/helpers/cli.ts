// Runs the real CLI (bin/livesnap.js) as a separate process: tests see exit codes and texts as a user does.
import * as path from 'node:path';
import { runStatus } from './system';

export const BIN = path.resolve(__dirname, '../../../bin/livesnap.js');

export function livesnap(args: string[], env?: NodeJS.ProcessEnv) {
  return runStatus(process.execPath, [BIN, ...args], { env: env ? { ...process.env, ...env } : undefined });
}

/** The last JSON line of --json output. */
export function lastJson(stdout: string): Record<string, unknown> {
  const lines = stdout.trim().split('\n').filter((l) => l.startsWith('{'));
  return JSON.parse(lines[lines.length - 1] ?? '{}') as Record<string, unknown>;
}
