// The S3 pieces that need no server: URLs, options, the part plan (S3's 10,000-part limit).
import test from 'ava';
import { parseS3Url } from '../src/s3/location';
import { parseS3Options } from '../src/s3/options';
import { S3_MAX_PARTS, S3_MAX_PART, planParts } from '../src/s3/multipart-output';
import { UserError } from '../src/util/errors';
import { rng, seedFromEnv } from './helpers/system';

const MiB = 2 ** 20, GiB = 2 ** 30, TiB = 2 ** 40;
const dflt = { minPart: 16 * MiB, inFlight: 4, memoryLimit: GiB };

test('s3:// URLs: bucket and key checked against S3\'s rules with messages that say what to write', (t) => {
  t.deepEqual(parseS3Url('s3://backups/host1/data.tar'), { bucket: 'backups', key: 'host1/data.tar' });
  t.deepEqual(parseS3Url('s3://backups', { prefix: true }), { bucket: 'backups', key: '' });
  t.deepEqual(parseS3Url('s3://backups/nightly', { prefix: true }), { bucket: 'backups', key: 'nightly/' });
  t.throws(() => parseS3Url('s3://backups'), { message: /names no object \(the key after the bucket is empty\)/ });
  t.throws(() => parseS3Url('s3://backups/dir/'), { message: /names no object/ });
  t.throws(() => parseS3Url('s3://Backups/x'), { message: /"Backups" in s3:\/\/Backups\/x is not a valid S3 bucket name/ });
  t.throws(() => parseS3Url('s3://ab/x'), { message: /not a valid S3 bucket name/ });
  t.throws(() => parseS3Url('s3://1.2.3.4/x'), { message: /not a valid S3 bucket name/ });
  t.throws(() => parseS3Url('s3://a..b/x'), { message: /not a valid S3 bucket name/ });
  t.throws(() => parseS3Url(`s3://bucket/${'k'.repeat(1025)}`), { message: /1025 bytes long; S3 allows 1024/ });
  t.throws(() => parseS3Url('s3://bucket/a\nb'), { message: /control characters/ });
  t.throws(() => parseS3Url('http://bucket/a'), { message: /is not an S3 URL/ });
});

test('s3:// URLs, fuzzed: every input is a location or a UserError, never a crash', (t) => {
  const rand = rng(seedFromEnv(t));
  const alphabet = 'abcz09.-/_:\\ \n\u00e9A/';
  for (let i = 0; i < 5000; i++) {
    let s = 's3://';
    const n = Math.floor(rand() * 80);
    for (let j = 0; j < n; j++) s += alphabet[Math.floor(rand() * alphabet.length)];
    for (const prefix of [false, true]) {
      try {
        const l = parseS3Url(s, { prefix });
        t.true(/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(l.bucket), s);
        if (prefix) t.true(l.key === '' || l.key.endsWith('/'), s); else t.true(l.key.length > 0 && !l.key.endsWith('/'), s);
      } catch (e) {
        if (!(e instanceof UserError)) t.fail(`${JSON.stringify(s)}: ${String(e)}`);
      }
    }
  }
  t.pass();
});

test('--s3-* options: sizes and counts in range, or an error naming the option', (t) => {
  t.deepEqual(parseS3Options({ partSize: '64M', parallel: '8', endpoint: 'https://s3.example.com' }), { partSize: 64 * MiB, parallel: 8, endpoint: 'https://s3.example.com' });
  t.throws(() => parseS3Options({ partSize: '4M' }), { message: /--s3-part-size 4M: S3 parts are 5 MiB to 5 GiB/ });
  t.throws(() => parseS3Options({ partSize: '6G' }), { message: /--s3-part-size 6G/ });
  t.throws(() => parseS3Options({ parallel: '0' }), { message: /--s3-parallel 0: give a whole number from 1 to 64/ });
  t.throws(() => parseS3Options({ endpoint: 'ftp://x' }), { message: /--s3-endpoint "ftp:\/\/x" is not an http\(s\) URL/ });
});

test('part plan: any archive fits in S3\'s 10,000 parts; memory is (in flight + 1) x part and stays within the limit where it can', (t) => {
  const small = planParts(100 * MiB, dflt);
  t.deepEqual([small.partSize, small.inFlight, small.memoryBytes], [16 * MiB, 4, 80 * MiB]);
  t.deepEqual(small.notes, []);
  for (const size of [GiB, 150 * GiB, 160 * GiB, TiB, 5 * TiB, 48 * TiB, 64 * TiB]) {
    const p = planParts(size, dflt);
    t.true(Math.ceil(size / p.partSize) <= S3_MAX_PARTS - 100, `${size}: ${Math.ceil(size / p.partSize)} parts of ${p.partSize}`);
    t.is(p.partSize % MiB, 0);
    t.true(p.partSize >= 16 * MiB);
    t.is(p.memoryBytes, (p.inFlight + 1) * p.partSize);
    t.true(p.inFlight >= 1 && p.inFlight <= 4);
    if (2 * p.partSize <= GiB) t.true(p.memoryBytes <= GiB, `${size}: memory ${p.memoryBytes}`);
  }
  // 64 TiB: parts of about 6.8 GiB, beyond AWS's 5 GiB part limit, and said so.
  const huge = planParts(64 * TiB, dflt);
  t.true(huge.partSize > S3_MAX_PART);
  t.is(huge.inFlight, 1);
  t.true(huge.notes.some((n) => /above AWS S3's 5 GiB limit/.test(n)), huge.notes.join('; '));
  // Unknown size: the asked-for part size.
  t.is(planParts(undefined, dflt).partSize, 16 * MiB);
});

test('a part larger than this Node\'s largest buffer is refused before any request, saying what to run instead', async (t) => {
  const { constants } = await import('node:buffer');
  const { S3Destination } = await import('../src/s3/destination');
  const d = new S3Destination('s3://backups/huge.tar');
  if (constants.MAX_LENGTH >= 8 * GiB) { t.pass('this Node holds 8 GiB buffers'); return; }
  await t.throwsAsync(d.open(64 * TiB), { message: /needs S3 parts of 6\.\d+ GiB .* holds at most 4\.00 GiB in one buffer/ });
});
