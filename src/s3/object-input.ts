// An S3 object as the archive reader's input: ranged GETs in order, each resumed where it broke off
// (up to `retries` times in a row, with back-off), every one pinned to the ETag first seen so that
// an object replaced during a restore is an error, not a splice of two archives.
import type { S3Client } from '@aws-sdk/client-s3';
import { s3Error } from './errors';
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

export async function headObject(client: S3Client, loc: S3Location): Promise<ObjectHead> {
  const url = s3Url(loc);
  const { HeadObjectCommand } = s3sdk();
  try {
    const h = await client.send(new HeadObjectCommand({ Bucket: loc.bucket, Key: loc.key }));
    return { size: Number(h.ContentLength ?? 0), etag: h.ETag ?? '' };
  } catch (e) {
    throw s3Error(e, `reading ${url}`, url);
  }
}

export async function* readObject(client: S3Client, loc: S3Location, o: ObjectInputOptions = {}): AsyncGenerator<Uint8Array> {
  const url = s3Url(loc);
  const head = await headObject(client, loc);
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
        throw s3Error(new Error(`${url} was replaced while it was read (its ETag changed)`), 'restore', url);
      }
      const status = x.$metadata?.httpStatusCode ?? 0;
      if ((status >= 400 && status < 500 && status !== 408 && status !== 429) || ++failures > retries) throw s3Error(e, `reading ${url} at byte ${off}`, url);
      o.onRetry?.(off, failures, e as Error);
      await new Promise((res) => setTimeout(res, Math.min(8000, 250 * 2 ** failures)));
    }
  }
}
