import { Command, Option } from 'clipanion';
import { UserError } from '../../util/errors';
import { LivesnapCommand } from '../base';
import { isS3Url } from '../../s3/location';
import { parseS3Options } from '../../s3/options';

const DETAILS = `
  A backup to s3:// aborts its multipart upload when it fails or is cancelled, so nothing is left
  behind. When the server itself was unreachable at that moment the abort cannot happen, and the
  uploaded parts stay (S3 keeps, and bills, them until someone aborts the upload). "uploads" lists
  the incomplete uploads under a key or prefix; "abort" aborts them. Only what is named is touched:
  give the archive's key, or a prefix ending in "/".
`;

export class S3UploadsCommand extends LivesnapCommand {
  static override paths = [['s3', 'uploads']];
  static override usage = Command.Usage({
    description: 'List incomplete S3 multipart uploads under a key or prefix',
    details: DETAILS,
    examples: [['Uploads left under a prefix', '$0 s3 uploads s3://backups/nightly/']],
  });

  url = Option.String({ name: 's3://BUCKET/KEY-or-PREFIX/' });
  s3Endpoint = Option.String('--s3-endpoint', { description: 'The S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS itself)' });

  async run(): Promise<number> {
    if (!isS3Url(this.url)) throw new UserError(`"${this.url}" is not an S3 URL`, 'write it as s3://BUCKET/KEY or s3://BUCKET/PREFIX/');
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- the SDK loads only here
    const { listUploads } = require('../../s3/uploads') as typeof import('../../s3/uploads');
    const list = await listUploads(this.url, parseS3Options({ endpoint: this.s3Endpoint }));
    this.reporter.done({ url: this.url, uploads: list }, list.length
      ? [`${list.length} incomplete upload${list.length > 1 ? 's' : ''} under ${this.url}:`, ...list.map((u) => `  ${u.key}  ${u.uploadId}  started ${u.initiated ?? '?'}`), `abort them with "livesnap s3 abort ${this.url}"`]
      : [`no incomplete uploads under ${this.url}`]);
    return 0;
  }
}

export class S3AbortCommand extends LivesnapCommand {
  static override paths = [['s3', 'abort']];
  static override usage = Command.Usage({
    description: 'Abort the incomplete S3 multipart uploads under a key or prefix',
    details: DETAILS,
    examples: [['Remove what a backup cut off by a network failure left', '$0 s3 abort s3://backups/data-2026-12-01.tar']],
  });

  url = Option.String({ name: 's3://BUCKET/KEY-or-PREFIX/' });
  s3Endpoint = Option.String('--s3-endpoint', { description: 'The S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS itself)' });

  async run(): Promise<number> {
    if (!isS3Url(this.url)) throw new UserError(`"${this.url}" is not an S3 URL`, 'write it as s3://BUCKET/KEY or s3://BUCKET/PREFIX/');
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- the SDK loads only here
    const { listUploads, abortUploads } = require('../../s3/uploads') as typeof import('../../s3/uploads');
    const opts = parseS3Options({ endpoint: this.s3Endpoint });
    const list = await listUploads(this.url, opts);
    await abortUploads(this.url, list, opts);
    this.reporter.done({ url: this.url, aborted: list }, [list.length ? `aborted ${list.length} incomplete upload${list.length > 1 ? 's' : ''} under ${this.url}` : `no incomplete uploads under ${this.url}`]);
    return 0;
  }
}
