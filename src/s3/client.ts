// One S3 client, made the way the AWS CLI makes its own: credentials and region from the SDK's
// default chain (environment, ~/.aws/config and credentials, profiles, instance roles), endpoint
// from --s3-endpoint, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, TLS verified (AWS_CA_BUNDLE adds a
// CA, as for the CLI). The SDK is loaded only here and only when an s3:// path is used.
import type { S3Client } from '@aws-sdk/client-s3';
import { config } from '../config';
import { UserError } from '../util/errors';
import { checkEndpoint } from './endpoint';

export interface S3ClientOptions {
  /** --s3-endpoint: overrides the environment's endpoint. */
  endpoint?: string;
  /** Sockets to the endpoint (parts in flight + 1). */
  maxSockets?: number;
}


type S3Module = typeof import('@aws-sdk/client-s3');
// eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on use (start-up time of every other command)
export const s3sdk = (): S3Module => require('@aws-sdk/client-s3') as S3Module;

export async function makeS3Client(o: S3ClientOptions = {}): Promise<S3Client> {
  const c = config();
  const endpoint = o.endpoint !== undefined ? checkEndpoint(o.endpoint, '--s3-endpoint') : c.s3Endpoint;
  /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use */
  const https = require('node:https') as typeof import('node:https');
  const http = require('node:http') as typeof import('node:http');
  const { NodeHttpHandler } = require('@smithy/node-http-handler') as typeof import('@smithy/node-http-handler');
  /* eslint-enable @typescript-eslint/no-require-imports */
  let ca: Buffer | undefined;
  if (c.awsCaBundle) {
    try { ca = require('node:fs').readFileSync(c.awsCaBundle) as Buffer; } catch (e) { // eslint-disable-line @typescript-eslint/no-require-imports
      throw new UserError(`AWS_CA_BUNDLE=${c.awsCaBundle}: ${(e as Error).message}`, 'point it at a PEM file of CA certificates, or unset it');
    }
  }
  const maxSockets = o.maxSockets ?? 8;
  const requestHandler = new NodeHttpHandler({
    httpsAgent: new https.Agent({ keepAlive: true, maxSockets, ...(ca ? { ca } : {}) }),
    httpAgent: new http.Agent({ keepAlive: true, maxSockets }),
    connectionTimeout: 15_000,
    // A gateway that stops answering mid-request must fail the part (and so the job), not hang it.
    requestTimeout: 120_000,
  });
  // The pinned SDK warns on Node < 22 about its future releases: nothing a user of this binary can act on.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  const { S3Client } = s3sdk();
  const base = {
    requestHandler,
    ...(endpoint ? { endpoint, forcePathStyle: true } : {}),
    // S3-compatible servers (Ceph RGW among them) predate the SDK's default CRC32 trailers; the
    // archive carries its own chunk checksums, checked on every restore.
    ...(endpoint ? { requestChecksumCalculation: 'WHEN_REQUIRED' as const, responseChecksumValidation: 'WHEN_REQUIRED' as const } : {}),
  };
  const client = new S3Client(base);
  try {
    await client.config.region();
    return client;
  } catch {
    // No region anywhere (common with a private endpoint): S3's own default, as the CLI does.
    client.destroy();
    return new S3Client({ ...base, region: 'us-east-1' });
  }
}
