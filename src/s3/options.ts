// The --s3-* options, checked once (the SDK is not loaded for this: every command parses them).
import { UserError } from '../util/errors';
import { parseSize } from '../util/size';
import { checkEndpoint } from './endpoint';

export interface S3Options {
  /** --s3-endpoint URL. */
  endpoint?: string;
  /** --s3-part-size: the smallest part (default 16 MiB; larger when the archive needs it). */
  partSize?: number;
  /** --s3-parallel: parts uploaded at once (default 4). */
  parallel?: number;
}

export const S3_DEFAULT_PART = 16 << 20;
export const S3_DEFAULT_PARALLEL = 4;
/** Parts in flight are lowered to stay within this, unless one part alone is larger. */
export const S3_MEMORY_LIMIT = 1 << 30;

export function parseS3Options(o: { endpoint?: string; partSize?: string; parallel?: string }): S3Options {
  const out: { endpoint?: string; partSize?: number; parallel?: number } = {};
  if (o.endpoint !== undefined) out.endpoint = checkEndpoint(o.endpoint, '--s3-endpoint');
  if (o.partSize !== undefined) {
    const n = parseSize(o.partSize, '--s3-part-size');
    if (n < 5 << 20 || n > 5 * 1024 ** 3) throw new UserError(`--s3-part-size ${o.partSize}: S3 parts are 5 MiB to 5 GiB`, 'e.g. --s3-part-size 64M');
    out.partSize = n;
  }
  if (o.parallel !== undefined) {
    const n = Number(o.parallel);
    if (!Number.isInteger(n) || n < 1 || n > 64) throw new UserError(`--s3-parallel ${o.parallel}: give a whole number from 1 to 64`, 'e.g. --s3-parallel 4');
    out.parallel = n;
  }
  return out;
}
