// Restore and verify a chain of archives: "livesnap restore full.tar inc1.tar inc2.tar --to X". The
// manifests are read first and the chain checked (incremental/chain.ts); then each archive streams
// into the one target in order: the full one as a normal restore, each incremental over it (its
// blocks written in place, its zero ranges zeroed). A file target stays "<target>.partial" until the
// last archive's trailer has been checked; any failure removes it.
import { readArchive, type ArchiveSummary, type Manifest } from '../archive';
import { checkChain, type ChainLink } from '../incremental/chain';
import type { S3Options } from '../s3/options';
import { archiveBytes } from './archive-input';
import { AlignedStager } from '../sink/aligned-stager';
import { ImageSink } from '../sink/image-sink';
import type { BackupSink, DataBatch, FinishInfo, VolumeInfo } from '../sink/sink';
import { Bitset } from '../util/bitset';

class Stop extends Error {}

/** The manifest of an archive file, read without the rest. */
export async function peekManifest(file: string, s3?: S3Options): Promise<Manifest> {
  let got: Manifest | undefined;
  await readArchive(archiveBytes(file, s3), { onManifest: (m) => { got = m; throw new Stop(); } }).catch((e: unknown) => { if (!(e instanceof Stop)) throw e; });
  return got!;
}

export function linkOf(name: string, m: Manifest): ChainLink {
  return { name, id: m.backup?.id, parent: m.backup?.parent, kind: m.backup?.kind, volumeSize: m.volumeSize, source: m.source, snapshotTime: m.snapshotTime };
}

/** One sink across the chain: begun by the first archive, finished after the last. */
class ChainSink implements BackupSink {
  readonly randomAccess = true;
  private begun = false;
  constructor(readonly image: ImageSink) {}
  get description(): string { return this.image.description; }
  async begin(volume: VolumeInfo, used: Bitset): Promise<void> {
    if (this.begun) return;
    this.begun = true;
    await this.image.begin(volume);
    void used;
  }
  write(batch: DataBatch): Promise<void> { return this.image.write(batch); }
  async finish(_info: FinishInfo): Promise<void> { /* after the last archive */ }
  abort(reason: Error): Promise<void> { return this.image.abort(reason); }
}

export interface ChainRestoreOptions {
  inputs: string[];
  /** The endpoint of s3:// inputs. */
  s3?: S3Options;
  onNote?: (s: string) => void;
  target: string;
  force?: boolean;
  onArchive?: (i: number, m: Manifest) => void;
  onProgress?: (done: number, total: number) => void;
}

export async function restoreChain(o: ChainRestoreOptions): Promise<{ manifests: Manifest[]; summaries: ArchiveSummary[]; bytes: number; zeroedBytes: number }> {
  const manifests: Manifest[] = [];
  for (const f of o.inputs) manifests.push(await peekManifest(f, o.s3));
  checkChain(manifests.map((m, i) => linkOf(o.inputs[i]!, m)));
  const image = new ImageSink(o.target, { force: o.force });
  const sink = new ChainSink(image);
  const total = manifests.reduce((a, m) => a + m.storedBytes, 0);
  let done = 0;
  let zeroedBytes = 0;
  const summaries: ArchiveSummary[] = [];
  try {
    for (let i = 0; i < o.inputs.length; i++) {
      const m0 = manifests[i]!;
      let stager: AlignedStager | undefined;
      try {
        const s = await readArchive(archiveBytes(o.inputs[i]!, o.s3, o.onNote), {
          onManifest: (m) => {
            if (m.backup?.id !== m0.backup?.id || m.storedBytes !== m0.storedBytes) throw new Error(`${o.inputs[i]} changed while the chain was restored`);
            o.onArchive?.(i, m);
          },
          onSparseMap: async (map) => {
            const bs = 512;
            const used = new Bitset(Math.ceil(map.realSize / bs));
            await sink.begin({ source: 'archive', size: map.realSize, blockSize: bs, totalBlocks: used.size, usedBlocks: 0, filesystem: 'unknown', snapshotTime: new Date(), notes: [], toolVersion: '' }, used);
            // Over an earlier state, zero blocks are data too (a new file's holes are not needed there).
            if (i > 0) image.inPlace = true;
            for (const [off, len] of m0.backup?.zeroRanges ?? []) { await image.zero(off, len); zeroedBytes += len; }
            stager = new AlignedStager(sink);
          },
          onData: async (offset, bytes) => {
            done += bytes.length;
            o.onProgress?.(done, total);
            await stager!.push(offset, bytes);
          },
        });
        if (stager) { await stager.flush(true); await stager.dispose(); stager = undefined; }
        summaries.push(s);
      } finally {
        await stager?.dispose();
      }
    }
    await image.finish({ badBlocks: [] });
    return { manifests, summaries, bytes: done, zeroedBytes };
  } catch (e) {
    await sink.abort(e as Error);
    throw e;
  }
}
