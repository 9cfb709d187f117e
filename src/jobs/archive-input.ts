// Where an archive is read from, by its name: "s3://BUCKET/KEY" (ranged GETs) or a file or tape
// device (large reads). Standard input and volume sets are opened by the restore job itself.
import type { ArchiveInput } from '../archive';
import { isS3Url } from '../s3/location';
import type { S3Options } from '../s3/options';
import { readFileChunks } from '../sink/stream/multi-volume';

export function archiveBytes(name: string, s3?: S3Options): ArchiveInput {
  if (isS3Url(name)) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- the SDK loads only for s3://
    return (require('../s3/destination') as typeof import('../s3/destination')).s3Input(name, s3);
  }
  return readFileChunks(name);
}
