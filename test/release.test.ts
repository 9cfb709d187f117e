// The single-binary release (issue 5): release/out/livesnap-linux-x64 runs where no Node exists.
// A minimal Debian root (debootstrap --variant=minbase bookworm, from the mirror apt uses here) is
// made once and cached as a tar; each run unpacks it on a disk-backed file system (O_DIRECT works
// there), copies the binary in as /livesnap and drives it with chroot. The binary is built with
// release/build.sh when missing (LIVESNAP_RELEASE_REBUILD=1 forces a rebuild).
import test, { type ExecutionContext } from 'ava';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { exec, mountsUnder, removeRoot, unpackRoot, type Chroot } from './helpers/debian-root';
import { requirements } from './helpers/skip';
import { run, runStatus, sparseFile } from './helpers/system';

const repo = path.resolve(__dirname, '../..');
const binary = path.join(repo, 'release/out/livesnap-linux-x64');
const pkg = JSON.parse(fs.readFileSync(path.join(repo, 'package.json'), 'utf8')) as { version: string };
const needs = { root: true, commands: ['debootstrap', 'chroot', 'mkfs.ext4', 'tar', 'mount', 'umount'] };

// The steps share one chroot and mount over its /tmp, so they run one after another.
// (Like testIf from helpers/skip.ts, but serial.)
function serialIf(title: string, fn: (t: ExecutionContext) => Promise<void> | void): void {
  const why = requirements(needs);
  if (why) {
    console.log(`# SKIP ${title}: ${why}`);
    test.skip(`${title} (skipped: ${why})`, () => {});
  } else {
    test.serial(title, fn);
  }
}

let chroot: Chroot | undefined;

test.after.always(() => {
  if (chroot) removeRoot(chroot);
});

/** Why the binary must be (re)built, or undefined when it is newer than everything it is made of. */
function staleBecause(): string | undefined {
  if (process.env.LIVESNAP_RELEASE_REBUILD === '1') return 'LIVESNAP_RELEASE_REBUILD=1';
  if (!fs.existsSync(binary)) return 'missing';
  const built = fs.statSync(binary).mtimeMs;
  const inputs = [path.join(repo, 'package.json'), path.join(repo, 'build/Release/livesnap_native.node')];
  const walk = (dir: string) => {
    if (!fs.existsSync(dir)) return;
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) { if (e.name !== 'out' && e.name !== 'cache') walk(p); } else inputs.push(p);
    }
  };
  walk(path.join(repo, 'src'));
  walk(path.join(repo, 'release'));
  const newer = inputs.find((f) => fs.existsSync(f) && fs.statSync(f).mtimeMs > built);
  return newer ? `${path.relative(repo, newer)} is newer` : undefined;
}

async function setUp(t: ExecutionContext): Promise<Chroot> {
  if (chroot) return chroot;
  const stale = staleBecause();
  if (stale) {
    t.log(`building the binary (${stale}): bash release/build.sh`);
    await exec('bash', [path.join(repo, 'release/build.sh')]);
  }
  chroot = await unpackRoot(t);
  const root = chroot.root;
  fs.copyFileSync(binary, path.join(root, 'livesnap'));
  fs.chmodSync(path.join(root, 'livesnap'), 0o755);
  fs.mkdirSync(path.join(root, 'work'));
  return chroot;
}

/** Runs /livesnap inside the chroot with a clean environment (plus `env`). */
function livesnap(c: Chroot, args: string[], env: Record<string, string> = {}) {
  const envArgs = ['PATH=/usr/sbin:/usr/bin:/sbin:/bin', 'HOME=/root', ...Object.entries(env).map(([k, v]) => `${k}=${v}`)];
  return runStatus('chroot', [c.root, '/usr/bin/env', '-i', ...envArgs, '/livesnap', ...args]);
}

function ok(t: ExecutionContext, r: ReturnType<typeof livesnap>, what: string): string {
  if (r.status !== 0) {
    const missing = /Command not found|Unknown Syntax Error/i.test(r.stdout + r.stderr);
    t.fail(`${what}: exit ${r.status}${r.signal ? ` (signal ${r.signal})` : ''}${missing ? ' [the CLI has no such command yet]' : ''}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
  return r.stdout;
}

const lastJson = (out: string) => JSON.parse(out.trim().split('\n').filter((l) => l.startsWith('{')).pop() ?? 'null') as Record<string, unknown>;

/** Where the binary may put its addon for a moment; none of them may keep a livesnap-addon-* entry. */
const fallbackDirs = ['tmp', 'run', 'dev/shm', 'var/tmp', 'root/.cache', '.'];
function leftovers(c: Chroot): string[] {
  const found: string[] = [];
  for (const d of fallbackDirs) {
    const dir = path.join(c.root, d);
    if (!fs.existsSync(dir)) continue;
    for (const e of fs.readdirSync(dir)) if (e.startsWith('livesnap-addon-') || e === 'livesnap_native.node') found.push(path.join('/', d, e));
  }
  return found;
}

const sha256 = (file: string) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

serialIf('release binary: no Node in the root; --version, --help and version --json work', async (t) => {
  t.timeout(20 * 60_000, 'first run builds the binary and the Debian root');
  const c = await setUp(t);
  t.not(runStatus('chroot', [c.root, '/bin/sh', '-c', 'command -v node || ls /usr/bin/node* /usr/local/bin/node*']).status, 0, 'the root must have no node');
  t.deepEqual(leftovers(c), []);

  const v = ok(t, livesnap(c, ['--version']), 'livesnap --version');
  t.true(v.includes(pkg.version), `--version prints ${pkg.version}: ${v}`);

  const help = ok(t, livesnap(c, ['--help']), 'livesnap --help');
  for (const cmd of ['inspect', 'backup', 'restore']) t.regex(help, new RegExp(`livesnap ${cmd}\\b`), `--help lists ${cmd}`);

  const info = lastJson(ok(t, livesnap(c, ['version', '--json']), 'livesnap version --json'));
  t.log(`version --json: ${JSON.stringify(info)}`);
  t.is(info.version, pkg.version);
  t.regex(String(info.node), /^v24\./, 'the embedded runtime is Node 24 LTS');
  t.true(info.ioEngine === 'io_uring' || info.ioEngine === 'threadpool', `ioEngine: ${String(info.ioEngine)}`);
  t.deepEqual(leftovers(c), [], 'no temporary files left behind');
});

serialIf('release binary: ignores NODE_OPTIONS', async (t) => {
  const c = await setUp(t);
  for (const opts of ['--require /nonexistent/preload.js', '--max-old-space-size=1 --no-such-node-flag']) {
    const info = lastJson(ok(t, livesnap(c, ['version', '--json'], { NODE_OPTIONS: opts }), `NODE_OPTIONS='${opts}' livesnap version --json`));
    t.is(info.version, pkg.version);
  }
  t.deepEqual(leftovers(c), []);
});

serialIf('release binary: inspect, backup and restore of an ext4 image inside the root', async (t) => {
  const c = await setUp(t);
  // A small ext4 with some content, made outside (mkfs.ext4 -d fills it from a directory, no mount needed).
  const src = fs.mkdtempSync(path.join(c.root, 'work', 'content-'));
  fs.writeFileSync(path.join(src, 'hello.txt'), 'hello from the chroot\n');
  fs.writeFileSync(path.join(src, 'random.bin'), crypto.randomBytes(3 << 20));
  fs.mkdirSync(path.join(src, 'dir'));
  for (let i = 0; i < 20; i++) fs.writeFileSync(path.join(src, 'dir', `f${i}`), crypto.randomBytes(5000 + i * 777));
  const size = 64 << 20;
  const vol = sparseFile(path.join(c.root, 'work', 'vol.img'), size);
  run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', src, vol]);
  fs.rmSync(src, { recursive: true, force: true });
  const before = sha256(vol);

  const info = lastJson(ok(t, livesnap(c, ['inspect', '/work/vol.img', '--json']), 'livesnap inspect --json'));
  t.log(`inspect: ${JSON.stringify(info)}`);
  t.is(info.filesystem, 'ext4');
  t.is(info.blockSize, 4096);
  t.is(info.totalBlocks, size / 4096);
  t.is(info.size, size);
  t.true(typeof info.usedBlocks === 'number' && info.usedBlocks > (3 << 20) / 4096 && info.usedBlocks < size / 4096, `usedBlocks ${String(info.usedBlocks)}`);

  ok(t, livesnap(c, ['backup', '/work/vol.img', '--to', '/work/backup.img']), 'livesnap backup');
  t.true(fs.existsSync(path.join(c.root, 'work', 'backup.img')));
  ok(t, livesnap(c, ['restore', '/work/backup.img', '--to', '/work/restored.img']), 'livesnap restore');
  const restored = path.join(c.root, 'work', 'restored.img');
  t.is(fs.statSync(restored).size, size);
  t.is(sha256(restored), before, 'the restored image is byte-identical to the volume');
  t.is(sha256(vol), before, 'the source was not changed');
  t.deepEqual(leftovers(c), []);
  for (const f of ['vol.img', 'backup.img', 'restored.img']) fs.rmSync(path.join(c.root, 'work', f), { force: true });
});

serialIf('release binary: works when /tmp (and /run, /dev/shm) are mounted noexec', async (t) => {
  const c = await setUp(t);
  const noexec = ['tmp', 'run', 'dev/shm'].map((d) => path.join(c.root, d));
  try {
    for (const dir of noexec) {
      fs.mkdirSync(dir, { recursive: true });
      run('mount', ['-t', 'tmpfs', '-o', 'noexec,nosuid,nodev,size=16m,mode=1777', 'livesnap-test', dir]);
      c.mounts.push(dir);
    }
    const r = livesnap(c, ['version', '--json'], { XDG_RUNTIME_DIR: '/run' });
    const info = lastJson(ok(t, r, 'livesnap version --json with noexec /tmp'));
    t.is(info.version, pkg.version);
    t.deepEqual(leftovers(c), [], 'nothing left in the noexec dirs nor in the fallback');
    // With TMPDIR naming the noexec dir explicitly, too.
    ok(t, livesnap(c, ['--help'], { TMPDIR: '/tmp' }), 'livesnap --help with TMPDIR=/tmp noexec');
    t.deepEqual(leftovers(c), []);
  } finally {
    for (const dir of noexec.reverse()) {
      const i = c.mounts.indexOf(dir);
      if (i < 0) continue;
      if (runStatus('umount', [dir]).status !== 0) runStatus('umount', ['-l', dir]);
      c.mounts.splice(i, 1);
    }
  }
  t.deepEqual(mountsUnder(c.root), [], 'no mount left behind');
});
