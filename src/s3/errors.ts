// What went wrong with an S3 request, in words a user acts on (the SDK's own errors name an HTTP
// status or a code, rarely what to check).
import { UserError } from '../util/errors';

interface SdkError { name?: string; Code?: string; code?: string; message?: string; $metadata?: { httpStatusCode?: number }; cause?: unknown }

/** A 404 or NotFound (HEAD requests carry no error code). */
export function isNotFound(e: unknown): boolean {
  const x = (e ?? {}) as SdkError;
  return x.name === 'NotFound' || x.name === 'NoSuchKey' || x.$metadata?.httpStatusCode === 404;
}

/** `of`: what a 404 means for this request (a HEAD of the bucket says nothing else). */
export function s3Error(e: unknown, what: string, url: string, of: 'object' | 'bucket' = 'object'): Error {
  if (e instanceof UserError) return e;
  const x = (e ?? {}) as SdkError;
  const code = of === 'bucket' && isNotFound(e) ? 'NoSuchBucket' : x.name ?? x.Code ?? x.code ?? '';
  const status = x.$metadata?.httpStatusCode;
  const net = x.code ?? (x.cause as SdkError | undefined)?.code ?? '';
  const msg = x.message ?? String(e);
  if (code === 'NoSuchBucket') return new UserError(`${what}: the bucket of ${url} does not exist`, 'create it first (e.g. "aws s3 mb s3://BUCKET"), or check the name and the endpoint');
  if (code === 'NoSuchKey' || code === 'NotFound' || status === 404) return new UserError(`${what}: there is no object ${url}`, 'check the key ("aws s3 ls s3://BUCKET/PREFIX" lists them) and the endpoint');
  if (['InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AccessDenied', 'InvalidToken', 'ExpiredToken', 'CredentialsProviderError'].includes(code) || status === 403) {
    return new UserError(`${what}: the S3 server refused the credentials for ${url} (${code && code !== 'Unknown' ? code : `HTTP ${status}`})`, 'check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile (AWS_PROFILE, ~/.aws/credentials), and that the key may use this bucket');
  }
  if (/Could not load credentials|credential/i.test(msg) && !status) return new UserError(`${what}: no S3 credentials found`, 'set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials, as for the AWS CLI');
  if (['ECONNREFUSED', 'ECONNRESET', 'ENOTFOUND', 'EAI_AGAIN', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH'].includes(net) || code === 'TimeoutError' || /socket hang up|timed? ?out/i.test(msg)) {
    return new UserError(`${what}: the S3 endpoint for ${url} could not be reached or stopped answering (${net || code || msg})`, 'check --s3-endpoint / AWS_ENDPOINT_URL and that the server is up, then rerun');
  }
  if (code === 'EntityTooLarge') return new UserError(`${what}: the S3 server refused a part as too large (${msg})`, 'pass a smaller --s3-part-size; parts of S3 itself are at most 5 GiB');
  if (/certificate|self.signed|CERT_/i.test(msg + net)) return new UserError(`${what}: the TLS certificate of the S3 endpoint for ${url} was not trusted (${net || msg})`, 'give its CA with AWS_CA_BUNDLE=FILE (as for the AWS CLI)');
  return new UserError(`${what}: S3 request for ${url} failed: ${code ? `${code}: ` : ''}${msg}${status ? ` (HTTP ${status})` : ''}`, 'check the endpoint, bucket and credentials, then rerun');
}
