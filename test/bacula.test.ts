// Bacula drives livesnap through its bpipe plugin (see helpers/bacula.ts): a real director, storage
// daemon and file daemon on 127.0.0.1, jobs run unattended through bconsole. A backup job stores
// `livesnap backup DEVICE --to -` as one file, a restore job feeds it to `livesnap restore -`, and
// the image that comes back is the volume, byte for byte. When livesnap fails, Bacula 9.6 still
// calls the backup "OK -- with warnings" with JobStatus T: what a user must check is asserted here.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, livesnap } from './helpers/cli';
import { BACULA_COMMANDS, baculaSite } from './helpers/bacula';
import { deviceWithBadRanges } from './helpers/badblocks';
import { serialIf } from './helpers/skip';
import { run, runStatus, scratchDir, seedFromEnv } from './helpers/system';
import { checksumsOfImage, makeVolume } from './helpers/volumes';

const needs = serialIf({ root: true, commands: [...BACULA_COMMANDS, 'mkfs.ext4', 'e2fsck', 'losetup', 'cmp'] });
const needsBadBlocks = serialIf({ root: true, commands: [...BACULA_COMMANDS, 'nbdkit', 'nbdfuse', 'fusermount3', 'losetup'] });

// What bpipe-fd logs when its reader or writer command exits with status 1 (0x10000000 marks an exit
// status in Bacula's close_bpipe; 1 is livesnap's).
const closeError = (name: string) => new RegExp(`Error: bpipe-fd: Error closing for file /livesnap/${name}\\.tar: 268435457`);

// The check the README recommends: JobStatus T does not tell, the job's error count does. A
// director RunScript after the job raises an alert (here: a file) when %E (non-fatal errors) is not 0.
const alertAfter = (dir: string) => `sh -c 'test %E -eq 0 || echo livesnap backup %n JobId %i: %E errors, %b bytes > ${dir}/alert-%i'`;

needs('a Bacula backup job and restore job through bpipe give back the volume byte for byte', async (t) => {
  const dir = scratchDir(t);
  const vol = makeVolume(t, dir, { sizeMiB: 64, mkfs: ['mkfs.ext4', '-q', '-F'], seed: seedFromEnv(t), dataMiB: 16, keepMounted: true });
  // Deleted files leave their data in free blocks, which a block-level backup rightly skips (they come
  // back as zeros): zero the free space so the whole device can be compared with the restored image.
  runStatus('dd', ['if=/dev/zero', `of=${vol.mnt}/zero`, 'bs=1M']);
  fs.rmSync(`${vol.mnt}/zero`);
  run('umount', [vol.mnt!]);

  const site = await baculaSite(t, path.join(dir, 'bacula'), [{ name: 'vol', device: vol.loop, after: alertAfter(dir) }]);
  const started = Date.now();
  const b = await site.runJob('backup-vol');
  t.log(`backup job ${b.jobId}: ${b.status} ${b.bytes} bytes, ${Date.now() - started} ms`);
  t.is(b.status, 'T', b.log);
  t.is(b.termination, 'Backup OK', b.log);
  t.is(b.errors, 0, b.log);
  t.is(b.files, 1);
  t.false(fs.existsSync(path.join(dir, `alert-${b.jobId}`)), 'no alert for a clean backup');
  // livesnap's own report (its stderr) reaches the job log through bpipe.
  // (bpipe logs it in chunks of up to 1 KiB, each "FILE: " + the chunk, not line by line.)
  t.regex(b.log, new RegExp(`lstest-fd JobId ${b.jobId}: /livesnap/vol\\.tar: [^]*backup complete: ${vol.loop} -> -`));
  // JobBytes is the archive livesnap wrote (the same archive written to a file, within one record).
  const ref = path.join(dir, 'ref.tar');
  const r0 = livesnap(['backup', vol.loop, '--to', ref]);
  t.is(r0.status, 0, r0.stderr);
  const refSize = fs.statSync(ref).size;
  t.log(`JobBytes ${b.bytes}, the same archive as a file ${refSize} bytes`);
  t.true(Math.abs(b.bytes - refSize) <= 10240, `JobBytes ${b.bytes} vs archive ${refSize}`);

  const where = path.join(dir, 'restore-1'); // made by the writer command (mkdir -p %w)
  const r = await site.restore(b.jobId, where);
  t.log(`restore job ${r.jobId}: ${r.status} ${r.bytes} bytes, ${Date.now() - started} ms since the backup began`);
  t.is(r.status, 'T', r.log);
  t.is(r.termination, 'Restore OK', r.log);
  t.is(r.errors, 0, r.log);
  t.is(r.bytes, b.bytes, 'every byte stored was fed back to livesnap restore');
  t.regex(r.log, /\/livesnap\/vol\.tar: [^]*restore complete: standard input -> .*restore-1\/vol\.img/);

  const image = path.join(where, 'vol.img');
  t.is(fs.statSync(image).size, 64 << 20);
  const cmp = runStatus('cmp', [vol.loop, image]);
  t.is(cmp.status, 0, `the restored image differs from the volume: ${cmp.stdout}${cmp.stderr}`);
  const fsck = runStatus('e2fsck', ['-fn', image]);
  t.is(fsck.status, 0, fsck.stdout + fsck.stderr);
  t.deepEqual(checksumsOfImage(t, image, path.join(dir, 'check')), vol.checksums);

  // A second restore into the same "where" does not overwrite the image: livesnap refuses at once, the
  // file daemon's next write to it fails (Broken pipe, a fatal error: JobStatus f).
  const again = await site.restore(b.jobId, where);
  t.log(`second restore job ${again.jobId}: JobStatus ${again.status}, "${again.termination}"`);
  t.is(again.status, 'f', again.log);
  t.is(again.termination, '*** Restore Error ***');
  t.regex(again.log, /Fatal error: Pipe write error: ERR=Broken pipe/);
  t.regex(again.log, /livesnap: error: target .*restore-1\/vol\.img already exists/);
  t.is(runStatus('cmp', [vol.loop, image]).status, 0, 'the first restore is untouched');
  t.deepEqual(fs.readdirSync(where), ['vol.img'], 'bpipe itself writes nothing under "where"');
});

needs('livesnap refusing the volume: Bacula says "Backup OK -- with warnings", JobStatus T, 0 bytes, and the log has livesnap\'s error', async (t) => {
  const dir = scratchDir(t);
  // A mounted, read-write volume: an offline copy would not be one instant, so livesnap refuses it.
  const vol = makeVolume(t, dir, { sizeMiB: 32, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 21, dataMiB: 2, keepMounted: true });
  const site = await baculaSite(t, path.join(dir, 'bacula'), [{ name: 'vol', device: vol.loop, after: alertAfter(dir) }]);
  const b = await site.runJob('backup-vol');
  t.log(`backup job ${b.jobId}: JobStatus ${b.status}, JobBytes ${b.bytes}, JobFiles ${b.files}, JobErrors ${b.errors}, "${b.termination}"`);
  t.log(b.log.split('\n').filter((l) => /livesnap|bpipe|Non-fatal|Bytes Written|Termination/.test(l)).join('\n'));
  // Exactly what Bacula 9.6 reports: not a failed job, a "successful" one holding an empty file.
  t.is(b.status, 'T');
  t.is(b.termination, 'Backup OK -- with warnings');
  t.is(b.bytes, 0);
  t.is(b.files, 1, 'the catalog lists /livesnap/vol.tar, empty');
  t.is(b.errors, 1);
  t.regex(b.log, /^\s*Non-fatal FD errors:\s+1$/m);
  t.regex(b.log, /^\s*FD Bytes Written:\s+0 \(0 B\)$/m);
  // livesnap's message, as it printed it, then bpipe's note of its exit status.
  t.regex(b.log, new RegExp(`lstest-fd JobId ${b.jobId}: /livesnap/vol\\.tar: [^]*livesnap: error: ${vol.loop} is mounted read-write at ${vol.mnt}: an offline copy would not be one instant`));
  t.regex(b.log, closeError('vol'));
  // The RunScript's alert did fire (MailOnError would not: JobStatus is T).
  t.is(fs.readFileSync(path.join(dir, `alert-${b.jobId}`), 'utf8'), `livesnap backup backup-vol JobId ${b.jobId}: 1 errors, 0 bytes\n`);

  // With "livesnap backup ... --check" as the client's run-before step the same refusal fails the job.
  const site2 = await baculaSite(t, path.join(dir, 'bacula-check'), [{ name: 'vol', device: vol.loop, before: `${process.execPath} ${BIN} backup ${vol.loop} --to - --check` }]);
  const c = await site2.runJob('backup-vol');
  t.log(`with --check before: JobStatus ${c.status}, JobBytes ${c.bytes}, "${c.termination}"`);
  t.is(c.status, 'f', c.log);
  t.is(c.bytes, 0);
  t.regex(c.log, new RegExp(`livesnap: error: ${vol.loop} is mounted read-write at ${vol.mnt}`));
  await site2.stop();

  // Restoring that empty file fails loudly: livesnap refuses it and the restore job is in error.
  const where = path.join(dir, 'restore-1');
  fs.mkdirSync(where);
  const r = await site.restore(b.jobId, where);
  t.log(`restore job ${r.jobId}: JobStatus ${r.status}, "${r.termination}"`);
  t.is(r.status, 'E', r.log);
  t.is(r.termination, '*** Restore Error ***');
  t.regex(r.log, /\/livesnap\/vol\.tar: [^]*livesnap: error: not a livesnap archive: the input is empty/);
  t.regex(r.log, closeError('vol'));
  t.deepEqual(fs.readdirSync(where), [], 'nothing that looks like an image is left');
});

needsBadBlocks('livesnap failing half-way (an unreadable block): "OK -- with warnings" with bytes > 0, so the byte count alone does not tell', async (t) => {
  const dir = scratchDir(t);
  // No file system: every block is used. Block 15000 of 16384 is unreadable, so livesnap streams
  // tens of MiB before it stops (--on-error abort, the default).
  const image = path.join(dir, 'source.img');
  const data = Buffer.alloc(64 << 20);
  for (let i = 0; i < data.length; i += 512) data.writeUInt32LE(i / 512 + 1, i);
  fs.writeFileSync(image, data);
  const dev = await deviceWithBadRanges(t, dir, image, [[15000 * 4096, 4096]]);
  const site = await baculaSite(t, path.join(dir, 'bacula'), [{ name: 'disk', device: dev }]);
  const b = await site.runJob('backup-disk');
  t.log(`backup job ${b.jobId}: JobStatus ${b.status}, JobBytes ${b.bytes}, JobErrors ${b.errors}, "${b.termination}"`);
  t.log(b.log.split('\n').filter((l) => /livesnap|bpipe|Non-fatal|Bytes Written|Termination/.test(l)).join('\n'));
  t.is(b.status, 'T');
  t.is(b.termination, 'Backup OK -- with warnings');
  t.true(b.bytes > 0 && b.bytes < data.length, `JobBytes ${b.bytes}: part of the volume`);
  t.is(b.errors, 1);
  t.regex(b.log, /livesnap: error: .*block 15000 \(byte offset 61440000\) of .* cannot be read/);
  t.regex(b.log, closeError('disk'));

  // The stored part has no trailer: a restore refuses it, and the restore job is in error.
  const where = path.join(dir, 'restore-1');
  fs.mkdirSync(where);
  const r = await site.restore(b.jobId, where);
  t.log(`restore job ${r.jobId}: JobStatus ${r.status}, "${r.termination}"`);
  t.log(r.log.split('\n').filter((l) => /livesnap|bpipe/.test(l)).join('\n'));
  t.is(r.status, 'E', r.log);
  t.is(r.termination, '*** Restore Error ***');
  t.regex(r.log, /\/livesnap\/disk\.tar: [^]*livesnap: error: archive truncated at archive offset \d+/);
  t.false(fs.existsSync(path.join(where, 'disk.img')), 'no image that looks complete');
});
