// Where an archive is read from, by its name: "s3://BUCKET/KEY" (ranged GETs) or a file or tape
// device (large reads). Standard input and volume sets are opened by the restore job itself.
import type { ArchiveInput } from '../archive';
import { isS3Url } from '../s3/location';
import type { S3Options } from '../s3/options';
import { readFileChunks } from '../sink/stream/multi-volume';

/** `note` hears what the reader works around (an S3 GET that broke off and was resumed). */
export function archiveBytes(name: string, s3?: S3Options, note?: (s: string) => void): ArchiveInput {
  if (isS3Url(name)) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- the SDK loads only for s3://
    return (require('../s3/destination') as typeof import('../s3/destination')).s3Input(name, s3, (offset, attempt, e) => note?.(`reading ${name} broke off at byte ${offset} (${e.message}): retry ${attempt} of 5`));
  }
  return readFileChunks(name);
}
