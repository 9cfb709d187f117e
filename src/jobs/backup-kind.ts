// What a backup given to restore or verify is: a livesnap archive or a raw image. Both are
// recognised positively: a file that looks like a tar (or zstd) is read as an archive and must be a
// valid one; a raw image must hold something livesnap knows (or be named raw with --raw). Anything
// else — empty, too small, a damaged archive head — is an error, never a silent "every block" image.
import * as fs from 'node:fs';
import { Device } from '../device/device';
import { headerChecksumOk } from '../archive/pax-header';
import { recognise } from '../fs/detect';
import { ZSTD_MAGIC } from '../sink/stream/zstd';
import { UserError } from '../util/errors';

export type BackupKind = 'archive' | 'image';

/** manifest.json's header, the tar's overhead and the end blocks: no livesnap archive is smaller. */
const MIN_ARCHIVE = 4 * 512;

/** The kind of the backup at `file` ("-" is standard input: an archive). Throws a UserError for anything else. */
export async function classifyBackup(file: string, opts: { raw?: boolean } = {}): Promise<BackupKind> {
  if (file === '-') {
    if (opts.raw) throw new UserError('--raw names a raw image file: standard input is read as an archive');
    return 'archive';
  }
  if (file.startsWith('s3://')) {
    // An object is read as a stream: it must be an archive, and the reader says so if it is not.
    if (opts.raw) throw new UserError('--raw names a raw image file: an s3:// object is read as an archive');
    return 'archive';
  }
  let st: fs.Stats;
  try { st = fs.statSync(file); } catch { throw new UserError(`${file}: no such file`, 'name the image or archive the backup wrote'); }
  if (st.isDirectory()) throw new UserError(`${file} is a directory, not a backup`);
  const head = Buffer.alloc(512);
  let n: number;
  const fd = fs.openSync(file, 'r');
  try { n = fs.readSync(fd, head, 0, 512, 0); } finally { fs.closeSync(fd); }
  if (n === 0) throw new UserError(`${file} is empty: not a backup`, 'a backup that was cut off before it wrote anything holds nothing; use another copy');
  if (n >= 4 && head.subarray(0, 4).equals(ZSTD_MAGIC)) return 'archive';
  const ustar = n >= 262 && head.toString('latin1', 257, 262) === 'ustar';
  const manifestName = head.toString('latin1', 0, 14) === 'manifest.json\0';
  if (ustar || (n === 512 && headerChecksumOk(head)) || manifestName) {
    if (opts.raw) throw new UserError(`${file} starts with a tar header: it is an archive, not a raw image`, 'leave out --raw');
    if (st.isFile() && st.size < MIN_ARCHIVE) {
      throw new UserError(`${file} is ${st.size} bytes: too small to be a livesnap archive (at least ${MIN_ARCHIVE}); it is cut off or not a backup`);
    }
    return 'archive';
  }
  if (opts.raw) return 'image';
  if (st.isFile() && st.size < 4096) {
    throw new UserError(`${file} is ${st.size} bytes: too small to be an archive or an image of a volume`);
  }
  const img = Device.open(file, { write: false });
  let kind: string | undefined;
  try { kind = await recognise(img); } finally { img.close(); }
  if (kind) return 'image';
  throw new UserError(
    `${file} is neither a livesnap archive nor an image of anything livesnap knows (a partition table, LVM2 or a known file system): if it is an archive, its first header is damaged`,
    `if it is a raw image of a volume of unknown contents, say so: --raw (every block is restored)`,
  );
}
