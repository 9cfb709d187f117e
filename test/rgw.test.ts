// The test S3 server itself (test/helpers/rgw.ts, test/rgw/rgw-up): a real Ceph RADOS Gateway comes
// up from nothing, stores and returns an object through the awscli (a multipart upload), survives a
// restart of the gateway alone, and serves https with its own CA. Prints how long bring-up took and
// what the daemons take in memory.
import test from 'ava';
import { execFile } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { AWS_CLI, type Rgw, rgwRequirements, rgwTlsRequirements, startRgw } from './helpers/rgw';
import { requirements, serialIf } from './helpers/skip';

const execFileP = promisify(execFile);
const needs = { commands: [...rgwRequirements.commands, '/usr/bin/aws'] };
const check = serialIf(needs);
const checkTls = serialIf({ commands: [...rgwTlsRequirements.commands, '/usr/bin/aws'] });

const mib = (bytes: number): string => (bytes / 2 ** 20).toFixed(0);

let rgw: Rgw | undefined;

test.before(async () => {
  if (requirements(needs)) return;
  rgw = await startRgw();
  console.log(`# rgw: up in ${(rgw.startupMs / 1000).toFixed(1)} s, daemons' RSS ${mib(rgw.rss())} MiB (pids ${rgw.pids().join(' ')})`);
});

test.after.always(async () => {
  await rgw?.stop();
});

/** The awscli against `g` (Debian 12's awscli 2.9 ignores AWS_ENDPOINT_URL, hence --endpoint-url). */
async function aws(g: Rgw, args: string[], env: NodeJS.ProcessEnv = {}): Promise<string> {
  const extra = g.ca ? ['--ca-bundle', g.ca] : [];
  const { stdout } = await execFileP(AWS_CLI, ['--endpoint-url', g.endpoint, ...extra, ...args], { env: { ...g.env, ...env }, maxBuffer: 64 << 20, timeout: 120_000 });
  return stdout;
}

const sha = (file: string): string => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

check('rgw: a bucket, and an object put and got back with the awscli (multipart)', async (t) => {
  const g = rgw!;
  t.log(`up in ${(g.startupMs / 1000).toFixed(1)} s at ${g.endpoint}; RSS now ${mib(g.rss())} MiB`);
  await aws(g, ['s3', 'mb', 's3://livesnap']);
  t.regex(await aws(g, ['s3', 'ls']), /\slivesnap$/m);

  // 20 MiB: above the awscli's 8 MiB multipart threshold, so the upload is three parts.
  const src = path.join(g.dir, 'tmp', 'src');
  const back = path.join(g.dir, 'tmp', 'back');
  fs.writeFileSync(src, crypto.randomBytes(20 << 20));
  await aws(g, ['s3', 'cp', '--only-show-errors', src, 's3://livesnap/obj']);
  const head = JSON.parse(await aws(g, ['s3api', 'head-object', '--bucket', 'livesnap', '--key', 'obj'])) as { ContentLength: number; ETag: string };
  t.is(head.ContentLength, 20 << 20);
  t.regex(head.ETag, /-3"$/, 'a multipart ETag names its parts');
  await aws(g, ['s3', 'cp', '--only-show-errors', 's3://livesnap/obj', back]);
  t.is(sha(back), sha(src));
  fs.rmSync(src);
  fs.rmSync(back);
  t.log(`RSS after 20 MiB up and down: ${mib(g.rss())} MiB`);
});

check('rgw: the gateway alone goes away and comes back, the data stays', async (t) => {
  const g = rgw!;
  const before = g.pids();
  await g.stopGateway({ kill: true });
  t.is(g.pids().length, before.length - 1);
  await t.throwsAsync(aws(g, ['s3', 'ls', '--cli-connect-timeout', '2'], { AWS_MAX_ATTEMPTS: '1' }));
  await g.startGateway();
  t.is(g.pids().length, before.length);
  t.regex(await aws(g, ['s3', 'ls', 's3://livesnap/']), /\s20971520 obj$/m);
});

checkTls('rgw: --tls serves https with its own CA, beside the first cluster', async (t) => {
  const g = await startRgw({ tls: true });
  t.teardown(() => g.stop());
  t.log(`https cluster up in ${(g.startupMs / 1000).toFixed(1)} s at ${g.endpoint}; RSS ${mib(g.rss())} MiB`);
  t.true(g.endpoint.startsWith('https://127.0.0.1:'));
  t.truthy(g.ca && fs.existsSync(g.ca));
  await aws(g, ['s3', 'mb', 's3://tls']);
  t.regex(await aws(g, ['s3', 'ls']), /\stls$/m);
  // Without the CA the certificate is not trusted.
  const { AWS_CA_BUNDLE: _, ...untrusted } = g.env;
  await t.throwsAsync(execFileP(AWS_CLI, ['--endpoint-url', g.endpoint, 's3', 'ls'], { env: { ...untrusted, AWS_MAX_ATTEMPTS: '1' }, timeout: 60_000 }));
});
