// Every backup, whatever its method, is this one sequence (seed 001 FIG. 13): arm the snapshot method
// (the instant), read the used-block map through its reader, narrow it to what the instant holds,
// begin the sink, copy with the one engine, finish, release. Any failure or a cancel ends the instant
// first (writers are released at once and never see an error), then aborts the sink; the sink is
// checked for completeness before it may say "done".
import { type CopyProgress, CopyEngine, type CopyResult } from '../copy/engine';
import type { ErrorPolicy } from '../copy/errors';
import type { BlockReader } from '../device/device';
import type { UsedBlockMap } from '../fs/used-map';
import { CompletenessCheck } from '../sink/completeness';
import type { BackupIdentity, BackupSink, VolumeInfo } from '../sink/sink';
import type { InstantFacts, PointInTime, SnapshotMethod } from '../snapshot/method';
import { TOOL_VERSION } from './version';

export interface BackupJobOptions {
  method: SnapshotMethod;
  sink: BackupSink;
  /** The volume's name in the backup's metadata (device path or export name). */
  source: string;
  volumeSize: number;
  onError?: ErrorPolicy;
  /** Bytes per second at most (--max-rate). */
  maxRate?: number;
  signal?: AbortSignal;
  /** Default: sink.randomAccess. */
  randomAccess?: boolean;
  /** The error a cancel ends the job with. */
  cancelled?: () => Error;
  /** How the used-block map is read (default: src/fs/detect.ts readUsedBlockMap). */
  readUsedMap?: (reader: BlockReader, name: string) => Promise<UsedBlockMap>;
  batchBytes?: number;
  depth?: number;
  /** Where the backup stands in its chain, once restrict() has chosen its blocks (online backups). */
  backupIdentity?: () => BackupIdentity | undefined;
  onArmed?(pit: PointInTime): void;
  onMap?(map: UsedBlockMap, usedBlocks: number, blockSize: number): void;
  onProgress?(p: CopyProgress): void;
}

export interface BackupJobResult {
  map: UsedBlockMap;
  blockSize: number;
  totalBlocks: number;
  usedBlocks: number;
  instant: Date;
  copy: CopyResult;
  facts: InstantFacts;
  notes: string[];
  durationMs: number;
}

export async function runBackupJob(o: BackupJobOptions): Promise<BackupJobResult> {
  const started = performance.now();
  const sink = new CompletenessCheck(o.sink);
  const cancelled = () => (o.cancelled ? o.cancelled() : o.signal?.reason instanceof Error ? o.signal.reason : new Error('cancelled'));
  if (o.signal?.aborted) throw cancelled();
  const pit = await o.method.arm();
  const onAbort = () => pit.fail(cancelled());
  o.signal?.addEventListener('abort', onAbort, { once: true });
  // A cancel that came while arming (the listener was not there yet) ends the instant now.
  if (o.signal?.aborted) onAbort();
  let sinkBegun = false;
  try {
    o.onArmed?.(pit);
    failIfFailed(pit);
    const readUsed = o.readUsedMap ?? (await import('../fs/detect')).readUsedBlockMap;
    const map = await readUsed(pit.reader, o.source);
    failIfFailed(pit);
    const r = pit.restrict(map);
    const usedBlocks = r.used.setCount;
    const totalBlocks = Math.ceil(o.volumeSize / r.blockSize);
    o.onMap?.(map, usedBlocks, r.blockSize);
    const facts = pit.facts();
    const notes = [...map.notes];
    if (typeof facts.insidePath === 'string') notes.push(`the container file ${facts.insidePath} is inside the volume: its blocks are not in the image (the file reads as zeros there)`);
    const volume: VolumeInfo = {
      source: o.source,
      size: o.volumeSize,
      blockSize: r.blockSize,
      totalBlocks,
      usedBlocks,
      filesystem: map.filesystem,
      snapshotTime: pit.instant,
      notes,
      toolVersion: TOOL_VERSION,
      layout: map.layout,
      ...(o.backupIdentity?.() ? { backup: o.backupIdentity()! } : {}),
    };
    sinkBegun = true;
    await sink.begin(volume, r.used);
    const engine = new CopyEngine({
      source: r.source,
      blockSize: r.blockSize,
      volumeSize: o.volumeSize,
      used: r.used,
      sink,
      randomAccess: o.randomAccess ?? o.sink.randomAccess ?? false,
      onError: o.onError ?? 'abort',
      pace: { ...pit.pace, maxRate: o.maxRate },
      batchBytes: o.batchBytes,
      depth: o.depth,
      failed: () => pit.failure(),
      signal: o.signal,
      onProgress: o.onProgress,
    });
    pit.copying?.(engine);
    const copy = await engine.run();
    failIfFailed(pit);
    await sink.finish({ badBlocks: copy.badBlocks });
    const endFacts = pit.facts();
    await pit.release();
    return { map, blockSize: r.blockSize, totalBlocks, usedBlocks, instant: pit.instant, copy, facts: { ...endFacts, ...pit.facts() }, notes, durationMs: performance.now() - started };
  } catch (e) {
    // Writers first: ending the instant releases every held write.
    const err = pit.failure() ?? (o.signal?.aborted ? cancelled() : (e as Error));
    pit.fail(err);
    await pit.release().catch(() => {});
    if (sinkBegun) await sink.abort(err);
    throw err;
  } finally {
    o.signal?.removeEventListener('abort', onAbort);
  }
}

function failIfFailed(pit: PointInTime): void {
  const f = pit.failure();
  if (f) throw f;
}
