// Archives into and out of S3, against a real Ceph RADOS Gateway (test/rgw, one per test file):
// offline and online (incremental) backups uploaded while they are made and restored byte for
// byte; the gateway stopped mid-upload (the job fails clearly, no object, nothing left after
// "livesnap s3 abort"); Ctrl-C (the upload is aborted by the backup itself); wrong credentials, a
// missing bucket, an object that is not an archive; the appliance's s3:// store.
import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN } from './helpers/cli';
import { keyFile } from './helpers/appliance';
import { cli, lastJsonOf, QemuIo, serveDevice, sleep } from './helpers/online';
import { AWS_CLI, rgwRequirements, startRgw, type Rgw } from './helpers/rgw';
import { requirements } from './helpers/skip';
import { loopDevice, run, scratchDir, seedFromEnv, rng } from './helpers/system';
import { makeVolume } from './helpers/volumes';

const MiB = 1 << 20;
const why = requirements({ root: true, commands: [...rgwRequirements.commands, '/usr/bin/aws', 'mkfs.ext4', 'qemu-io', 'losetup'] });
let gw: Rgw | undefined;

const s3test = (title: string, fn: (t: ExecutionContext, gw: Rgw) => Promise<void>) => {
  if (why) { console.log(`# SKIP ${title}: ${why}`); test.skip(`${title} (skipped: ${why})`, () => {}); return; }
  test.serial(title, (t) => fn(t, gw!));
};

if (!why) {
  test.before(async () => { gw = await startRgw(); });
  test.after.always(async () => { await gw?.stop(); });
}

const sha = (file: string) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

/** The AWS CLI against the gateway (the reference client: it never goes through livesnap's code). */
function aws(g: Rgw, args: string[]): string {
  return run(AWS_CLI, ['--endpoint-url', g.endpoint, ...args], { env: { ...process.env, ...g.env } });
}
function awsStatus(g: Rgw, args: string[]): number {
  const { spawnSync } = require('node:child_process') as typeof import('node:child_process'); // eslint-disable-line @typescript-eslint/no-require-imports
  return spawnSync(AWS_CLI, ['--endpoint-url', g.endpoint, ...args], { env: { ...process.env, ...g.env }, stdio: 'ignore' }).status ?? -1;
}
const uploadsOf = (g: Rgw, bucket: string): unknown[] => (JSON.parse(aws(g, ['s3api', 'list-multipart-uploads', '--bucket', bucket, '--output', 'json']) || '{}') as { Uploads?: unknown[] }).Uploads ?? [];

/** The CLI as a child the test can signal, its stderr kept; killed at teardown if still running. */
function startCli(t: ExecutionContext, g: Rgw, args: string[], env: NodeJS.ProcessEnv = {}) {
  const child = spawn(process.execPath, [BIN, ...args], { env: { ...process.env, ...g.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => { if (child.exitCode === null) child.kill('SIGKILL'); });
  const out = { child, stderr: '', exit: new Promise<number | null>((res) => child.once('close', (c) => res(c))) };
  child.stderr.on('data', (x) => (out.stderr += x));
  return out;
}

/** Waits until the bucket has a multipart upload in progress (the first part is on the server). */
async function uploadStarted(g: Rgw, b: string): Promise<void> {
  const end = Date.now() + 30_000;
  while (uploadsOf(g, b).length === 0 && Date.now() < end) await sleep(200);
}

let buckets = 0;
function bucket(g: Rgw): string {
  const b = `lsnap-${process.pid}-${++buckets}`;
  aws(g, ['s3', 'mb', `s3://${b}`]);
  return b;
}

const ls = (g: Rgw, args: string[], env: NodeJS.ProcessEnv = {}) => cli(args, { ...g.env, ...env });

s3test('offline backup to s3:// and back: restore and verify byte-exact, the object only once complete, an existing key kept unless --force', async (t, g) => {
  const dir = scratchDir(t, 'livesnap-s3-');
  const vol = makeVolume(t, dir, { sizeMiB: 96, mkfs: ['mkfs.ext4', '-q', '-F'], seed: seedFromEnv(t), dataMiB: 40 });
  const b = bucket(g);
  const url = `s3://${b}/host1/data.tar`;
  const r = await ls(g, ['backup', vol.loop, '--to', url, '--s3-part-size', '8M']);
  t.is(r.status, 0, r.stderr);
  t.regex(r.stderr, /uploading to s3:\/\/.* in parts of 8\.00 MiB, 4 at once \(40\.0 MiB of memory\)/);
  t.deepEqual(uploadsOf(g, b), [], 'no upload left open');
  const local = path.join(dir, 'local.tar');
  t.is((await ls(g, ['backup', vol.loop, '--to', local])).status, 0);
  // The object is an archive any tar reads: the same image as a local archive of the same volume.
  const obj = path.join(dir, 'obj.tar');
  aws(g, ['s3', 'cp', url, obj]);
  for (const [name, f] of [['obj', obj], ['local', local]] as const) { fs.mkdirSync(path.join(dir, name)); run('tar', ['-xSf', f, '-C', path.join(dir, name)]); }
  t.is(sha(path.join(dir, 'obj/disk.img')), sha(path.join(dir, 'local/disk.img')));
  const target = path.join(dir, 'restored.img');
  const rs = await ls(g, ['restore', url, '--to', target, '--json']);
  t.is(rs.status, 0, rs.stderr);
  t.is(sha(target), sha(vol.loop), 'restored from S3 = the volume');
  const v = await ls(g, ['verify', url, '--against', vol.loop, '--json']);
  t.is(v.status, 0, v.stderr + v.stdout);
  t.is(lastJsonOf(v.stdout).match, true);
  const again = await ls(g, ['backup', vol.loop, '--to', url]);
  t.is(again.status, 1);
  t.regex(again.stderr, /target s3:\/\/.*data\.tar already exists[\s\S]*--force/);
  t.is((await ls(g, ['backup', vol.loop, '--to', url, '--force'])).status, 0);
  // An archive smaller than a part goes up in one PUT.
  fs.mkdirSync(path.join(dir, 's'));
  const small = makeVolume(t, path.join(dir, 's'), { sizeMiB: 16, mkfs: ['mkfs.ext4', '-q', '-F'], seed: 5, dataMiB: 1 });
  t.is((await ls(g, ['backup', small.loop, '--to', `s3://${b}/small.tar`])).status, 0);
  const sr = path.join(dir, 'small.img');
  t.is((await ls(g, ['restore', `s3://${b}/small.tar`, '--to', sr])).status, 0);
  t.is(sha(sr), sha(small.loop));
});

s3test('online incremental chain to s3://: the full backup and an incremental restore to the volume as it was', async (t, g) => {
  const dir = scratchDir(t, 'livesnap-s3-online-');
  const size = 64 * MiB;
  const vol = path.join(dir, 'vol.raw');
  fs.writeFileSync(vol, crypto.randomBytes(size));
  const served = await serveDevice(t, dir, vol, 'data');
  const b = bucket(g);
  const full = await ls(g, ['backup', 'data', '--incremental', '--to', `s3://${b}/full.tar`, '--control', served.control, '--json']);
  t.is(full.status, 0, `${full.stderr}\n${served.logTail()}`);
  t.is((lastJsonOf(full.stdout).chain as { kind: string }).kind, 'full');
  const fill = path.join(dir, 'fill.bin');
  fs.writeFileSync(fill, Buffer.alloc(3 * MiB, 0x5a));
  const q = new QemuIo(t, served.uri);
  await q.write(fill, 10 * MiB + 4096, 3 * MiB);
  await q.quit();
  const inc = await ls(g, ['backup', 'data', '--incremental', '--to', `s3://${b}/inc.tar`, '--control', served.control, '--json']);
  t.is(inc.status, 0, `${inc.stderr}\n${served.logTail()}`);
  const d = lastJsonOf(inc.stdout);
  t.is((d.chain as { kind: string }).kind, 'incremental');
  t.true(Number(d.bytes) <= 4 * MiB, `the incremental holds ${d.bytes} bytes`);
  const target = path.join(dir, 'chain.img');
  const r = await ls(g, ['restore', `s3://${b}/full.tar`, `s3://${b}/inc.tar`, '--to', target]);
  t.is(r.status, 0, r.stderr);
  t.is(sha(target), sha(vol), 'the chain from S3 restores the volume');
  const v = await ls(g, ['verify', `s3://${b}/full.tar`, `s3://${b}/inc.tar`]);
  t.is(v.status, 0, v.stderr);
  t.deepEqual(uploadsOf(g, b), []);
});

s3test('the gateway stopped mid-upload: the backup fails saying so, no object appears, "livesnap s3 abort" leaves no upload behind', async (t, g) => {
  const dir = scratchDir(t, 'livesnap-s3-cut-');
  const vol = path.join(dir, 'vol.raw');
  fs.writeFileSync(vol, crypto.randomBytes(256 * MiB));
  const b = bucket(g);
  const url = `s3://${b}/cut.tar`;
  const run1 = startCli(t, g, ['backup', vol, '--format', 'tar', '--to', url, '--max-rate', '24M', '--s3-part-size', '8M', '--json']);
  // Parts are on the server: then the gateway goes away.
  await uploadStarted(g, b);
  t.is(uploadsOf(g, b).length, 1, 'the upload started');
  await sleep(1500);
  await g.stopGateway();
  t.is(await run1.exit, 1, run1.stderr);
  t.regex(run1.stderr, /S3 endpoint .* could not be reached or stopped answering/);
  await g.startGateway();
  t.not(awsStatus(g, ['s3api', 'head-object', '--bucket', b, '--key', 'cut.tar']), 0, 'no object');
  const left = await ls(g, ['s3', 'uploads', url, '--json']);
  t.is(left.status, 0, left.stderr);
  t.is((lastJsonOf(left.stdout).uploads as unknown[]).length, 1, 'the parts stayed: the server was down when the backup tried to abort');
  const ab = await ls(g, ['s3', 'abort', url]);
  t.is(ab.status, 0, ab.stderr);
  t.regex(ab.stderr, /aborted 1 incomplete upload/);
  t.deepEqual(uploadsOf(g, b), [], 'nothing left after the cleanup');
});

s3test('the gateway killed and restarted mid-restore: the ranged GET resumes where it broke off, the image is exact', async (t, g) => {
  const dir = scratchDir(t, 'livesnap-s3-resume-');
  const vol = path.join(dir, 'vol.raw');
  fs.writeFileSync(vol, crypto.randomBytes(384 * MiB));
  const b = bucket(g);
  // --s3-endpoint instead of the environment's AWS_ENDPOINT_URL.
  const noEnv = { AWS_ENDPOINT_URL: '' };
  t.is((await ls(g, ['backup', vol, '--format', 'tar', '--to', `s3://${b}/r.tar`, '--s3-endpoint', g.endpoint], noEnv)).status, 0);
  const target = path.join(dir, 'r.img');
  const run1 = startCli(t, g, ['restore', `s3://${b}/r.tar`, '--to', target, '--s3-endpoint', g.endpoint], noEnv);
  const child = run1.child;
  const partial = `${target}.partial`;
  const end = Date.now() + 60_000;
  const written = () => { try { return fs.statSync(partial).blocks * 512; } catch { return 0; } };
  while (written() < 48 * MiB && child.exitCode === null && Date.now() < end) await sleep(10);
  t.is(child.exitCode, null, 'still restoring when the gateway goes');
  await g.stopGateway({ kill: true });
  await sleep(500);
  await g.startGateway();
  t.is(await run1.exit, 0, run1.stderr);
  t.regex(run1.stderr, /note: reading s3:\/\/.*r\.tar broke off at byte \d+ .*: retry 1 of 5/);
  t.is(sha(target), sha(vol));
});

s3test('Ctrl-C during an upload: the backup aborts its own multipart upload; no object, no parts', async (t, g) => {
  const dir = scratchDir(t, 'livesnap-s3-int-');
  const vol = path.join(dir, 'vol.raw');
  fs.writeFileSync(vol, crypto.randomBytes(128 * MiB));
  const b = bucket(g);
  const run1 = startCli(t, g, ['backup', vol, '--format', 'tar', '--to', `s3://${b}/int.tar`, '--max-rate', '24M', '--s3-part-size', '5M']);
  await uploadStarted(g, b);
  await sleep(800);
  run1.child.kill('SIGINT');
  t.is(await run1.exit, 130, run1.stderr);
  t.regex(run1.stderr, /backup cancelled, aborting the S3 upload/);
  t.deepEqual(uploadsOf(g, b), []);
  t.not(awsStatus(g, ['s3api', 'head-object', '--bucket', b, '--key', 'int.tar']), 0, 'no object');
});

s3test('wrong credentials, a missing bucket, a missing key, an object that is not an archive: refused with what to check', async (t, g) => {
  const dir = scratchDir(t, 'livesnap-s3-bad-');
  const vol = path.join(dir, 'vol.raw');
  fs.writeFileSync(vol, crypto.randomBytes(8 * MiB));
  const b = bucket(g);
  const wrong = await ls(g, ['backup', vol, '--format', 'tar', '--to', `s3://${b}/x.tar`], { AWS_SECRET_ACCESS_KEY: 'not-the-secret' });
  t.is(wrong.status, 1);
  t.regex(wrong.stderr, /the S3 server refused the credentials for s3:\/\/.*x\.tar[\s\S]*hint: check AWS_ACCESS_KEY_ID/);
  const nob = await ls(g, ['backup', vol, '--format', 'tar', '--to', 's3://no-such-bucket-here/x.tar']);
  t.is(nob.status, 1);
  t.regex(nob.stderr, /the bucket of s3:\/\/no-such-bucket-here\/x\.tar does not exist/);
  const nok = await ls(g, ['restore', `s3://${b}/nothing.tar`, '--to', path.join(dir, 'r.img')]);
  t.is(nok.status, 1);
  t.regex(nok.stderr, /there is no object s3:\/\/.*nothing\.tar/);
  fs.writeFileSync(path.join(dir, 'notes.txt'), 'just some text, not an archive\n'.repeat(100));
  aws(g, ['s3', 'cp', path.join(dir, 'notes.txt'), `s3://${b}/notes.tar`]);
  const nota = await ls(g, ['restore', `s3://${b}/notes.tar`, '--to', path.join(dir, 'r.img')]);
  t.is(nota.status, 1);
  t.regex(nota.stderr, /not a livesnap archive/);
  t.false(fs.existsSync(path.join(dir, 'r.img')));
  const raw = await ls(g, ['backup', vol, '--format', 'raw', '--to', `s3://${b}/x.img`]);
  t.regex(raw.stderr, /a raw image cannot go to S3/);
  const refused = await ls(g, ['backup', vol, '--format', 'tar', '--to', `s3://${b}/x.tar`], { AWS_ENDPOINT_URL: 'http://127.0.0.1:1' });
  t.is(refused.status, 1);
  t.regex(refused.stderr, /could not be reached/);
});

s3test('the appliance\'s --store s3://BUCKET/PREFIX: the archive it writes from the LUN is uploaded and restores to the instant', async (t, g) => {
  const dir = scratchDir(t, 'livesnap-s3-ap-');
  const size = 64 * MiB;
  const vol = path.join(dir, 'vol.raw');
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const data = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) data.writeUInt32LE(Math.floor(r() * 2 ** 32), i);
  fs.writeFileSync(vol, data);
  const served = await serveDevice(t, dir, vol, 'lun0');
  const key = await keyFile(dir);
  const lun = loopDevice(t, vol, { readOnly: true, directIo: true });
  const b = bucket(g);
  const port = 20000 + (process.pid % 9000);
  const ap = spawn(process.execPath, [BIN, 'appliance', '--listen', `127.0.0.1:${port}`, '--key', key, '--lun', `lun0=${lun}`, '--store', `s3://${b}/appliance/`, '--foreground', '--json'], { env: { ...process.env, ...g.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  ap.stdout.on('data', (x) => (out += x));
  ap.stderr.on('data', (x) => (err += x));
  const apExit = new Promise<void>((res) => ap.once('close', () => res()));
  t.teardown(async () => { if (ap.exitCode === null) { ap.kill('SIGTERM'); await apExit; } });
  const end = Date.now() + 15_000;
  while (!out.includes('"listening"')) { if (ap.exitCode !== null || Date.now() > end) throw new Error(`appliance did not start: ${err}`); await sleep(50); }
  const res = await ls(g, ['backup', 'lun0', '--to', `appliance://127.0.0.1:${port}`, '--key', key, '--control', served.control, '--json']);
  t.is(res.status, 0, `${res.stderr}\n${err}`);
  const output = String(lastJsonOf(res.stdout).output);
  t.regex(output, new RegExp(`^s3://${b}/appliance/lun0-.*\\.tar$`));
  const target = path.join(dir, 'r.img');
  const rs = await ls(g, ['restore', output, '--to', target]);
  t.is(rs.status, 0, rs.stderr);
  t.true(fs.readFileSync(target).equals(data), 'the appliance\'s S3 archive holds the LUN at the instant');
  t.deepEqual(uploadsOf(g, b), []);
  // A store whose bucket is missing is refused at start, not at the first backup.
  const bad = await ls(g, ['appliance', '--listen', `127.0.0.1:${port + 1}`, '--key', key, '--lun', `lun0=${lun}`, '--store', 's3://no-such-bucket-here/x/', '--foreground']);
  t.is(bad.status, 1);
  t.regex(bad.stderr, /bucket of s3:\/\/no-such-bucket-here\/x\/ does not exist/);
});

s3test('TLS to the endpoint is verified: a gateway whose CA is not trusted is refused, AWS_CA_BUNDLE trusts it', async (t) => {
  const tls = await startRgw({ tls: true });
  t.teardown(() => tls.stop());
  const dir = scratchDir(t, 'livesnap-s3-tls-');
  const vol = path.join(dir, 'vol.raw');
  fs.writeFileSync(vol, crypto.randomBytes(4 * MiB));
  const b = bucket(tls);
  // Without the CA: only the system's trust store (the env of startRgw also sets NODE_EXTRA_CA_CERTS).
  const bare: NodeJS.ProcessEnv = { ...tls.env, AWS_CA_BUNDLE: '', NODE_EXTRA_CA_CERTS: '' };
  const refused = await cli(['backup', vol, '--format', 'tar', '--to', `s3://${b}/v.tar`], bare);
  t.is(refused.status, 1);
  t.regex(refused.stderr, /TLS certificate of the S3 endpoint .* was not trusted[\s\S]*AWS_CA_BUNDLE/);
  const ok = await cli(['backup', vol, '--format', 'tar', '--to', `s3://${b}/v.tar`], { ...bare, AWS_CA_BUNDLE: tls.ca });
  t.is(ok.status, 0, ok.stderr);
  const r = await cli(['restore', `s3://${b}/v.tar`, '--to', path.join(dir, 'r.img')], { ...bare, AWS_CA_BUNDLE: tls.ca });
  t.is(r.status, 0, r.stderr);
  t.is(sha(path.join(dir, 'r.img')), sha(vol));
});
