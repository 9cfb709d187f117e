// s3:// as a place archives go to and come from: the one entry point the jobs use (backup targets,
// restore and verify inputs, the appliance's store), so every path takes the same options.
import type { S3Client } from '@aws-sdk/client-s3';
import type { RecordDestination } from '../sink/stream/target';
import type { RecordOutput } from '../sink/stream/record-writer';
import { UserError } from '../util/errors';
import { formatBytes } from '../util/size';
import { makeS3Client, s3sdk } from './client';
import { s3Error } from './errors';
import { parseS3Url, s3Url, type S3Location } from './location';
import { S3MultipartOutput, planParts, type MultipartStats } from './multipart-output';
import { headObject, readObject } from './object-input';
import { S3_DEFAULT_PARALLEL, S3_DEFAULT_PART, S3_MEMORY_LIMIT, type S3Options } from './options';


export class S3Destination implements RecordDestination {
  readonly where: string;
  readonly loc: S3Location;
  private output: S3MultipartOutput | undefined;
  private client: S3Client | undefined;

  constructor(url: string, private readonly opts: S3Options = {}, private readonly hooks: { note?: (s: string) => void; part?: (s: MultipartStats) => void; force?: boolean } = {}) {
    this.loc = parseS3Url(url);
    this.where = s3Url(this.loc);
  }

  async open(expectedBytes: number | undefined): Promise<RecordOutput> {
    const plan = planParts(expectedBytes, { minPart: this.opts.partSize ?? S3_DEFAULT_PART, inFlight: this.opts.parallel ?? S3_DEFAULT_PARALLEL, memoryLimit: S3_MEMORY_LIMIT });
    // A part is one Buffer: Node 20 caps those at 4 GiB (Node 24, the single binary's, does not).
    const maxBuffer = (require('node:buffer') as typeof import('node:buffer')).constants.MAX_LENGTH; // eslint-disable-line @typescript-eslint/no-require-imports
    if (plan.partSize > maxBuffer) {
      throw new UserError(`an archive of ${formatBytes(expectedBytes ?? 0)} needs S3 parts of ${formatBytes(plan.partSize)} (S3 takes at most 10,000 parts), and this Node (${process.version}) holds at most ${formatBytes(maxBuffer)} in one buffer`, 'run the livesnap single binary (it embeds Node 24), or split the volume\'s backup');
    }
    this.client = await makeS3Client({ endpoint: this.opts.endpoint, maxSockets: plan.inFlight + 2 });
    // Bucket and credentials are checked before the first byte, not after the first part is full.
    try {
      await checkBucket(this.client, this.loc);
      if (!this.hooks.force && (await headObject(this.client, this.loc, `backup to ${this.where}`))) {
        throw new UserError(`target ${this.where} already exists`, 'choose another key, or pass --force to replace it (the old object stays until the new one is complete)');
      }
    } catch (e) {
      this.client.destroy();
      throw e;
    }
    for (const n of plan.notes) this.hooks.note?.(n);
    this.hooks.note?.(`uploading to ${this.where} in parts of ${formatBytes(plan.partSize)}, ${plan.inFlight} at once (${formatBytes(plan.memoryBytes)} of memory)`);
    this.output = new S3MultipartOutput(this.client, this.loc, plan, this.hooks.part);
    const out = this.output, client = this.client;
    // The client's sockets close with the output, whichever way it ends.
    return {
      write: (b) => out.write(b),
      close: async () => { try { await out.close(); } finally { client.destroy(); } },
      destroy: async () => { try { await out.destroy(); } finally { client.destroy(); } },
    };
  }

  get stats(): MultipartStats | undefined { return this.output?.stats; }
}

async function checkBucket(client: S3Client, loc: S3Location): Promise<void> {
  const { HeadBucketCommand } = s3sdk();
  try {
    await client.send(new HeadBucketCommand({ Bucket: loc.bucket }));
  } catch (e) {
    throw s3Error(e, `backup to ${s3Url(loc)}`, s3Url(loc), 'bucket');
  }
}

/** The appliance's s3:// store at start-up: its bucket exists and the credentials may use it. */
export async function checkStore(prefixUrl: string, opts: S3Options = {}): Promise<void> {
  const loc = parseS3Url(prefixUrl, { prefix: true });
  const client = await makeS3Client({ endpoint: opts.endpoint });
  try { await checkBucket(client, loc); } finally { client.destroy(); }
}

export async function deleteObject(url: string, opts: S3Options = {}): Promise<void> {
  const loc = parseS3Url(url);
  const client = await makeS3Client({ endpoint: opts.endpoint });
  const { DeleteObjectCommand } = s3sdk();
  try {
    await client.send(new DeleteObjectCommand({ Bucket: loc.bucket, Key: loc.key }));
  } catch (e) {
    throw s3Error(e, `removal of ${url}`, url);
  } finally {
    client.destroy();
  }
}

/** An archive object as a byte stream for the archive reader. */
export async function* s3Input(url: string, opts: S3Options = {}, onRetry?: (offset: number, attempt: number, e: Error) => void): AsyncGenerator<Uint8Array> {
  const loc = parseS3Url(url);
  const client = await makeS3Client({ endpoint: opts.endpoint });
  try {
    yield* readObject(client, loc, { onRetry });
  } finally {
    client.destroy();
  }
}
