// --writer-priority: how much of the disk the copier leaves to clients while they write. Clients and
// the copier share one device queue; every client write waits behind the copier's reads and image
// writes, and a write to a block not yet copied waits for a read of the original too. No setting
// is best for both sides on one disk: bench/online-frontier measures all three (README, "Known
// limits"). `auto` (the default) steers between the two ends by what the clients get (auto-pace.ts);
// the fixed presets are for a user who knows whether the clients or the backup window matter more.
// Without client writes (none in the last 50 ms) the copier runs at full speed whatever is chosen.

export const WRITER_PRIORITIES = ['auto', 'high', 'normal', 'low'] as const;
export type WriterPriority = (typeof WRITER_PRIORITIES)[number];
export type FixedWriterPriority = Exclude<WriterPriority, 'auto'>;
export const DEFAULT_WRITER_PRIORITY: WriterPriority = 'auto';

import { type Config, config } from '../config';
import type { BusyPace } from '../copy/engine';
export type { BusyPace };

const KiB = 1024;
export const WRITER_PACES: Readonly<Record<FixedWriterPriority, BusyPace>> = {
  // One 32 KiB read (then its image write) at a time: clients keep about half their idle rate.
  high: { batchBytes: 32 * KiB, depth: 1 },
  normal: { batchBytes: 256 * KiB, depth: 2 },
  // The full-speed batches: the backup takes about its idle time; clients get what is left.
  low: { batchBytes: 4096 * KiB, depth: 4 },
};

/** LIVESNAP_BUSY_BATCH / LIVESNAP_BUSY_DEPTH are set (config.ts): a fixed pace even for `auto`. */
export function busyOverridden(c: Config = config()): boolean {
  return c.busyBatchBytes !== undefined || c.busyDepth !== undefined;
}

/**
 * The pace for a fixed priority (`auto` counts as normal here: its starting point when overridden);
 * LIVESNAP_BUSY_BATCH / LIVESNAP_BUSY_DEPTH override it, for measuring points between the presets.
 */
export function busyPace(priority: WriterPriority, c: Config = config()): BusyPace {
  const p = { ...WRITER_PACES[priority === 'auto' ? 'normal' : priority] };
  if (c.busyBatchBytes !== undefined) p.batchBytes = c.busyBatchBytes;
  if (c.busyDepth !== undefined) p.depth = c.busyDepth;
  return p;
}
