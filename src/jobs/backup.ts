// Offline and freeze backups: read the used-block map straight from the device, copy those blocks
// into a sink. With --method freeze the whole read (map and data) happens inside FIFREEZE/FITHAW,
// so the image is one instant of a mounted file system.
import type { Device } from '../device/device';
import { copyBlocks, type ErrorPolicy } from '../copy/block-copier';
import { readUsedBlockMap } from '../fs/detect';
import type { LayoutNode } from '../fs/layout';
import type { UsedBlockMap } from '../fs/used-map';
import { CompletenessCheck } from '../sink/completeness';
import type { BackupSink, VolumeInfo } from '../sink/sink';
import { checkFreezeMount, withFrozen } from './freeze';
import { TOOL_VERSION } from './version';

export interface BackupOptions {
  source: Device;
  sink: BackupSink;
  method: 'offline' | 'freeze';
  mount?: string;
  onError: ErrorPolicy;
  signal?: AbortSignal;
  /** Bytes per second at most (--max-rate). */
  maxRate?: number;
  onMap?: (map: UsedBlockMap) => void;
  onProgress?: (done: number, total: number, badBlocks: number) => void;
}

/** What every backup reports, whatever its method. */
export interface CopySummary {
  source: string;
  target: string;
  filesystem: string;
  blockSize: number;
  totalBlocks: number;
  usedBlocks: number;
  size: number;
  bytes: number;
  blocks: number;
  badBlocks: number[];
  durationMs: number;
  copyMs: number;
  notes: string[];
  /** What the volume holds (disk -> partitions -> LVs -> file systems), with used and total bytes. */
  layout?: LayoutNode;
}

export interface BackupSummary extends CopySummary {
  method: 'offline' | 'freeze';
  freezeMs?: number;
}

export async function runBackup(opts: BackupOptions): Promise<BackupSummary> {
  const started = performance.now();
  const { source } = opts;
  const sink = new CompletenessCheck(opts.sink);
  if (opts.method === 'freeze') await checkFreezeMount(opts.mount!, source);

  const copy = async () => {
    const snapshotTime = new Date();
    const map = await readUsedBlockMap(source, source.path);
    opts.onMap?.(map);
    const volume: VolumeInfo = {
      source: source.path,
      size: source.size,
      blockSize: map.blockSize,
      totalBlocks: map.totalBlocks,
      usedBlocks: map.usedBlocks,
      filesystem: map.filesystem,
      snapshotTime,
      notes: map.notes,
      toolVersion: TOOL_VERSION,
      layout: map.layout,
    };
    await sink.begin(volume, map.bitmap);
    const result = await copyBlocks({
      source,
      blocks: map.bitmap,
      blockSize: map.blockSize,
      sink,
      onError: opts.onError,
      signal: opts.signal,
      maxRate: opts.maxRate,
      onProgress: (p) => opts.onProgress?.(p.bytesDone, p.bytesTotal, p.badBlocks),
    });
    await sink.finish({ badBlocks: result.badBlocks });
    return { map, result };
  };

  try {
    let freezeMs: number | undefined;
    let out: Awaited<ReturnType<typeof copy>>;
    if (opts.method === 'freeze') {
      // An offline backup runs in the CLI, which serves nothing: it may thaw synchronously on exit.
      const r = await withFrozen(opts.mount!, copy, { processGuard: true });
      out = r.result;
      freezeMs = r.frozenMs;
    } else {
      out = await copy();
    }
    const { map, result } = out;
    return {
      source: source.path,
      target: sink.description,
      method: opts.method,
      filesystem: map.filesystem,
      blockSize: map.blockSize,
      totalBlocks: map.totalBlocks,
      usedBlocks: map.usedBlocks,
      size: source.size,
      bytes: result.bytes,
      blocks: result.blocks,
      badBlocks: result.badBlocks,
      durationMs: performance.now() - started,
      copyMs: result.durationMs,
      freezeMs,
      notes: map.notes,
      layout: map.layout,
    };
  } catch (e) {
    await sink.abort(e as Error);
    throw e;
  }
}
