// Running the system tools the demo needs (mkfs, losetup, mount, e2fsck), with clear errors.
import { spawnSync } from 'node:child_process';
import { UserError } from '../util/errors';

export function sh(cmd: string, args: string[], what?: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ENOENT') throw new UserError(`the demo needs "${cmd}", which is not installed`, what ? `install it: apt-get install ${what}` : undefined);
  if (r.status !== 0) throw new UserError(`${cmd} ${args.join(' ')} failed: ${(r.stderr || r.stdout).trim()}`);
  return r.stdout;
}

export function shStatus(cmd: string, args: string[]): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { status: r.status, out: (r.stdout ?? '') + (r.stderr ?? '') };
}
