// The hold method (seed 004): at the instant the export's hold filter starts queueing changes, the
// copier reads the source device directly (no copy-before-write, no container), and at the end the
// queue is sent on in arrival order; the instant ends only once the last held change has landed.
//   all            every change is held until release.
//   backup-blocks  only changes to used blocks not yet copied (claim 11): the copier is urged to take
//                  those blocks next, and each held change goes as soon as its blocks are copied;
//                  a change to a copied or free block goes at once.
//   metadata       only changes to the file system's metadata blocks as of the instant (claim 10,
//                  fs/metadata-map.ts): everything is held until that map is read (through the
//                  instant), then changes to other blocks go; the structure is one instant, file
//                  data may be newer.
// Hold limit reached: nothing fails. The queue is sent on in order THROUGH copy-before-write (armed
// on the same map first, so each released change to a block not yet copied saves its original),
// and the rest of the backup is copy-before-write; the facts say so (fellBack).
import type { ErrorPolicy } from '../copy/errors';
import { UnreadableBlockError } from '../copy/errors';
import { CopyMap } from '../copy/copy-map';
import type { SavedOriginals } from '../copy/engine';
import type { BlockReader, Device } from '../device/device';
import { HoldLog, type HoldLogSpec, type HoldLogStats } from '../export/hold-log';
import { HOLD_BLOCK, type HoldFilter, type HoldPolicy, type HoldStats } from '../export/hold-filter';
import type { SnapshotFilter } from '../export/snapshot-filter';
import { Bitset } from '../util/bitset';
import { UserError } from '../util/errors';
import { CopyBeforeWrite } from './cbw';
import { DEFAULT_WRITE_WAIT_LIMIT_MS } from './cbw-method';
import type { Container } from './container';
import { checkFreezeMount, withFrozen } from './freeze';
import type { PointInTime, SnapshotMethod } from './method';
import { openContainer, parseContainer } from './parse-container';
import { SnapshotView } from './snapshot-view';
import { DEFAULT_THROTTLE, Sleepers } from './throttle';
import { busyPace, DEFAULT_WRITER_PRIORITY } from './writer-priority';

import { DEFAULT_HOLD_LIMIT, type HoldMode } from './hold-modes';
import { readMetadataMap } from '../fs/metadata-map';
import { usedAtBlockSize } from '../fs/used-map';

/**
 * --hold metadata on a volume whose metadata livesnap cannot name: refused, with what to use instead.
 * XFS only with --freeze: its log holds partial buffers, so a block reassigned as metadata in the log
 * alone (not on disk at the instant) would be replayed over newer bytes; a frozen XFS has its
 * metadata on disk. (ext4's journal holds whole blocks, and its copies count as metadata.)
 */
async function checkMetadataFileSystem(device: BlockReader, freeze: string | undefined): Promise<void> {
  const [{ extReader }, { xfsReader }] = await Promise.all([import('../fs/ext4'), import('../fs/xfs')]);
  if (await extReader.probe(device)) return;
  if (await xfsReader.probe(device)) {
    if (freeze) return;
    throw new UserError('--hold metadata of an XFS file system needs --freeze MOUNTPOINT: without it the metadata on the device may lag behind the log, and its map could miss blocks', 'add --freeze with the mount point, or use --hold all or --hold backup-blocks');
  }
  await readMetadataMap(device); // throws the UserError that names what the volume holds
}

export { DEFAULT_HOLD_LIMIT, HOLD_MODES, type HoldMode } from './hold-modes';

export interface HoldOptions {
  device: Device;
  hold: HoldFilter;
  /** The export's snapshot filter: copy-before-write attaches here if the limit is reached. */
  gate: SnapshotFilter;
  mode?: HoldMode;
  limitBytes?: number;
  /** --container for the fallback (default memory:64M), opened if the limit is reached, or at arming with --freeze (the thaw's writes save their originals there). */
  container?: string;
  freeze?: string;
  onError?: ErrorPolicy;
  writeWaitLimitMs?: number;
  log?(line: string): void;
  /** --hold-log: held changes go to this durable log and are acknowledged at once (export/hold-log.ts). */
  holdLog?: { spec: HoldLogSpec; stateDir: string; device: { path: string; key: string; size: number } };
}

/** What `status` and progress events show of a hold. */
export interface HoldJobStats extends HoldStats {
  mode: HoldMode;
  limitBytes: number;
  fellBack: boolean;
  pendingBlocks: number;
  log?: HoldLogStats & { path: string };
}

export class HoldMethod implements SnapshotMethod {
  readonly name = 'hold' as const;
  private statsNow: (() => HoldJobStats) | undefined;
  constructor(private readonly o: HoldOptions) {}

  /** Live numbers of the armed hold (undefined before arming). */
  stats(): HoldJobStats | undefined { return this.statsNow?.(); }

  async arm(): Promise<PointInTime> {
    const { device, hold, gate } = this.o;
    const mode = this.o.mode ?? 'all';
    const limit = this.o.limitBytes ?? DEFAULT_HOLD_LIMIT;
    const containerSpec = parseContainer(this.o.container);
    const bs = HOLD_BLOCK;
    const total = Math.ceil(device.size / bs);
    const t0 = performance.now();
    // Every block pending until the used map narrows it: before that, backup-blocks holds everything.
    const map = new CopyMap(total, true);
    const prepareMs = performance.now() - t0;
    let err: Error | undefined;
    let engine: { urge(first: number, end: number): void; readonly urgentBlocks: number } | undefined;
    let used: Bitset | undefined;
    // The fallback, once the limit is reached.
    let cbw: CopyBeforeWrite | undefined;
    let container: Container | undefined;
    let view: SnapshotView | undefined;
    let fellBackAt: number | undefined;
    let falling: Promise<void> | undefined;
    let watchdog: NodeJS.Timeout | undefined;
    let releaseMs: number | undefined;
    let active = true;
    const sleepers = new Sleepers();
    const fail = (e: Error) => {
      err ??= e;
      active = false;
      // Writers first: nothing more is held and the queue goes on now.
      if (cbw) gate.detach(cbw);
      void hold.release();
    };

    const policy: HoldPolicy = mode === 'backup-blocks' ? (f, e) => map.needsWork(f, e) : () => true;
    // --hold metadata: what the map said (undefined until read, or when it could not be read).
    let metadata: { blocks: number; ms: number; notes: string[] } | undefined;
    let metadataProblem: string | undefined;
    /** Opens the container and makes copy-before-write on the hold's map (not attached yet). */
    const openCbw = async (): Promise<boolean> => {
      const c = await openContainer(containerSpec, device, bs);
      if (c.kind === 'inside') {
        await c.close();
        throw new UserError('--method hold cannot use a container inside the volume', 'give --container memory:SIZE, file:PATH on another file system, or partition:DEVICE');
      }
      if (!active) { await c.close(); return false; }
      container = c;
      if (used) map.pending.andWith(used); // the used map is known: only its blocks need originals
      cbw = new CopyBeforeWrite(map, device, c, bs, device.size, DEFAULT_THROTTLE, sleepers, {
        urge: (f, e) => engine?.urge(f, e),
        badBlock: (block, errno) => { if ((this.o.onError ?? 'abort') === 'abort') fail(new UnreadableBlockError(block, block * bs, device.path, errno)); },
        fail,
      });
      view = new SnapshotView(map, device, c, bs);
      const waitLimit = this.o.writeWaitLimitMs ?? DEFAULT_WRITE_WAIT_LIMIT_MS;
      watchdog = setInterval(() => {
        const waited = cbw!.longestWaitMs();
        if (waited > waitLimit) fail(new UserError(
          `a write to the export was held ${(waited / 1000).toFixed(1)} s by copy-before-write (the container was full): the snapshot was released so writers go on, and this backup is abandoned`,
          `give a larger --hold-limit or --container, or a larger --write-wait-limit (now ${waitLimit / 1000} s)`,
        ));
      }, Math.min(250, waitLimit / 4));
      return true;
    };
    const fallBack = () => {
      if (falling || !active) return;
      fellBackAt = performance.now();
      this.o.log?.(`hold limit of ${limit} bytes reached: releasing the queue in order and continuing with copy-before-write (${containerSpec.kind})`);
      // Until the container is open, writers keep queueing (over the limit for that long, never failed).
      falling = (async () => {
        if (!cbw) {
          try {
            if (!(await openCbw())) return;
          } catch (e) {
            fail(e as Error);
            return;
          }
          gate.attach(cbw!);
        }
        // The queue (and the log) goes on in order through copy-before-write; nothing new is held.
        void hold.release();
      })();
    };
    const hooks = {
      held: mode === 'backup-blocks' ? (f: number, e: number) => engine?.urge(f, e) : undefined,
      overLimit: fallBack,
    };

    // --hold metadata names the metadata of ext2/3/4 and XFS only: anything else is refused before the instant.
    if (mode === 'metadata') await checkMetadataFileSystem(device, this.o.freeze);
    // The log is made (header durable, named in the state directory) before the instant.
    const log = this.o.holdLog ? await HoldLog.create(this.o.holdLog.spec, this.o.holdLog.stateDir, this.o.holdLog.device) : undefined;
    // The instant: arming is O(1); with --freeze it runs inside the freeze window.
    let drained: Promise<void>;
    let freezeMs: number;
    let presyncMs = 0;
    if (this.o.freeze) {
      // The thaw writes (the superblock) and must not wait for the end of the backup: the instant
      // is copy-before-write armed inside the freeze window, and the hold starts once thawed. So
      // the changes of the thaw save their originals into the container (opened here, before).
      const undo = async (e: unknown) => {
        clearInterval(watchdog);
        if (cbw) gate.detach(cbw);
        await container?.close();
        await log?.retire();
        throw e;
      };
      await checkFreezeMount(this.o.freeze, device).then(openCbw).catch(undo);
      const r = await withFrozen(this.o.freeze, async () => ({ drained: gate.attach(cbw!) })).catch(undo);
      hold.arm(policy, hooks, limit, log);
      drained = r.result.drained;
      freezeMs = r.frozenMs;
      presyncMs = r.presyncMs;
    } else {
      const t = performance.now();
      hold.arm(policy, hooks, limit, log);
      drained = gate.drainInFlight();
      freezeMs = performance.now() - t;
    }
    const instant = new Date();
    const td = performance.now();
    await drained;
    const drainMs = performance.now() - td;

    // backup-blocks: each copied block may free held changes (in order).
    if (mode === 'backup-blocks') {
      void (async () => {
        while (active && fellBackAt === undefined) {
          await map.changed.wait();
          if (fellBackAt === undefined) hold.pump();
        }
      })();
    }

    // Metadata reads: the device is the instant while everything is held; after a fallback, the view.
    const reader: BlockReader = {
      get size() { return device.size; },
      read: (off, len) => (view ?? device).read(off, len),
      readMany: (ranges) => (view ?? device).readMany(ranges),
    };
    const source = {
      device,
      map,
      get container(): SavedOriginals | undefined { return container; },
    };
    const holdStats = (): HoldJobStats => ({
      ...hold.holdStats(), mode, limitBytes: limit, fellBack: fellBackAt !== undefined, pendingBlocks: active ? map.pending.setCount : 0,
      ...(log ? { log: { ...log.stats(), path: log.spec.path } } : {}),
    });
    this.statsNow = holdStats;
    // Read through the instant (the device while everything is held): the blocks that are metadata
    // at the instant. A map that cannot be read leaves every change held (as --hold all), and says so.
    const narrowToMetadata = async () => {
      const t = performance.now();
      try {
        const m = await readMetadataMap(reader);
        if (!active) return;
        const meta = usedAtBlockSize({ ...m, usedBlocks: m.bitmap.setCount, allBlocks: false }, bs, total);
        metadata = { blocks: meta.setCount, ms: performance.now() - t, notes: m.notes };
        this.o.log?.(`metadata map read in ${metadata.ms.toFixed(0)} ms: ${meta.setCount} of ${total} blocks are held from now on (${m.notes.join('; ')})`);
        if (fellBackAt === undefined) hold.narrow((f, e) => meta.any(f, e));
      } catch (e) {
        metadataProblem = `the metadata map could not be read (${(e as Error).message}): every write was held, as with --hold all`;
        this.o.log?.(metadataProblem);
      }
    };
    let releasing: Promise<void> | undefined;
    const releaseAll = () => (releasing ??= (async () => {
      active = false;
      clearInterval(watchdog);
      map.changed.notify();
      await falling;
      const t = performance.now();
      // The copy is over (or abandoned): no original is needed any more, so copy-before-write goes first.
      if (cbw) gate.detach(cbw);
      await hold.release();
      releaseMs ??= performance.now() - t;
      if (cbw) while (cbw.activeSaves > 0) await map.changed.wait();
      await container?.close();
    })());
    return {
      instant,
      reader,
      restrict: (usedMap) => {
        const u = new Bitset(total);
        const fbs = usedMap.blockSize;
        for (const [s, e] of usedMap.bitmap.runs()) u.setRange(Math.floor((s * fbs) / bs), Math.ceil((e * fbs) / bs));
        used = u;
        map.pending.andWith(u);
        // Originals saved (after a fallback) for blocks the backup does not hold: give the room back.
        if (container) {
          for (const blk of [...container.blocks()]) if (!u.get(blk)) { map.unsave(blk); container.drop(blk); }
        }
        map.changed.notify();
        hold.pump(); // backup-blocks: changes to free blocks go now
        if (mode === 'metadata') void narrowToMetadata();
        return { blockSize: bs, used: u, source };
      },
      failure: () => err,
      pace: {
        // Held changes do not touch the device: full speed with `all`. With metadata the changes not
        // held do, and so does everything once copy-before-write took over: then the copier leaves
        // the disk room while clients write. (backup-blocks: held writers wait for the copier, which
        // must not slow down; paced, its backups under steady writers did not finish in 10 s.)
        writersActive: () => (mode === 'metadata' || fellBackAt !== undefined) && performance.now() - gate.activity.lastEnterAt < 50,
        writersStarved: () => (cbw?.waitingForSpace ?? 0) > 0,
        busy: busyPace(DEFAULT_WRITER_PRIORITY),
      },
      copying: (e) => {
        engine = e;
        if (mode === 'backup-blocks') for (const [f, end] of hold.heldRanges()) e.urge(f, end);
      },
      facts: () => {
        const h = hold.holdStats();
        const c = cbw?.stats;
        return {
          freezeMs, presyncMs, prepareMs, drainMs,
          container: container?.description ?? 'none (hold)', containerKind: container?.kind ?? 'none',
          worstWriteDelayMs: Math.max(h.maxHoldMs, c?.worstWriteDelayMs ?? 0),
          writesDelayed: h.heldWrites + (c?.writesDelayed ?? 0), writesThrottled: c?.writesThrottled ?? 0,
          blocksSavedByWriters: c?.blocksSaved ?? 0, blocksCopiedForWaitingWriters: engine?.urgentBlocks ?? 0,
          containerCapacityBytes: container ? container.capacity * bs : 0, containerPeakBytes: container ? container.peak * bs : 0,
          writerPriority: DEFAULT_WRITER_PRIORITY,
          hold: {
            mode, holdLimitBytes: limit, heldWrites: h.heldWrites, maxHoldMs: h.maxHoldMs, maxQueuedMs: h.maxQueuedMs, peakHeldBytes: h.peakBytes,
            releaseMs: releaseMs ?? null, fellBack: fellBackAt !== undefined, loggedWrites: h.loggedWrites,
            ...(log ? { log: { path: log.spec.path, ...log.stats() } } : {}),
            ...(fellBackAt !== undefined ? { fellBackAfterMs: fellBackAt - td } : {}),
            ...(mode === 'metadata' ? { metadataBlocks: metadata?.blocks ?? null, metadataMs: metadata?.ms ?? null, ...(metadataProblem ? { metadataProblem } : {}) } : {}),
          },
        };
      },
      release: releaseAll,
      fail,
    };
  }
}
