// An archive stream into one S3 object, uploaded while it is made: a multipart upload whose parts
// leave as soon as they are full (never staged on disk). Memory is (parts in flight + 1) x part
// size and is what `memoryBytes` reports. The object exists only once CompleteMultipartUpload
// succeeds; a failure or a cancel aborts the upload, so no parts are left behind to be billed.
import type { S3Client } from '@aws-sdk/client-s3';
import type { RecordOutput } from '../sink/stream/record-writer';
import { s3Error } from './errors';
import { s3sdk } from './client';
import { s3Url, type S3Location } from './location';
import { formatBytes } from '../util/size';

/** S3's limits (AWS's documented ones; other servers have the same or looser). */
export const S3_MAX_PARTS = 10_000;
export const S3_MIN_PART = 5 << 20;
export const S3_MAX_PART = 5 * 1024 ** 3;

const MiB = 1 << 20;

export interface PartPlan {
  partSize: number;
  inFlight: number;
  memoryBytes: number;
  /** Why the plan differs from what was asked (a part above 5 GiB, fewer parts in flight), for the log. */
  notes: string[];
}

/**
 * Part size and parallelism for an archive of about `expected` bytes: parts of at least `minPart`,
 * large enough that the archive (with 2 % to spare) takes at most 9,900 of S3's 10,000 parts;
 * parts in flight lowered so that memory stays within `memoryLimit` (one part in flight at least).
 */
export function planParts(expected: number | undefined, o: { minPart: number; inFlight: number; memoryLimit: number }): PartPlan {
  const notes: string[] = [];
  const need = expected ? Math.ceil((expected * 1.02) / (S3_MAX_PARTS - 100)) : 0;
  const partSize = Math.ceil(Math.max(o.minPart, S3_MIN_PART, need) / MiB) * MiB;
  if (partSize > o.minPart && need > o.minPart) notes.push(`parts of ${formatBytes(partSize)} (not ${formatBytes(o.minPart)}) so that ${formatBytes(expected ?? 0)} fits in S3's ${S3_MAX_PARTS} parts`);
  if (partSize > S3_MAX_PART) notes.push(`a part of ${formatBytes(partSize)} is above AWS S3's 5 GiB limit: an archive this large needs a server that takes larger parts (Ceph RGW: rgw_max_put_size)`);
  const fit = Math.max(1, Math.floor(o.memoryLimit / partSize) - 1);
  const inFlight = Math.max(1, Math.min(o.inFlight, fit));
  if (inFlight < o.inFlight) notes.push(`${inFlight} part${inFlight > 1 ? 's' : ''} in flight (not ${o.inFlight}) to stay within ${formatBytes(o.memoryLimit)} of memory`);
  return { partSize, inFlight, memoryBytes: (inFlight + 1) * partSize, notes };
}

export interface MultipartStats { parts: number; bytes: number; partSize: number; memoryBytes: number; uploadId: string | undefined }

export class S3MultipartOutput implements RecordOutput {
  private buf: Buffer | undefined;
  private fill = 0;
  private readonly spare: Buffer[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  private readonly etags: string[] = [];
  private uploadId: string | undefined;
  private creating: Promise<string> | undefined;
  private error: Error | undefined;
  private bytes = 0;
  private aborted = false;
  private tail: Promise<void> = Promise.resolve();
  private readonly url: string;

  constructor(private readonly client: S3Client, private readonly loc: S3Location, private readonly plan: PartPlan, private readonly onPart?: (s: MultipartStats) => void) {
    this.url = s3Url(loc);
  }

  get stats(): MultipartStats {
    return { parts: this.etags.filter(Boolean).length, bytes: this.bytes, partSize: this.plan.partSize, memoryBytes: this.plan.memoryBytes, uploadId: this.uploadId };
  }

  /** Writes may be issued before the last one resolved (the record writer keeps several going): they run in order. */
  write(data: Buffer): Promise<void> {
    const w = this.tail.then(() => this.append(data));
    this.tail = w.catch(() => {});
    return w;
  }

  private async append(data: Buffer): Promise<void> {
    if (this.error) throw this.error;
    let off = 0;
    while (off < data.length) {
      this.buf ??= this.spare.pop() ?? Buffer.allocUnsafe(this.plan.partSize);
      const n = data.copy(this.buf, this.fill, off);
      this.fill += n;
      off += n;
      if (this.fill === this.plan.partSize) await this.sendPart();
    }
  }

  /** Starts the full buffer's upload; returns once fewer than the planned parts are in flight. */
  private async sendPart(): Promise<void> {
    const buf = this.buf!, len = this.fill;
    this.buf = undefined;
    this.fill = 0;
    const n = this.etags.length + 1;
    if (n > S3_MAX_PARTS) throw (this.error = new Error(`the archive outgrew S3's ${S3_MAX_PARTS} parts of ${formatBytes(this.plan.partSize)} (${formatBytes(this.bytes)} sent)`));
    this.etags.push('');
    const p = (async () => {
      const uploadId = await this.begin();
      const { UploadPartCommand } = s3sdk();
      const r = await this.client.send(new UploadPartCommand({ Bucket: this.loc.bucket, Key: this.loc.key, UploadId: uploadId, PartNumber: n, Body: buf.subarray(0, len), ContentLength: len }));
      if (!r.ETag) throw new Error(`the S3 server returned no ETag for part ${n}`);
      this.etags[n - 1] = r.ETag;
      this.bytes += len;
      this.onPart?.(this.stats);
    })().then(
      () => { this.spare.push(buf); },
      (e: unknown) => { this.error ??= s3Error(e, `upload of part ${n} of ${this.url}`, this.url); },
    ).finally(() => { this.inFlight.delete(p); });
    this.inFlight.add(p);
    while (this.inFlight.size >= this.plan.inFlight) await Promise.race(this.inFlight);
    if (this.error) throw this.error;
  }

  private begin(): Promise<string> {
    this.creating ??= (async () => {
      const { CreateMultipartUploadCommand } = s3sdk();
      try {
        const r = await this.client.send(new CreateMultipartUploadCommand({ Bucket: this.loc.bucket, Key: this.loc.key, ContentType: 'application/x-tar' }));
        if (!r.UploadId) throw new Error('the S3 server returned no UploadId');
        this.uploadId = r.UploadId;
        return r.UploadId;
      } catch (e) {
        throw s3Error(e, `start of the upload to ${this.url}`, this.url);
      }
    })();
    return this.creating;
  }

  async close(): Promise<void> {
    await this.tail;
    if (this.error) throw this.error;
    const { PutObjectCommand, CompleteMultipartUploadCommand } = s3sdk();
    if (this.etags.length === 0) {
      // Smaller than one part: one PUT, which is as atomic as a completed upload.
      const body = (this.buf ?? Buffer.alloc(0)).subarray(0, this.fill);
      try {
        await this.client.send(new PutObjectCommand({ Bucket: this.loc.bucket, Key: this.loc.key, Body: body, ContentLength: body.length, ContentType: 'application/x-tar' }));
      } catch (e) {
        throw (this.error = s3Error(e, `upload of ${this.url}`, this.url));
      }
      this.bytes = body.length;
      this.buf = undefined;
      return;
    }
    if (this.fill > 0) await this.sendPart();
    while (this.inFlight.size) await Promise.race(this.inFlight);
    if (this.error) throw this.error;
    try {
      await this.client.send(new CompleteMultipartUploadCommand({
        Bucket: this.loc.bucket, Key: this.loc.key, UploadId: this.uploadId,
        MultipartUpload: { Parts: this.etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
      }));
    } catch (e) {
      this.error = s3Error(e, `completion of the upload to ${this.url}`, this.url);
      await this.destroy();
      throw this.error;
    }
    this.uploadId = undefined;
    this.spare.length = 0;
  }

  /** Failure or cancel: waits for parts in flight, then aborts the upload (never throws). */
  async destroy(): Promise<void> {
    if (this.aborted) return;
    this.aborted = true;
    this.error ??= new Error('the upload was abandoned');
    await this.tail;
    await Promise.allSettled([...this.inFlight]);
    this.buf = undefined;
    this.spare.length = 0;
    let id: string | undefined;
    try { id = this.creating ? await this.creating : undefined; } catch { id = undefined; }
    if (!id) return;
    const { AbortMultipartUploadCommand } = s3sdk();
    // A part that was still arriving when the abort ran can outlive it (S3 says so): abort twice.
    for (let i = 0; i < 2; i++) {
      try { await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.loc.bucket, Key: this.loc.key, UploadId: id })); } catch { /* the server may be the reason we abort */ }
    }
    this.uploadId = undefined;
  }
}
