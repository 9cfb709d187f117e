// Messages a user acts on (issue "The live volume is sacred", item 15): a vanished reader of
// "--to -" and a full standard output are said as what happened to the archive, offline and online;
// a non-root serve says it needs root; rates are rounded.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import anyTest from 'ava';
import { formatBytes, formatRate } from '../src/util/size';
import { BIN } from './helpers/cli';
import { serialIf, serveDevice } from './helpers/online';
import { run, scratchDir } from './helpers/system';

const test = serialIf({ root: true, commands: ['mkfs.ext4', 'setpriv'] });
const NO_RAW = /Premature close|EPIPE|ENOSPC|EACCES|at .*\.js:\d+/;

/** `livesnap backup ... --to -` into `| head -c 1000` (the reader leaves early) or `> /dev/full`. */
function toStdout(args: string[], into: 'closed pipe' | '/dev/full'): { status: number | null; stderr: string } {
  const cmd = [process.execPath, BIN, 'backup', ...args, '--to', '-'].map((a) => `'${a}'`).join(' ');
  const sh = into === '/dev/full' ? `${cmd} > /dev/full` : `${cmd} | head -c 1000 > /dev/null; exit \${PIPESTATUS[0]}`;
  const r = spawnSync('bash', ['-c', sh], { encoding: 'utf8' });
  return { status: r.status, stderr: r.stderr };
}

function volume(dir: string): string {
  const v = path.join(dir, 'v.img');
  fs.writeFileSync(v, Buffer.alloc(0));
  fs.truncateSync(v, 128 << 20);
  // Its metadata alone (several MiB of used blocks) outgrows a pipe's buffer long before the end.
  run('mkfs.ext4', ['-q', '-F', v]);
  return v;
}

test('--to - whose reader goes away, or into /dev/full: offline and online say so, and the exit status is 1', async (t) => {
  const dir = scratchDir(t, 'messages-');
  const v = volume(dir);
  const off1 = toStdout([v], 'closed pipe');
  t.is(off1.status, 1, off1.stderr);
  t.regex(off1.stderr, /standard output was closed by its reader before the archive ended: the archive is incomplete/);
  t.notRegex(off1.stderr, NO_RAW);
  const off2 = toStdout([v], '/dev/full');
  t.is(off2.status, 1, off2.stderr);
  t.regex(off2.stderr, /no space left on standard output: the archive is incomplete/);
  t.notRegex(off2.stderr, NO_RAW);

  const s = await serveDevice(t, dir, v, 'msg');
  for (const json of [[], ['--json']]) {
    const on1 = toStdout(['msg', '--control', s.control, ...json], 'closed pipe');
    t.is(on1.status, 1, on1.stderr);
    t.regex(on1.stderr, /standard output was closed by its reader before the archive ended/);
    t.notRegex(on1.stderr, NO_RAW);
  }
  const on2 = toStdout(['msg', '--control', s.control], '/dev/full');
  t.is(on2.status, 1, on2.stderr);
  t.regex(on2.stderr, /no space left on standard output/);
  t.notRegex(on2.stderr, NO_RAW);
  t.deepEqual((await s.status()).jobs.filter((j) => j.state === 'running'), [], 'no job left running');
});

test('serve as a user who is not root: says the daemon needs root, not a raw EACCES', (t) => {
  const dir = scratchDir(t, 'messages-');
  fs.chmodSync(dir, 0o755);
  const runDir = path.join(dir, 'root-only');
  fs.mkdirSync(runDir, { mode: 0o700 });
  const img = path.join(dir, 'u.img');
  fs.writeFileSync(img, Buffer.alloc(1 << 20));
  fs.chmodSync(img, 0o666);
  const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, BIN, 'serve', img, '--name', 'u', '--control', path.join(runDir, 'c.sock')], { encoding: 'utf8' });
  t.is(r.status, 1, r.stderr);
  t.regex(r.stderr, /cannot start the livesnap daemon: no permission to write its log .*daemon\.log \(you are not root\)/);
  t.regex(r.stderr, /hint: serving a device needs root/);
  t.notRegex(r.stderr, NO_RAW);
});

anyTest('rates and sizes print rounded', (t) => {
  t.is(formatRate(162.19272682245324, 1000), '162 B/s');
  t.is(formatBytes(1023.7), '1024 B');
  t.is(formatRate(3 * 2 ** 30, 1000), '3.00 GiB/s');
  t.is(formatBytes(1536), '1.50 KiB');
});
