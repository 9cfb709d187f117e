// Incomplete multipart uploads under a key or prefix: what a backup leaves when it could not abort
// its own upload (the server was unreachable then). Listed and aborted on request, never guessed at.
import { makeS3Client, s3sdk } from './client';
import { s3Error } from './errors';
import { parseS3Url, s3Url } from './location';
import type { S3Options } from './options';

export interface PendingUpload { key: string; uploadId: string; initiated: string | null }

/** Uploads whose key is `url`'s key or starts with it (an s3://BUCKET/PREFIX/ or a whole key). */
export async function listUploads(url: string, opts: S3Options = {}): Promise<PendingUpload[]> {
  const loc = parseS3Url(url, { prefix: url.endsWith('/') || !url.slice(5).includes('/') });
  const client = await makeS3Client({ endpoint: opts.endpoint });
  const { ListMultipartUploadsCommand } = s3sdk();
  const out: PendingUpload[] = [];
  try {
    let keyMarker: string | undefined, idMarker: string | undefined;
    for (;;) {
      const r = await client.send(new ListMultipartUploadsCommand({ Bucket: loc.bucket, Prefix: loc.key || undefined, KeyMarker: keyMarker, UploadIdMarker: idMarker }));
      for (const u of r.Uploads ?? []) if (u.Key && u.UploadId) out.push({ key: u.Key, uploadId: u.UploadId, initiated: u.Initiated ? u.Initiated.toISOString() : null });
      if (!r.IsTruncated) break;
      keyMarker = r.NextKeyMarker;
      idMarker = r.NextUploadIdMarker;
    }
    return out;
  } catch (e) {
    throw s3Error(e, `listing the uploads under ${s3Url(loc)}`, s3Url(loc));
  } finally {
    client.destroy();
  }
}

export async function abortUploads(url: string, uploads: PendingUpload[], opts: S3Options = {}): Promise<void> {
  const loc = parseS3Url(url, { prefix: true });
  const client = await makeS3Client({ endpoint: opts.endpoint });
  const { AbortMultipartUploadCommand } = s3sdk();
  try {
    for (const u of uploads) {
      try {
        await client.send(new AbortMultipartUploadCommand({ Bucket: loc.bucket, Key: u.key, UploadId: u.uploadId }));
      } catch (e) {
        const x = e as { name?: string };
        if (x.name !== 'NoSuchUpload') throw s3Error(e, `aborting the upload ${u.uploadId} of s3://${loc.bucket}/${u.key}`, `s3://${loc.bucket}/${u.key}`);
      }
    }
  } finally {
    client.destroy();
  }
}
