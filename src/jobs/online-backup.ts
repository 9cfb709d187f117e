// Online backup of a served volume (seed 001 FIG. 13): open the container, prepare the map (every
// block pending), [freeze] arm [thaw], let in-flight writes land, read the used-block map THROUGH the
// snapshot view, refine, copy (copier + copy-before-write), finish, disarm, release. Any failure or a
// cancel disarms first — writers are released at once and never see an error — then cleans up.
import type { ErrorPolicy } from '../copy/block-copier';
import type { BlockReader, Device } from '../device/device';
import type { UsedBlockMap } from '../fs/used-map';
import { ImageSink } from '../sink/image-sink';
import { CompletenessCheck } from '../sink/completeness';
import type { BackupSink, VolumeInfo } from '../sink/sink';
import type { SnapshotGate } from '../snapshot/cbw';
import type { Container } from '../snapshot/container';
import { Copier } from '../snapshot/copier';
import { busyOverridden, busyPace, DEFAULT_WRITER_PRIORITY, type WriterPriority } from '../snapshot/writer-priority';
import { AutoPace, type AutoPaceStats } from '../snapshot/auto-pace';
import { type ContainerSpec, openContainer, parseContainer } from '../snapshot/parse-container';
import { SnapshotSession, type SnapshotStats } from '../snapshot/session';
import type { ThrottlePolicy } from '../snapshot/throttle';
import { UserError } from '../util/errors';
import type { CopySummary } from './backup';
import { checkFreezeMount, withFrozen } from './freeze';
import { TOOL_VERSION } from './version';

export type OnlineBackupEvent =
  | { event: 'armed'; time: string; freezeMs: number; presyncMs: number; prepareMs: number; drainMs: number; container: string }
  | { event: 'map'; filesystem: string; usedBlocks: number; totalBlocks: number; blockSize: number; notes: string[] }
  | { event: 'progress'; bytesDone: number; bytesTotal: number; badBlocks: number; stats: SnapshotStats }
  | { event: 'done'; summary: OnlineBackupSummary };

export interface OnlineBackupOptions {
  /** The served device (the export's backing device). Writable if the container is inside it. */
  device: Device;
  /** The export's write hook (see snapshot/intercepting-backend.ts). */
  gate: SnapshotGate;
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
  /** Sink accepts batches in any order. Default: sink.randomAccess, else true for ImageSink. */
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
}

export interface OnlineBackupSummary extends CopySummary {
  method: 'online';
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
}

export const DEFAULT_WRITE_WAIT_LIMIT_MS = 30_000;

export async function runOnlineBackup(opts: OnlineBackupOptions): Promise<OnlineBackupSummary> {
  const started = performance.now();
  const { device } = opts;
  const bs = opts.blockSize ?? 4096;
  const onError = opts.onError ?? 'abort';
  const randomAccess = opts.randomAccess ?? opts.sink.randomAccess ?? opts.sink instanceof ImageSink;
  const sink = new CompletenessCheck(opts.sink);
  if (opts.signal?.aborted) throw cancelled(opts.signal);

  const c = opts.container;
  const container: Container = c !== undefined && typeof c === 'object' && 'save' in c
    ? c
    : await openContainer(typeof c === 'object' ? c : parseContainer(c), device, bs);

  let session: SnapshotSession;
  try {
    session = new SnapshotSession({ device, gate: opts.gate, container, onError, throttle: opts.throttle });
  } catch (e) {
    await container.close();
    throw e;
  }
  opts.onSession?.(session);
  const onAbort = () => session.fail(cancelled(opts.signal!));
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  let sinkBegun = false;
  let watchdog: NodeJS.Timeout | undefined;
  try {
    // 1. The instant. With --freeze the window is freeze + attach + thaw: O(1) whatever the size.
    let drained: Promise<void>;
    let freezeMs: number;
    let presyncMs = 0;
    const priority = opts.writerPriority ?? DEFAULT_WRITER_PRIORITY;
    // Before the instant: the clients' rate with the disk to themselves is auto's baseline.
    const auto = priority === 'auto' && !busyOverridden() ? new AutoPace(opts.gate.activity) : undefined;
    if (opts.freeze) {
      await checkFreezeMount(opts.freeze, device);
      // Wrapped so the drain of in-flight writes is awaited after the thaw, not inside the window.
      const r = await withFrozen(opts.freeze, async () => ({ drained: session.arm() }));
      drained = r.result.drained;
      freezeMs = r.frozenMs;
      presyncMs = r.presyncMs;
    } else {
      const t = performance.now();
      drained = session.arm();
      freezeMs = performance.now() - t;
    }
    session.freezeMs = freezeMs;
    const td = performance.now();
    await drained;
    const drainMs = performance.now() - td;
    const limit = opts.writeWaitLimitMs ?? DEFAULT_WRITE_WAIT_LIMIT_MS;
    watchdog = setInterval(() => {
      const waited = session.cbw.longestWaitMs();
      if (waited <= limit) return;
      session.fail(new UserError(
        `a write to the export was held ${(waited / 1000).toFixed(1)} s by the snapshot (the container was full and the copier could not free it fast enough): the snapshot was released so writers go on, and this backup is abandoned`,
        `give a larger --container, a target that is not a stream (an image file), or a larger --write-wait-limit (now ${limit / 1000} s)`,
      ));
    }, Math.min(250, limit / 4));
    opts.onEvent?.({ event: 'armed', time: session.armedAt!.toISOString(), freezeMs, presyncMs, prepareMs: session.prepareMs, drainMs, container: container.description });
    failIfFailed(session);

    // 2. What the instant holds: the used map read through the snapshot view.
    const readUsed = opts.readUsedMap ?? (await import('../fs/detect')).readUsedBlockMap;
    const map = await readUsed(session.view, opts.source ?? device.path);
    failIfFailed(session);
    const used = session.refine(map);
    const usedBlocks = used.count();
    opts.onEvent?.({ event: 'map', filesystem: map.filesystem, usedBlocks, totalBlocks: session.totalBlocks, blockSize: bs, notes: map.notes });
    const notes = [...map.notes];
    if (container.kind === 'inside') notes.push(`the container file ${(container as { path?: string }).path ?? ''} is inside the volume: its blocks are not in the image (the file reads as zeros there)`);

    const volume: VolumeInfo = {
      source: opts.source ?? device.path,
      size: device.size,
      blockSize: bs,
      totalBlocks: session.totalBlocks,
      usedBlocks,
      filesystem: map.filesystem,
      snapshotTime: session.armedAt!,
      notes,
      toolVersion: TOOL_VERSION,
      layout: map.layout,
    };
    sinkBegun = true;
    await sink.begin(volume, used);

    // 3. Copy.
    const copyStart = performance.now();
    let lastProgress = 0;
    const interval = opts.progressIntervalMs ?? 250;
    const copier = new Copier({
      map: session.map,
      device,
      container,
      slots: session.slots,
      blockSize: bs,
      volumeSize: device.size,
      used,
      sink,
      randomAccess,
      onError,
      // Writers share the device queue with the copier: while any wrote in the last 50 ms the copier
      // uses the batches of --writer-priority (writer-priority.ts, auto-pace.ts); otherwise it reads
      // at full speed.
      busy: auto ? () => auto.pace() : busyPace(priority),
      batchBytes: opts.batchBytes,
      depth: opts.depth,
      maxRate: opts.maxRate,
      writersActive: () => performance.now() - opts.gate.activity.lastEnterAt < 50,
      writersStarved: () => session.cbw.waitingForSpace > 0,
      failed: () => session.failure,
      onProgress: (p) => {
        const now = performance.now();
        if (now - lastProgress < interval) return;
        lastProgress = now;
        opts.onEvent?.({ event: 'progress', bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, badBlocks: p.badBlocks, stats: session.stats() });
      },
    });
    session.copier = copier;
    session.state = 'copying';
    const result = await copier.run();
    failIfFailed(session);
    const copyMs = performance.now() - copyStart;
    await sink.finish({ badBlocks: result.badBlocks });
    const stats = session.stats();
    session.disarm();
    await session.release();

    const summary: OnlineBackupSummary = {
      source: opts.source ?? device.path,
      target: sink.description,
      method: 'online',
      filesystem: map.filesystem,
      blockSize: bs,
      totalBlocks: session.totalBlocks,
      usedBlocks,
      size: device.size,
      bytes: result.bytes,
      blocks: result.blocks,
      badBlocks: result.badBlocks,
      durationMs: performance.now() - started,
      copyMs,
      freezeMs,
      prepareMs: session.prepareMs,
      snapshotTime: session.armedAt!.toISOString(),
      worstWriteDelayMs: stats.worstWriteDelayMs,
      writesDelayed: stats.writesDelayed,
      writesThrottled: stats.writesThrottled,
      blocksSavedByWriters: stats.blocksSaved,
      blocksCopiedForWaitingWriters: stats.urgentBlocks,
      container: container.description,
      containerCapacityBytes: stats.containerCapacityBytes,
      containerPeakBytes: stats.containerPeakBytes,
      writerPriority: priority,
      ...(auto ? { autoPace: auto.stats } : {}),
      notes,
      layout: map.layout,
    };
    opts.onEvent?.({ event: 'done', summary });
    return summary;
  } catch (e) {
    // Writers first: disarm releases every held write and makes the hook a no-op.
    const err = session.failure ?? (e as Error);
    session.fail(err);
    await session.release().catch(() => {});
    if (sinkBegun) await sink.abort(err);
    throw err;
  } finally {
    clearInterval(watchdog);
    opts.signal?.removeEventListener('abort', onAbort);
  }
}

function failIfFailed(s: SnapshotSession): void {
  if (s.failure) throw s.failure;
}

function cancelled(signal: AbortSignal): Error {
  const r = signal.reason;
  if (r instanceof Error && r.name !== 'AbortError') return r;
  return new UserError('the backup was cancelled', 'the export kept serving; no write was lost', 130);
}
