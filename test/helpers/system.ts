// Test fixtures that touch the real system: scratch directories, loop devices, mounts.
// Each fixture registers its own cleanup with t.teardown, so it is undone also when the test fails,
// and only what the test itself made is ever removed.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';

export const isRoot = process.getuid?.() === 0;

// Exports served by a test keep their state directories in a place of this test process, removed
// when it exits, never in /var/lib/livesnap.
if (!process.env.LIVESNAP_STATE_DIR) {
  const stateRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'livesnap-test-state-'));
  process.env.LIVESNAP_STATE_DIR = stateRoot;
  process.on('exit', () => { try { fs.rmSync(stateRoot, { recursive: true, force: true }); } catch { /* gone */ } });
}

export function which(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

export function run(cmd: string, args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv } = {}): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'], input: opts.input, env: opts.env, maxBuffer: 256 << 20 });
}

/** Like run, but returns status/stdout/stderr instead of throwing. */
export function runStatus(cmd: string, args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv } = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input: opts.input, env: opts.env, maxBuffer: 256 << 20 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, signal: r.signal };
}

/** A scratch directory on a disk-backed file system (O_DIRECT works there, unlike tmpfs). */
export function scratchDir(t: ExecutionContext, prefix = 'livesnap-test-'): string {
  const base = process.env.LIVESNAP_TEST_DIR ?? path.join(os.tmpdir());
  fs.mkdirSync(base, { recursive: true });
  const dir = fs.mkdtempSync(path.join(base, prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A sparse file of `size` bytes. */
export function sparseFile(file: string, size: number): string {
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, size);
  fs.closeSync(fd);
  return file;
}

/** Attaches `file` to a free loop device, detached at teardown. */
export function loopDevice(t: ExecutionContext, file: string, opts: { readOnly?: boolean; directIo?: boolean } = {}): string {
  const args = ['-f', '--show'];
  if (opts.readOnly) args.push('-r');
  if (opts.directIo) args.push('--direct-io=on');
  let dev = '';
  for (let attempt = 0; attempt < 5 && !dev; attempt++) {
    const r = runStatus('losetup', [...args, file]);
    if (r.status === 0) dev = r.stdout.trim();
  }
  if (!dev) throw new Error(`losetup could not attach ${file}`);
  t.teardown(() => { runStatus('losetup', ['-d', dev]); });
  return dev;
}

/** Mounts `dev` on a fresh directory, unmounted (lazily if busy) at teardown. */
export function mount(t: ExecutionContext, dev: string, dir: string, options: string[] = []): string {
  fs.mkdirSync(dir, { recursive: true });
  run('mount', [...(options.length ? ['-o', options.join(',')] : []), dev, dir]);
  t.teardown(() => {
    // A test that froze the file system and failed before thawing must not leave it frozen.
    runStatus('fsfreeze', ['-u', dir]);
    if (runStatus('umount', [dir]).status !== 0) runStatus('umount', ['-l', dir]);
  });
  return dir;
}

/** Deterministic pseudo-random generator (xorshift32) for reproducible test data; print the seed. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x / 0x100000000;
  };
}

export function seedFromEnv(t: ExecutionContext): number {
  const seed = process.env.LIVESNAP_SEED ? Number(process.env.LIVESNAP_SEED) : (Date.now() ^ (process.pid << 8)) >>> 0;
  t.log(`seed ${seed} (rerun with LIVESNAP_SEED=${seed})`);
  return seed;
}
