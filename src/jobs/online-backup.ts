// Online backup of a served volume: the backup job (backup-job.ts) with the copy-before-write method
// (snapshot/cbw-method.ts), its events, and the summary the CLI and the daemon report.
import type { ErrorPolicy } from '../copy/errors';
import type { BlockReader, Device } from '../device/device';
import type { UsedBlockMap } from '../fs/used-map';
import type { BackupSink } from '../sink/sink';
import type { AutoPaceStats } from '../snapshot/auto-pace';
import type { SnapshotFilter } from '../export/snapshot-filter';
import type { HoldFilter } from '../export/hold-filter';
import { HoldMethod, type HoldJobStats, type HoldMode, type HoldOptions } from '../snapshot/hold-method';
import { CopyBeforeWriteMethod, DEFAULT_WRITE_WAIT_LIMIT_MS } from '../snapshot/cbw-method';
import type { Container } from '../snapshot/container';
import type { ContainerSpec } from '../snapshot/parse-container';
import type { SnapshotSession, SnapshotStats } from '../snapshot/session';
import type { ThrottlePolicy } from '../snapshot/throttle';
import { DEFAULT_WRITER_PRIORITY, type WriterPriority } from '../snapshot/writer-priority';
import { UserError } from '../util/errors';
import type { CopySummary } from './backup';
import { runBackupJob } from './backup-job';
import { SelectingMethod, type SelectionOptions } from './incremental-selection';

export type OnlineBackupEvent =
  | { event: 'armed'; time: string; freezeMs: number; presyncMs: number; prepareMs: number; drainMs: number; container: string }
  | { event: 'map'; filesystem: string; usedBlocks: number; totalBlocks: number; blockSize: number; notes: string[] }
  | { event: 'progress'; bytesDone: number; bytesTotal: number; badBlocks: number; stats: SnapshotStats }
  | { event: 'done'; summary: OnlineBackupSummary };

export interface OnlineBackupOptions {
  /** The served device (the export's backing device). Writable if the container is inside it. */
  device: Device;
  /** The export's write hook (see snapshot/intercepting-backend.ts). */
  gate: SnapshotFilter;
  sink: BackupSink;
  /** Name shown in the image's metadata (export name). Default: the device path. */
  source?: string;
  /** --container: spec text ("memory:64M", "file:/x", "partition:/dev/y"), a parsed spec, or an open container. */
  container?: string | ContainerSpec | Container;
  /** Snapshot block size (default 4096). */
  blockSize?: number;
  /** --freeze: mount point of the file system on the export, frozen around the arming. */
  freeze?: string;
  onError?: ErrorPolicy;
  throttle?: Partial<ThrottlePolicy>;
  /** Sink accepts batches in any order. Default: sink.randomAccess. */
  randomAccess?: boolean;
  signal?: AbortSignal;
  /** How the used-block map is read (default: src/fs/detect.ts readUsedBlockMap). */
  readUsedMap?: (reader: BlockReader, name: string) => Promise<UsedBlockMap>;
  onEvent?: (e: OnlineBackupEvent) => void;
  /** Gets the session as soon as it exists (for `livesnap status`). */
  onSession?: (s: SnapshotSession) => void;
  progressIntervalMs?: number;
  batchBytes?: number;
  depth?: number;
  /** Bytes per second at most (--max-rate). */
  maxRate?: number;
  /** --writer-priority: how much of the disk the copier leaves to clients while they write. */
  writerPriority?: WriterPriority;
  /**
   * --write-wait-limit: the longest a client write may be held by the snapshot (a full container,
   * a stalled target) before the snapshot is broken and the backup fails, so writers go on. Default
   * 30 s: below the kernel's 120 s hung-task warning and any sane nbd-client -timeout.
   */
  writeWaitLimitMs?: number;
  /** --method hold: the export's hold filter, the mode, and the limit (hold-method.ts). */
  /** A served export's change tracking: the backup starts a new epoch; --incremental, the protection map. */
  selection?: SelectionOptions;
  hold?: { filter: HoldFilter; mode?: HoldMode; limitBytes?: number; holdLog?: HoldOptions['holdLog']; onStats?: (stats: () => HoldJobStats | undefined) => void; log?: (line: string) => void };
}

/** What the done event says of a hold (--method hold). */
export interface HoldSummary {
  mode: HoldMode;
  holdLimitBytes: number;
  heldWrites: number;
  /** The longest a client waited for the acknowledgement of a held change; how long one stayed queued. */
  maxHoldMs: number;
  maxQueuedMs: number;
  peakHeldBytes: number;
  releaseMs: number;
  /** The limit was reached: the queue was released in order and the rest was copy-before-write. */
  fellBack: boolean;
  fellBackAfterMs?: number;
  /** Of heldWrites, acknowledged from the durable log (--hold-log), and the log's numbers. */
  loggedWrites: number;
  log?: { path: string; records: number; bytes: number; capacity: number; syncs: number; full: boolean };
}

/** Where the backup stands in its chain (the done event and the manifest say the same). */
export interface ChainSummary {
  id: string;
  parent: string | null;
  kind: 'full' | 'incremental';
  fullBecause?: string;
  granularity: number;
  /** Blocks written since the parent (regions of the change map, in blocks), whether used or not. */
  changedBlocks: number;
  /** 64 KiB regions of the change map written since the parent (what survives a crash). */
  changedRegions: number;
  zeroedBlocks: number;
  excludedBytes: number;
  excludedFiles: string[];
}

export interface OnlineBackupSummary extends CopySummary {
  chain?: ChainSummary;
  method: 'online' | 'hold';
  freezeMs: number;
  prepareMs: number;
  snapshotTime: string;
  worstWriteDelayMs: number;
  writesDelayed: number;
  writesThrottled: number;
  blocksSavedByWriters: number;
  blocksCopiedForWaitingWriters: number;
  container: string;
  containerCapacityBytes: number;
  containerPeakBytes: number;
  writerPriority: WriterPriority;
  /** With --writer-priority auto: the baseline it kept the clients to, and how it stepped. */
  autoPace?: AutoPaceStats;
  hold?: HoldSummary;
  heldWrites?: number;
  maxHoldMs?: number;
  releaseMs?: number;
}

export { DEFAULT_WRITE_WAIT_LIMIT_MS };

export async function runOnlineBackup(opts: OnlineBackupOptions): Promise<OnlineBackupSummary> {
  const { device } = opts;
  const bs = opts.blockSize ?? 4096;
  const priority = opts.writerPriority ?? DEFAULT_WRITER_PRIORITY;
  let session: SnapshotSession | undefined;
  const h = opts.hold;
  const holdMethod = h ? new HoldMethod({
    device, hold: h.filter, gate: opts.gate, mode: h.mode, limitBytes: h.limitBytes, container: typeof opts.container === 'string' ? opts.container : undefined,
    freeze: opts.freeze, onError: opts.onError, writeWaitLimitMs: opts.writeWaitLimitMs, log: h.log, holdLog: h.holdLog,
  }) : undefined;
  h?.onStats?.(() => holdMethod?.stats());
  const base = holdMethod ?? new CopyBeforeWriteMethod({
    device, gate: opts.gate, container: opts.container, blockSize: bs, freeze: opts.freeze, onError: opts.onError,
    throttle: opts.throttle, writerPriority: priority, writeWaitLimitMs: opts.writeWaitLimitMs,
    onSession: (s) => { session = s; opts.onSession?.(s); },
  });
  const selecting = opts.selection ? new SelectingMethod(base, opts.selection, bs, Math.ceil(device.size / bs)) : undefined;
  const method = selecting ?? base;
  let lastProgress = 0;
  const interval = opts.progressIntervalMs ?? 250;
  const r = await runBackupJob({
    method,
    sink: opts.sink,
    randomAccess: opts.randomAccess,
    source: opts.source ?? device.path,
    volumeSize: device.size,
    onError: opts.onError,
    maxRate: opts.maxRate,
    signal: opts.signal,
    cancelled: () => cancelled(opts.signal!),
    readUsedMap: opts.readUsedMap,
    backupIdentity: () => selecting?.identity,
    batchBytes: opts.batchBytes,
    depth: opts.depth,
    onArmed: (pit) => {
      const f = pit.facts();
      opts.onEvent?.({ event: 'armed', time: pit.instant.toISOString(), freezeMs: f.freezeMs ?? 0, presyncMs: f.presyncMs ?? 0, prepareMs: Number(f.prepareMs), drainMs: Number(f.drainMs), container: String(f.container) });
    },
    onMap: (map, usedBlocks) => opts.onEvent?.({ event: 'map', filesystem: map.filesystem, usedBlocks, totalBlocks: Math.ceil(device.size / bs), blockSize: bs, notes: map.notes }),
    onProgress: (p) => {
      const now = performance.now();
      const hs = holdMethod?.stats();
      if (now - lastProgress < interval || (!session && !hs)) return;
      lastProgress = now;
      opts.onEvent?.({ event: 'progress', bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, badBlocks: p.badBlocks, stats: session ? session.stats() : holdProgress(hs!, bs, device.size) });
    },
  });
  const f = r.facts;
  const summary: OnlineBackupSummary = {
    source: opts.source ?? device.path,
    target: opts.sink.description,
    method: holdMethod ? 'hold' : 'online',
    filesystem: r.map.filesystem,
    blockSize: bs,
    totalBlocks: r.totalBlocks,
    usedBlocks: r.usedBlocks,
    size: device.size,
    bytes: r.copy.bytes,
    blocks: r.copy.blocks,
    badBlocks: r.copy.badBlocks,
    durationMs: r.durationMs,
    copyMs: r.copy.durationMs,
    freezeMs: f.freezeMs ?? 0,
    prepareMs: Number(f.prepareMs),
    snapshotTime: r.instant.toISOString(),
    worstWriteDelayMs: Number(f.worstWriteDelayMs),
    writesDelayed: Number(f.writesDelayed),
    writesThrottled: Number(f.writesThrottled),
    blocksSavedByWriters: Number(f.blocksSavedByWriters),
    blocksCopiedForWaitingWriters: Number(f.blocksCopiedForWaitingWriters),
    container: String(f.container),
    containerCapacityBytes: Number(f.containerCapacityBytes),
    containerPeakBytes: Number(f.containerPeakBytes),
    writerPriority: priority,
    ...(f.autoPace && !holdMethod ? { autoPace: f.autoPace as AutoPaceStats } : {}),
    ...(f.hold ? holdFields(f.hold as HoldSummary) : {}),
    notes: r.notes,
    layout: r.map.layout,
    ...(selecting?.identity ? { chain: chainSummary(selecting) } : {}),
  };
  opts.onEvent?.({ event: 'done', summary });
  return summary;
}

function chainSummary(m: SelectingMethod): ChainSummary {
  const id = m.identity!;
  return {
    id: id.id, parent: id.parent, kind: id.kind, ...(id.fullBecause ? { fullBecause: id.fullBecause } : {}), granularity: id.granularity,
    changedBlocks: m.changedBlocks, changedRegions: m.changedRegions, zeroedBlocks: id.zeroed?.setCount ?? 0, excludedBytes: id.excludedBytes, excludedFiles: m.excludedFiles,
  };
}

function holdFields(hs: HoldSummary): Pick<OnlineBackupSummary, 'hold' | 'heldWrites' | 'maxHoldMs' | 'releaseMs'> {
  return { hold: hs, heldWrites: hs.heldWrites, maxHoldMs: hs.maxHoldMs, releaseMs: hs.releaseMs };
}

/** A hold's numbers in the shape of the progress event's snapshot stats (held changes are the writes waiting). */
function holdProgress(hs: HoldJobStats, bs: number, size: number): SnapshotStats {
  return {
    writesWaiting: hs.count, writesDelayed: hs.heldWrites, worstWriteDelayMs: hs.maxHoldMs, blocksSaved: 0, writesThrottled: 0,
    state: 'copying', blockSize: bs, totalBlocks: Math.ceil(size / bs), pendingBlocks: hs.pendingBlocks, containerKind: 'none',
    containerCapacityBytes: 0, containerUsedBytes: 0, containerPeakBytes: 0, urgentBlocks: 0, prepareMs: 0,
    ...({ held: { count: hs.count, bytes: hs.bytes, oldestMs: hs.oldestMs, fellBack: hs.fellBack } } as object),
  };
}

function cancelled(signal: AbortSignal | undefined): Error {
  const r = signal?.reason;
  if (r instanceof Error && r.name !== 'AbortError') return r;
  return new UserError('the backup was cancelled', 'the export kept serving; no write was lost', 130);
}
