// An S3 object as the archive reader's input: ranged GETs in order, each resumed where it broke off
// (up to `retries` times in a row, with back-off), every one pinned to the ETag first seen so that
// an object replaced during a restore is an error, not a splice of two archives.
import type { S3Client } from '@aws-sdk/client-s3';
import { UserError } from '../util/errors';
import { isNotFound, s3Error } from './errors';
import { s3sdk } from './client';
import { s3Url, type S3Location } from './location';

export interface ObjectInputOptions {
  /** Bytes per GET (default 64 MiB). */
  rangeBytes?: number;
  /** Attempts in a row at one offset before the restore fails (default 5). */
  retries?: number;
  onRetry?: (offset: number, attempt: number, e: Error) => void;
}

export interface ObjectHead { size: number; etag: string }

/** The object's size and ETag, or undefined when there is none (any other failure is thrown). */
export async function headObject(client: S3Client, loc: S3Location, what: string): Promise<ObjectHead | undefined> {
  const { HeadObjectCommand } = s3sdk();
  try {
    const h = await client.send(new HeadObjectCommand({ Bucket: loc.bucket, Key: loc.key }));
    return { size: Number(h.ContentLength ?? 0), etag: h.ETag ?? '' };
  } catch (e) {
    if (isNotFound(e)) return undefined;
    throw s3Error(e, what, s3Url(loc));
  }
}

export async function* readObject(client: S3Client, loc: S3Location, o: ObjectInputOptions = {}): AsyncGenerator<Uint8Array> {
  const url = s3Url(loc);
  const head = await headObject(client, loc, `reading ${url}`);
  if (!head) throw new UserError(`reading ${url}: there is no object ${url}`, 'check the key ("aws s3 ls s3://BUCKET/PREFIX" lists them) and the endpoint');
  const range = o.rangeBytes ?? 64 << 20;
  const retries = o.retries ?? 5;
  const { GetObjectCommand } = s3sdk();
  let off = 0, failures = 0;
  while (off < head.size) {
    const end = Math.min(head.size, off + range) - 1;
    try {
      const r = await client.send(new GetObjectCommand({ Bucket: loc.bucket, Key: loc.key, Range: `bytes=${off}-${end}`, ...(head.etag ? { IfMatch: head.etag } : {}) }));
      for await (const chunk of r.Body as AsyncIterable<Uint8Array>) {
        off += chunk.length;
        failures = 0;
        yield chunk;
      }
      if (off <= end) throw new Error(`the GET of bytes ${off}-${end} ended early`);
    } catch (e) {
      const x = e as { name?: string; $metadata?: { httpStatusCode?: number } };
      if (x.name === 'PreconditionFailed' || x.$metadata?.httpStatusCode === 412) {
        throw new UserError(`${url} was replaced while it was read (its ETag changed): this restore mixed two archives and is abandoned`, 'rerun it once nothing writes that key');
      }
      const status = x.$metadata?.httpStatusCode ?? 0;
      if ((status >= 400 && status < 500 && status !== 408 && status !== 429) || ++failures > retries) throw s3Error(e, `reading ${url} at byte ${off}`, url);
      o.onRetry?.(off, failures, e as Error);
      await new Promise((res) => setTimeout(res, Math.min(8000, 250 * 2 ** failures)));
    }
  }
}
