// "s3://BUCKET/KEY" (an archive) and "s3://BUCKET/PREFIX" (the appliance's store), checked against
// S3's own naming rules before any request, so a typo fails with a message instead of a 400.
import { UserError } from '../util/errors';

export interface S3Location {
  readonly bucket: string;
  /** The object key (for a prefix: '' or ending in '/'). */
  readonly key: string;
}

export const isS3Url = (s: string): boolean => s.startsWith('s3://');

export const s3Url = (l: S3Location): string => `s3://${l.bucket}/${l.key}`;

const BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

/** Parses an object URL; `prefix` accepts an empty or "/"-ended key and makes it end in "/". */
export function parseS3Url(s: string, opts: { prefix?: boolean } = {}): S3Location {
  const what = opts.prefix ? 's3://BUCKET/PREFIX' : 's3://BUCKET/KEY';
  if (!isS3Url(s)) throw new UserError(`"${s}" is not an S3 URL`, `write it as ${what}`);
  const rest = s.slice('s3://'.length);
  const slash = rest.indexOf('/');
  const bucket = slash < 0 ? rest : rest.slice(0, slash);
  let key = slash < 0 ? '' : rest.slice(slash + 1);
  if (!BUCKET.test(bucket) || bucket.includes('..') || /^\d+\.\d+\.\d+\.\d+$/.test(bucket)) {
    throw new UserError(`"${bucket}" in ${s} is not a valid S3 bucket name`, 'bucket names are 3 to 63 characters: lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit');
  }
  if (opts.prefix) {
    if (key !== '' && !key.endsWith('/')) key += '/';
  } else {
    if (key === '' || key.endsWith('/')) throw new UserError(`${s} names no object (the key after the bucket is ${key === '' ? 'empty' : 'a "folder"'})`, `write ${what}, e.g. s3://${bucket}/backups/data.tar`);
  }
  if (Buffer.byteLength(key) > 1024) throw new UserError(`the key in ${s} is ${Buffer.byteLength(key)} bytes long; S3 allows 1024`, 'use a shorter key');
  // eslint-disable-next-line no-control-regex -- control characters are what is refused
  if (/[\u0000-\u001f\u007f]/.test(key)) throw new UserError(`the key in ${s} has control characters`, 'use printable characters in S3 keys');
  return { bucket, key };
}
