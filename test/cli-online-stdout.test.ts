// An online backup to standard output: the daemon streams the archive over a second control
// connection and the CLI writes it to fd 1 in whole records (how Bacula's bpipe takes it).
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, livesnap } from './helpers/cli';
import { testIf } from './helpers/skip';
import { run, scratchDir } from './helpers/system';

testIf({ root: true, commands: ['mkfs.ext4', 'tar', 'dd'] })('online backup --to -: exact records on a pipe, GNU tar extracts the exact volume', async (t) => {
  const dir = scratchDir(t);
  const control = path.join(dir, 'run', 'control.sock');
  const vol = path.join(dir, 'vol.img');
  fs.closeSync(fs.openSync(vol, 'w'));
  fs.truncateSync(vol, 96 << 20);
  run('mkfs.ext4', ['-q', '-F', '-d', path.resolve(__dirname, '../../src'), vol]);
  const s = livesnap(['serve', vol, '--name', 'v', '--control', control, '--state', path.join(dir, 'state')]);
  t.is(s.status, 0, s.stderr);
  t.teardown(() => { livesnap(['stop', '--control', control]); });
  const out = execFileSync('sh', ['-c', `node ${BIN} backup v --control ${control} --to - --record-size 32K --json 2>${dir}/events | dd bs=32K iflag=fullblock of=${dir}/s.tar 2>&1`], { encoding: 'utf8' });
  t.regex(out, /^\d+\+0 records in/m);
  const last = JSON.parse(fs.readFileSync(path.join(dir, 'events'), 'utf8').trim().split('\n').pop()!);
  t.is(last.event, 'done');
  t.is(last.method, 'online');
  fs.mkdirSync(path.join(dir, 'x'));
  run('tar', ['-xf', path.join(dir, 's.tar'), '-C', path.join(dir, 'x')]);
  // Nothing wrote the export meanwhile, so the instant is the volume as it is.
  t.true(fs.readFileSync(path.join(dir, 'x', 'disk.img')).equals(fs.readFileSync(vol)));
  const raw = livesnap(['backup', 'v', '--control', control, '--to', '-', '--format', 'raw']);
  t.is(raw.status, 1);
  t.regex(raw.stderr, /raw image cannot be written to standard output/);
});
