// Offline and freeze backups: read the used-block map straight from the device, copy those blocks
// into a sink. With --method freeze the whole read (map and data) happens inside FIFREEZE/FITHAW,
// so the image is one instant of a mounted file system.
import type { Device } from '../device/device';
import type { ErrorPolicy } from '../copy/errors';
import type { UsedBlockMap } from '../fs/used-map';
import type { BackupSink } from '../sink/sink';
import { FreezeMethod, OfflineMethod } from '../snapshot/method';
import { runBackupJob } from './backup-job';
import type { LayoutNode } from '../fs/layout';

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
  const { source } = opts;
  const method = opts.method === 'freeze' ? new FreezeMethod(source, opts.mount!) : new OfflineMethod(source);
  const r = await runBackupJob({
    method,
    sink: opts.sink,
    source: source.path,
    volumeSize: source.size,
    onError: opts.onError,
    maxRate: opts.maxRate,
    signal: opts.signal,
    batchBytes: 8 << 20,
    onMap: (m) => opts.onMap?.(m),
    onProgress: (p) => opts.onProgress?.(p.bytesDone, p.bytesTotal, p.badBlocks),
  });
  return {
    source: source.path,
    target: opts.sink.description,
    method: opts.method,
    filesystem: r.map.filesystem,
    blockSize: r.blockSize,
    totalBlocks: r.totalBlocks,
    usedBlocks: r.usedBlocks,
    size: source.size,
    bytes: r.copy.bytes,
    blocks: r.copy.blocks,
    badBlocks: r.copy.badBlocks,
    durationMs: r.durationMs,
    copyMs: r.copy.durationMs,
    freezeMs: r.facts.freezeMs,
    notes: r.notes,
    layout: r.map.layout,
  };
}
