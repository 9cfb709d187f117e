import * as path from 'node:path';
import test from 'ava';
import { lastJson, livesnap } from './helpers/cli';
import { testIf } from './helpers/skip';
import { scratchDir } from './helpers/system';

testIf({ root: true, commands: ['mkfs.ext4', 'e2fsck', 'losetup', 'nbdfuse', 'fusermount3'] })('demo: serves the volume, backs it up online under a writer, restores, verifies and checks it', async (t) => {
  const dir = path.join(scratchDir(t), 'demo');
  const r = livesnap(['demo', '--dir', dir, '--size', '128M', '--data', '40M', '--json']);
  t.is(r.status, 0, r.stderr + r.stdout);
  const done = lastJson(r.stdout);
  t.is(done.mode, 'online');
  t.is(done.fsck, 'clean');
  t.true((done.files as number) > 10);
  t.is(done.filesMatching, done.files);
  t.true((done.writerOps as number) > 0, 'the writer kept writing during the backup');
  t.is((done.verify as { differingBlocks: number }).differingBlocks, 0);
  t.is((done.backup as { method: string }).method, 'online');
  // Nothing is left mounted or attached.
  t.notRegex(require('node:fs').readFileSync('/proc/self/mountinfo', 'utf8'), new RegExp(dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
});

testIf({ root: true, commands: ['mkfs.ext4', 'e2fsck', 'losetup'] })('demo --offline: backs up with the freeze method, restores, verifies and checks', async (t) => {
  const dir = path.join(scratchDir(t), 'demo');
  const r = livesnap(['demo', '--offline', '--dir', dir, '--size', '128M', '--data', '40M', '--json']);
  t.is(r.status, 0, r.stderr + r.stdout);
  const done = lastJson(r.stdout);
  t.is(done.event, 'done');
  t.is(done.fsck, 'clean');
  t.true((done.files as number) > 10);
  t.is(done.filesMatching, done.files);
  t.is((done.verify as { differingBlocks: number }).differingBlocks, 0);
  t.is(typeof (done.backup as { freezeMs: number }).freezeMs, 'number');
});

test('demo says what it needs when not root', (t) => {
  if (process.getuid?.() !== 0) {
    const r = livesnap(['demo', '--dir', '/nonexistent/x']);
    t.is(r.status, 1);
    t.regex(r.stderr, /needs root/);
    return;
  }
  // As root, drop to "nobody" with setpriv (util-linux) to see the message a normal user gets.
  const { runStatus } = require('./helpers/system') as typeof import('./helpers/system');
  const r = runStatus('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, require('./helpers/cli').BIN, 'demo', '--dir', '/nonexistent/x']);
  t.is(r.status, 1, r.stderr);
  t.regex(r.stderr, /the demo needs root/);
});

test('every command has --help with examples, and bad arguments fail with usage', (t) => {
  for (const cmd of ['inspect', 'backup', 'restore', 'verify', 'demo', 'version']) {
    const r = livesnap([cmd, '--help']);
    t.is(r.status, 0, cmd);
    t.regex(r.stdout, /Examples/i, cmd);
  }
  const top = livesnap(['--help']);
  t.is(top.status, 0);
  t.regex(top.stdout, /livesnap backup/);
  const bad = livesnap(['backup', '/dev/null']);
  t.not(bad.status, 0);
  t.regex(bad.stderr, /--to/, 'usage errors go to stderr');
  t.is(bad.stdout, '');
  const badEnum = livesnap(['backup', '/dev/null', '--to', 'x.img', '--on-error', 'maybe']);
  t.not(badEnum.status, 0);
  t.regex(badEnum.stderr, /on-error/);
  t.is(badEnum.stdout, '');
});

test('version --json reports version, node runtime and I/O engine', (t) => {
  const r = livesnap(['version', '--json']);
  t.is(r.status, 0);
  const v = lastJson(r.stdout);
  t.is(v.version, require('../../package.json').version);
  t.is(v.node, process.version);
  t.regex(String(v.ioEngine), /^(io_uring|threadpool)$/);
  const forced = lastJson(livesnap(['version', '--json'], { LIVESNAP_IO_ENGINE: 'threadpool' }).stdout);
  t.is(forced.ioEngine, 'threadpool');
});
