// Restore and verify from a livesnap archive (file, standard input, tape, or several volumes),
// streaming without seeking. The chunk checksums sit in the trailer at the end, so a restore is
// incomplete until the whole archive has been read: a file target stays "<target>.partial" until
// then and is removed on any error; a device target is reported as not restored.
import { readArchive, type ArchiveInput, type ArchiveSummary, type Manifest } from '../archive';
import { readVolumes } from '../sink/stream/multi-volume';
import type { S3Options } from '../s3/options';
import { archiveBytes } from './archive-input';
import { AlignedStager } from '../sink/aligned-stager';
import { CompareSink } from '../sink/compare-sink';
import { ImageSink } from '../sink/image-sink';
import type { BackupSink } from '../sink/sink';
import { Bitset } from '../util/bitset';
import { UserError } from '../util/errors';

export interface ArchiveJobOptions {
  /** "-" for standard input, a path, or several volume paths. */
  input: string | string[];
  nextVolumeCommand?: string;
  /** The endpoint of an s3:// input. */
  s3?: S3Options;
  /** What the reader works around (a resumed S3 GET). */
  onNote?: (s: string) => void;
  onManifest?: (m: Manifest) => void;
  onProgress?: (done: number, total: number) => void;
}

function openInput(o: ArchiveJobOptions): ArchiveInput {
  if (o.input === '-') return process.stdin;
  if (Array.isArray(o.input)) return o.input.length === 1 ? archiveBytes(o.input[0]!, o.s3, o.onNote) : readVolumes(o.input);
  if (o.nextVolumeCommand) return readVolumes({ path: o.input, nextVolumeCommand: o.nextVolumeCommand });
  return archiveBytes(o.input, o.s3, o.onNote);
}

async function archiveToSink(o: ArchiveJobOptions, sink: BackupSink | undefined): Promise<ArchiveSummary> {
  let stager: AlignedStager | undefined;
  let done = 0;
  let total = 0;
  let begun = false;
  try {
    const summary = await readArchive(openInput(o), {
      onManifest: (m) => {
        if (m.backup?.kind === 'incremental' && sink) {
          throw new UserError(`this archive is an incremental backup (${m.backup.id}): it holds only the blocks changed since ${m.backup.parent}`, 'restore the chain: name the full backup first, then every incremental after it, in order (livesnap restore full.tar inc1.tar ... --to X)');
        }
        total = m.storedBytes; o.onManifest?.(m);
      },
      onSparseMap: async (map) => {
        if (!sink) return;
        const blockSize = 512;
        const used = new Bitset(Math.ceil(map.realSize / blockSize));
        for (let i = 0; i < map.count; i++) used.setRange(Math.floor(map.regions[2 * i]! / blockSize), Math.ceil((map.regions[2 * i]! + map.regions[2 * i + 1]!) / blockSize));
        await sink.begin({ source: 'archive', size: map.realSize, blockSize, totalBlocks: used.size, usedBlocks: used.count(), filesystem: 'unknown', snapshotTime: new Date(), notes: [], toolVersion: '' }, used);
        begun = true;
        stager = new AlignedStager(sink);
      },
      onData: async (offset, bytes) => {
        done += bytes.length;
        o.onProgress?.(done, total);
        if (stager) await stager.push(offset, bytes);
      },
    });
    if (stager) { await stager.flush(true); await stager.dispose(); stager = undefined; }
    if (sink && begun) await sink.finish({ badBlocks: summary.trailer.badBlocks ?? [] });
    return summary;
  } catch (e) {
    await stager?.dispose();
    if (sink) await sink.abort(e as Error);
    throw e;
  }
}

export function restoreArchive(o: ArchiveJobOptions & { target: string; force?: boolean }): Promise<ArchiveSummary> {
  if (o.target === '-') throw new UserError('restore needs a device or image file as --to, not standard output');
  return archiveToSink(o, new ImageSink(o.target, { force: o.force }));
}

export async function verifyArchive(o: ArchiveJobOptions & { against?: string }): Promise<ArchiveSummary & { differingBlocks: number; firstDifferingBlock?: number; compareBlockSize: number }> {
  const cmp = o.against ? new CompareSink(o.against) : undefined;
  const s = await archiveToSink(o, cmp);
  return { ...s, differingBlocks: cmp?.differingBlocks ?? 0, firstDifferingBlock: cmp?.firstDifferingBlock, compareBlockSize: 512 };
}
