// Copy-before-write on a served export (seed 001 FIG. 13): open the container, prepare the map (every
// block pending, before any freeze), [freeze] arm [thaw], let in-flight writes land; from then on a
// write to a block not yet copied saves its original first. The instant is lent out through the
// snapshot view (metadata) and the engine's source (map + device + container); release disarms and
// frees the container. Writers are never failed: a broken snapshot releases them at once.
import type { ErrorPolicy } from '../copy/errors';
import type { Device } from '../device/device';
import { UserError } from '../util/errors';
import { AutoPace, type AutoPaceStats } from './auto-pace';
import type { SnapshotFilter } from '../export/snapshot-filter';
import type { Container } from './container';
import { checkFreezeMount, withFrozen } from './freeze';
import type { PointInTime, SnapshotMethod } from './method';
import { type ContainerSpec, openContainer, parseContainer } from './parse-container';
import { SnapshotSession } from './session';
import type { ThrottlePolicy } from './throttle';
import { busyOverridden, busyPace, DEFAULT_WRITER_PRIORITY, type WriterPriority } from './writer-priority';

/** --write-wait-limit default: below the kernel's 120 s hung-task warning and any sane nbd-client -timeout. */
export const DEFAULT_WRITE_WAIT_LIMIT_MS = 30_000;

export interface CbwOptions {
  /** The served device (the export's backing device); writable if the container is inside it. */
  device: Device;
  /** The export's snapshot filter. */
  gate: SnapshotFilter;
  /** --container: spec text, a parsed spec, or an open container. */
  container?: string | ContainerSpec | Container;
  /** Snapshot block size (default 4096). */
  blockSize?: number;
  /** --freeze: mount point of the file system on the export, frozen around the arming. */
  freeze?: string;
  onError?: ErrorPolicy;
  throttle?: Partial<ThrottlePolicy>;
  writerPriority?: WriterPriority;
  /** The longest a client write may be held before the snapshot is broken (ms). */
  writeWaitLimitMs?: number;
  /** Gets the session as soon as it exists (for `livesnap status`). */
  onSession?: (s: SnapshotSession) => void;
}

export class CopyBeforeWriteMethod implements SnapshotMethod {
  readonly name = 'online' as const;
  constructor(private readonly o: CbwOptions) {}

  async arm(): Promise<PointInTime> {
    const { device } = this.o;
    const bs = this.o.blockSize ?? 4096;
    const c = this.o.container;
    const container: Container = c !== undefined && typeof c === 'object' && 'staging' in c
      ? c
      : await openContainer(typeof c === 'object' ? c : parseContainer(c), device, bs);
    let session: SnapshotSession;
    try {
      session = new SnapshotSession({ device, gate: this.o.gate, container, onError: this.o.onError ?? 'abort', throttle: this.o.throttle });
    } catch (e) {
      await container.close();
      throw e;
    }
    this.o.onSession?.(session);
    const priority = this.o.writerPriority ?? DEFAULT_WRITER_PRIORITY;
    // Before the instant: the clients' rate with the disk to themselves is auto's baseline.
    const auto = priority === 'auto' && !busyOverridden() ? new AutoPace(this.o.gate.activity) : undefined;
    let watchdog: NodeJS.Timeout | undefined;
    const release = async () => {
      clearInterval(watchdog);
      await session.release();
    };
    try {
      // The instant. With --freeze the window is freeze + attach + thaw: O(1) whatever the size.
      let drained: Promise<void>;
      let freezeMs: number;
      let presyncMs = 0;
      if (this.o.freeze) {
        await checkFreezeMount(this.o.freeze, device);
        // Wrapped so the drain of in-flight writes is awaited after the thaw, not inside the window.
        const r = await withFrozen(this.o.freeze, async () => ({ drained: session.arm() }));
        drained = r.result.drained;
        freezeMs = r.frozenMs;
        presyncMs = r.presyncMs;
      } else {
        const t = performance.now();
        drained = session.arm();
        freezeMs = performance.now() - t;
      }
      session.recordFreeze(freezeMs);
      const td = performance.now();
      await drained;
      const drainMs = performance.now() - td;
      const limit = this.o.writeWaitLimitMs ?? DEFAULT_WRITE_WAIT_LIMIT_MS;
      watchdog = setInterval(() => {
        const waited = session.cbw.longestWaitMs();
        if (waited <= limit) return;
        session.fail(new UserError(
          `a write to the export was held ${(waited / 1000).toFixed(1)} s by the snapshot (the container was full and the copier could not free it fast enough): the snapshot was released so writers go on, and this backup is abandoned`,
          `give a larger --container, a target that is not a stream (an image file), or a larger --write-wait-limit (now ${limit / 1000} s)`,
        ));
      }, Math.min(250, limit / 4));
      const gate = this.o.gate;
      return {
        instant: session.armedAt!,
        reader: session.view,
        restrict: (map) => ({ blockSize: bs, used: session.refine(map), source: { device, map: session.map, container } }),
        failure: () => session.failure,
        pace: {
          // Writers share the device queue with the copier: while any wrote in the last 50 ms the
          // copier uses the batches of --writer-priority; otherwise it reads at full speed.
          writersActive: () => performance.now() - gate.activity.lastEnterAt < 50,
          writersStarved: () => session.cbw.waitingForSpace > 0,
          busy: auto ? () => auto.pace() : busyPace(priority),
        },
        copying: (engine) => session.copying(engine),
        facts: () => {
          const st = session.stats();
          return {
            freezeMs, presyncMs, prepareMs: session.prepareMs, drainMs, container: container.description, containerKind: container.kind,
            worstWriteDelayMs: st.worstWriteDelayMs, writesDelayed: st.writesDelayed, writesThrottled: st.writesThrottled,
            blocksSavedByWriters: st.blocksSaved, blocksCopiedForWaitingWriters: st.urgentBlocks,
            containerCapacityBytes: st.containerCapacityBytes, containerPeakBytes: st.containerPeakBytes,
            writerPriority: priority, ...(auto ? { autoPace: auto.stats as AutoPaceStats } : {}),
            ...(container.kind === 'inside' ? { insidePath: (container as { path?: string }).path } : {}),
          };
        },
        release,
        fail: (e) => session.fail(e),
      };
    } catch (e) {
      session.fail(e as Error);
      await release().catch(() => {});
      throw e;
    }
  }
}
