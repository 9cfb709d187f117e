// A block device with REAL unreadable sectors, without device-mapper: nbdkit's ddrescue filter
// answers EIO for the ranges a ddrescue map marks bad, nbdfuse exposes the export as a file, and a
// loop device over that file is what the test reads. The kernel sees genuine I/O errors.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { loopDevice, runStatus } from './system';

async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Serves `image` with `bad` byte ranges unreadable; returns a read-only loop device over it. */
export async function deviceWithBadRanges(t: ExecutionContext, dir: string, image: string, bad: Array<[number, number]>): Promise<string> {
  const size = fs.statSync(image).size;
  const hex = (n: number) => '0x' + n.toString(16);
  const lines = ['# Mapfile. Created by livesnap tests', `${hex(0)} + 1`];
  let pos = 0;
  for (const [off, len] of [...bad].sort((a, b) => a[0] - b[0])) {
    if (off > pos) lines.push(`${hex(pos)} ${hex(off - pos)} +`);
    lines.push(`${hex(off)} ${hex(len)} -`);
    pos = off + len;
  }
  if (pos < size) lines.push(`${hex(pos)} ${hex(size - pos)} +`);
  const map = path.join(dir, 'bad.map');
  fs.writeFileSync(map, lines.join('\n') + '\n');
  const sock = path.join(dir, 'bad.sock');
  const nbdkit = spawn('nbdkit', ['-f', '-U', sock, '--filter=ddrescue', 'file', image, `ddrescue-mapfile=${map}`], { stdio: 'ignore' });
  t.teardown(() => { nbdkit.kill('SIGTERM'); });
  await waitFor(() => fs.existsSync(sock), 5000, 'nbdkit socket');
  const fuseDir = path.join(dir, 'fuse');
  fs.mkdirSync(fuseDir);
  const fuseFile = path.join(fuseDir, 'disk');
  const nbdfuse = spawn('nbdfuse', ['-r', fuseFile, '--unix', sock], { stdio: 'ignore' });
  t.teardown(() => {
    runStatus('fusermount3', ['-u', fuseDir]);
    nbdfuse.kill('SIGTERM');
  });
  await waitFor(() => { try { return fs.statSync(fuseFile).size === size; } catch { return false; } }, 5000, 'nbdfuse file');
  return loopDevice(t, fuseFile, { readOnly: true, directIo: true });
}
