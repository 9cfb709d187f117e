// Minimal Debian roots (debootstrap --variant=minbase, from the mirror apt uses here) for tests that
// need a machine without Node: made once per release and cached as a tar, unpacked per test run into
// a directory the test makes and removes.
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { runStatus } from './system';

export const debootstrapCache = process.env.LIVESNAP_DEBOOTSTRAP_CACHE ?? '/var/cache/livesnap-test';
export const scratchBase = process.env.LIVESNAP_TEST_DIR ?? '/var/tmp';

/** Async so a slow first debootstrap does not block the worker. */
export function exec(cmd: string, args: string[], timeoutMs = 15 * 60_000, env?: NodeJS.ProcessEnv): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, timeout: timeoutMs, env }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')} failed: ${err.message}\nstdout: ${stdout.slice(-8000)}\nstderr: ${stderr.slice(-8000)}`));
      else resolve(stdout);
    });
  });
}

/** The Debian mirror apt uses on this machine (the only one the network reaches). */
export function aptMirror(): string {
  const files: string[] = [];
  if (fs.existsSync('/etc/apt/sources.list')) files.push('/etc/apt/sources.list');
  const d = '/etc/apt/sources.list.d';
  if (fs.existsSync(d)) for (const f of fs.readdirSync(d).sort()) if (/\.(list|sources)$/.test(f)) files.push(path.join(d, f));
  for (const f of files) {
    const text = fs.readFileSync(f, 'utf8');
    if (f.endsWith('.sources')) {
      for (const stanza of text.split(/\n\s*\n/)) {
        const field = (k: string) => new RegExp(`^${k}:\\s*(.+)$`, 'mi').exec(stanza)?.[1].trim();
        if (/^enabled:\s*no/mi.test(stanza)) continue;
        const suites = (field('Suites') ?? '').split(/\s+/);
        const uri = (field('URIs') ?? '').split(/\s+/)[0];
        if (uri && suites.includes('bookworm') && /(^|\s)deb(\s|$)/.test(field('Types') ?? '')) return uri;
      }
    } else {
      for (const line of text.split('\n')) {
        const m = /^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s/.exec(line);
        if (m) return m[1];
      }
    }
  }
  return 'http://deb.debian.org/debian';
}

/** Makes (once) and caches the minbase root of `suite` (bookworm, trixie) as a tar. */
export async function cachedRootTar(t: ExecutionContext, suite = 'bookworm'): Promise<string> {
  const rootTar = path.join(debootstrapCache, `debootstrap-${suite}-minbase.tar`);
  if (fs.existsSync(rootTar)) return rootTar;
  fs.mkdirSync(debootstrapCache, { recursive: true });
  const tmp = fs.mkdtempSync(path.join(debootstrapCache, 'debootstrap-'));
  try {
    const mirror = aptMirror();
    t.log(`debootstrap --variant=minbase ${suite} from ${mirror} (first run only; cached in ${rootTar})`);
    const t0 = Date.now();
    await exec('debootstrap', ['--variant=minbase', suite, path.join(tmp, 'root'), mirror]);
    await exec('tar', ['-C', path.join(tmp, 'root'), '--numeric-owner', '-cf', path.join(tmp, 'root.tar'), '.']);
    fs.renameSync(path.join(tmp, 'root.tar'), rootTar);
    t.log(`debootstrap took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  return rootTar;
}

export function mountsUnder(dir: string): string[] {
  const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
    .map((l) => l.split(' ')[4]).filter((m): m is string => !!m).map(unescape)
    .filter((m) => m === dir || m.startsWith(dir + '/'));
}

export interface Chroot { root: string; mounts: string[] }

/** Unpacks the cached root of `suite` into a fresh directory under scratchBase. */
export async function unpackRoot(t: ExecutionContext, suite = 'bookworm', prefix = 'livesnap-test-chroot-'): Promise<Chroot> {
  const tar = await cachedRootTar(t, suite);
  fs.mkdirSync(scratchBase, { recursive: true });
  const root = fs.mkdtempSync(path.join(scratchBase, prefix));
  const c: Chroot = { root, mounts: [] };
  try {
    await exec('tar', ['-C', root, '--numeric-owner', '-xf', tar]);
  } catch (e) {
    removeRoot(c);
    throw e;
  }
  return c;
}

/** Mounts (or bind-mounts, with type 'bind') `what` on `dir` inside the root; undone by removeRoot. */
export function mountIn(c: Chroot, type: string, what: string, dir: string, options: string[] = []): void {
  const target = path.join(c.root, dir);
  fs.mkdirSync(target, { recursive: true });
  const args = type === 'bind' ? ['--bind', what, target] : ['-t', type, ...(options.length ? ['-o', options.join(',')] : []), what, target];
  const r = runStatus('mount', args);
  if (r.status !== 0) throw new Error(`mount ${args.join(' ')}: ${r.stderr}`);
  c.mounts.push(target);
}

/** Unmounts what mountIn mounted, then removes the root — never through a mount that is still there. */
export function removeRoot(c: Chroot): void {
  for (const m of c.mounts.splice(0).reverse()) if (runStatus('umount', [m]).status !== 0) runStatus('umount', ['-l', m]);
  if (mountsUnder(c.root).length === 0) fs.rmSync(c.root, { recursive: true, force: true });
  else console.log(`# left ${c.root} in place: still mounted: ${mountsUnder(c.root).join(', ')}`);
}
