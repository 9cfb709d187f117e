// `backup <export> --to appliance://HOST:PORT` on the host (seed 002, claims 3-5): the host copies
// nothing. It arms copy-before-write on the export with the appliance as its container, flushes the
// device (the LUN then holds every acknowledged write), tells the appliance the unit, size and
// instant with a fingerprint of the volume, and from then on a write to a block whose original is
// not saved yet waits until the appliance has that original. Blocks the appliance reports read need
// no original any more. The job ends when the appliance says its output is complete. Any fault of
// the link (cut, appliance dead, silent for --appliance-timeout, a write held that long) breaks the
// snapshot at once: writers go on, none fails, the job fails with the reason (QEMU's
// on-cbw-error=break-snapshot with cbw-timeout).
import * as os from 'node:os';
import { connectAppliance } from '../appliance/link';
import { type ApplianceMessage, type Done, LINK_VERSION } from '../appliance/link-protocol';
import { RemoteContainer } from '../appliance/remote-container';
import type { Device } from '../device/device';
import type { SnapshotFilter } from '../export/snapshot-filter';
import type { PskKeys } from '../nbd/tls-psk';
import { withFrozen, checkFreezeMount } from '../snapshot/freeze';
import { SnapshotSession } from '../snapshot/session';
import { UserError } from '../util/errors';
import { blockHash, fingerprintBlocks } from '../appliance/fingerprint';

export const DEFAULT_APPLIANCE_TIMEOUT_MS = 30_000;
const BS = 4096;

export type ApplianceBackupEvent =
  | { event: 'armed'; time: string; freezeMs: number; presyncMs: number; drainMs: number; flushMs: number; container: string; output: string }
  | { event: 'progress'; bytesDone: number; bytesTotal: number; writesWaiting: number; originalsSentBytes: number; odcUsedBytes: number };

export interface ApplianceBackupOptions {
  device: Device;
  gate: SnapshotFilter;
  /** The export's name: the appliance's --lun NAME. */
  unit: string;
  address: { host: string; port: number };
  keys: PskKeys;
  timeoutMs?: number;
  /** --freeze: mount point of the file system on the export, frozen around the arming. */
  freeze?: string;
  signal?: AbortSignal;
  onEvent?: (e: ApplianceBackupEvent) => void;
  onSession?: (s: SnapshotSession) => void;
}

export interface ApplianceBackupSummary {
  source: string;
  target: string;
  method: 'appliance';
  snapshotTime: string;
  /** The appliance's output (an archive path, or "run: CMD") and what it holds. */
  output: string;
  outputBytes: number;
  bytes: number;
  blocks: number;
  usedBlocks: number;
  totalBlocks: number;
  filesystem: string;
  checksums: Done['checksums'];
  runStatus?: number;
  durationMs: number;
  freezeMs: number;
  worstWriteDelayMs: number;
  writesDelayed: number;
  /** Blocks whose original a writer sent (first writes to not-yet-read blocks), and the link's bytes. */
  blocksSavedByWriters: number;
  originalsSentBytes: number;
  linkBytesSent: number;
  linkBytesReceived: number;
  /** Originals the appliance substituted into its output, and its ODC's peak. */
  originalsUsed: number;
  odcPeakBytes: number;
  /** CPU time of this process during the job (user + system), ms. */
  cpuMs: number;
  badBlocks: number[];
}

export async function runApplianceBackup(o: ApplianceBackupOptions): Promise<ApplianceBackupSummary> {
  const started = performance.now();
  const cpu0 = process.cpuUsage();
  const timeoutMs = o.timeoutMs ?? DEFAULT_APPLIANCE_TIMEOUT_MS;
  const where = `appliance://${o.address.host.includes(':') ? `[${o.address.host}]` : o.address.host}:${o.address.port}`;
  if (o.freeze) await checkFreezeMount(o.freeze, o.device);
  const link = await connectAppliance(o.address, o.keys, timeoutMs);
  const remote = new RemoteContainer(link, `the appliance at ${where.slice(12)}`, BS, o.device.size);
  let session: SnapshotSession | undefined;
  let failure: Error | undefined;
  let finish!: (d: Done) => void;
  let failJob!: (e: Error) => void;
  const finished = new Promise<Done>((resolve, reject) => { finish = resolve; failJob = reject; });
  finished.catch(() => {});
  let readyResolve!: (r: { output: string }) => void;
  const ready = new Promise<{ output: string }>((r) => { readyResolve = r; });
  let progress = { bytesDone: 0, bytesTotal: 0, odcUsedBytes: 0 };
  let timer: NodeJS.Timeout | undefined;

  // The one way the job fails: writers first (disarm releases every held write), then the link.
  const fail = (e: Error) => {
    if (failure) return;
    failure = e;
    session?.fail(e);
    remote.fail(e);
    if (!link.closed) { link.send({ t: 'cancel', reason: e.message }); link.close(); }
    failJob(e);
  };
  const onAbort = () => fail(o.signal?.reason instanceof Error && o.signal.reason.name !== 'AbortError' ? o.signal.reason : new UserError('the backup was cancelled', 'the export kept serving; no write was lost', 130));
  o.signal?.addEventListener('abort', onAbort, { once: true });

  link.onMessage((m: ApplianceMessage) => {
    switch (m.t) {
      case 'ready': readyResolve(m); remote.ready(); break;
      case 'ack': remote.acked(m.id); break;
      case 'reconciled': {
        const map = session?.map;
        if (map) for (const [a, b] of m.ranges) if (b > a && b <= map.totalBlocks) map.pending.clearRange(a, b);
        break;
      }
      case 'progress': progress = m; o.onEvent?.({ event: 'progress', bytesDone: m.bytesDone, bytesTotal: m.bytesTotal, writesWaiting: session?.cbw.stats.writesWaiting ?? 0, originalsSentBytes: remote.sent.bytes, odcUsedBytes: m.odcUsedBytes }); break;
      case 'done': finish(m); break;
      case 'error': fail(new UserError(`the appliance refused or failed the backup: ${m.message}`, m.hint)); break;
      case 'pong': break;
    }
  });
  link.onClose((e) => {
    if (failure) return;
    fail(new UserError(`the link to ${where} ${e ? `failed: ${e.message}` : 'was closed by the appliance'} before the backup was complete; the snapshot was broken so writers go on`, 'check the appliance (its log says why), then rerun the backup'));
  });

  try {
    session = new SnapshotSession({ device: o.device, gate: o.gate, container: remote, onError: 'abort' });
    o.onSession?.(session);
    remote.onRoom = () => session!.map.changed.notify();
    // The instant, and the hello that tells the appliance of it. No write after arming reaches the
    // device before the appliance acknowledged its original, and that comes after the hello: so
    // the device read here (after the writes in flight at arming landed, and a flush) is the instant.
    // With --freeze all of it happens inside the frozen window: the thaw itself writes (ext4
    // commits its superblock), and that write must find the appliance ready, not wait for a hello
    // sent after the thaw.
    const fp = fingerprintBlocks(session.totalBlocks);
    let drainMs = 0;
    let flushMs = 0;
    const instant = async () => {
      const drained = session!.arm();
      const td = performance.now();
      await drained;
      drainMs = performance.now() - td;
      const tf = performance.now();
      // The appliance reads the LUN, not this host's cache: every acknowledged write must be on it.
      await o.device.sync();
      flushMs = performance.now() - tf;
      const bufs = await o.device.readMany(fp.map((b) => ({ offset: b * BS, length: Math.min(BS, o.device.size - b * BS) })));
      link.send({
        t: 'hello', version: LINK_VERSION, unit: o.unit, size: o.device.size, blockSize: BS, instant: session!.armedAt!.toISOString(),
        host: os.hostname(), fingerprint: fp.map((b, i) => [b, blockHash(bufs[i]!)] as [number, string]), timeoutMs,
      });
    };
    let freezeMs = 0;
    let presyncMs = 0;
    if (o.freeze) {
      const r = await withFrozen(o.freeze, instant);
      freezeMs = r.frozenMs;
      presyncMs = r.presyncMs;
    } else {
      const t = performance.now();
      await instant();
      freezeMs = performance.now() - t;
    }
    session.recordFreeze(freezeMs);
    timer = setInterval(() => {
      if (failure) return;
      // The snapshot itself broke (an original could not be read): the job ends with that.
      if (session!.failure) return fail(session!.failure);
      if (!link.closed) link.send({ t: 'ping', at: Date.now() });
      const silent = performance.now() - link.lastHeard;
      if (silent > timeoutMs) fail(new UserError(`${where} stopped answering (nothing for ${(silent / 1000).toFixed(1)} s, --appliance-timeout ${timeoutMs / 1000} s): the snapshot was broken so writers go on, and this backup is abandoned`, 'check the appliance and the network, then rerun the backup'));
      const waited = session!.cbw.longestWaitMs();
      if (waited > timeoutMs) fail(new UserError(`a write to the export was held ${(waited / 1000).toFixed(1)} s waiting for ${where} to take its original (--appliance-timeout ${timeoutMs / 1000} s): the snapshot was broken so writers go on, and this backup is abandoned`, 'give the appliance a larger --odc, or a larger --appliance-timeout'));
    }, Math.min(1000, timeoutMs / 4));
    const r = await Promise.race([ready, finished.then(() => { throw new Error('the appliance ended the unit before it was ready'); })]);
    o.onEvent?.({ event: 'armed', time: session.armedAt!.toISOString(), freezeMs, presyncMs, drainMs, flushMs, container: remote.description, output: r.output });
    const done = await finished;
    // A snapshot that broke before the end (an original could not be read) left writes through:
    // the appliance's output is not the instant, and a cancel makes it remove it.
    const broke = failure ?? session.failure;
    if (broke) throw broke;
    if (done.runStatus !== undefined && done.runStatus !== 0) {
      throw new UserError(`the appliance's --run program exited with status ${done.runStatus}: the instant was not backed up`, 'see the appliance\'s log for the program\'s own messages, then rerun the backup');
    }
    link.send({ t: 'commit' });
    // The output is complete: writes go straight on from now; the numbers are those of the snapshot.
    session.disarm();
    const st = session.stats();
    const sent = { ...remote.sent };
    // Saves still waiting for an ack need not: the output is complete, their writes go on now.
    remote.fail(new Error('the appliance\'s output is complete'));
    await session.release();
    const cpu = process.cpuUsage(cpu0);
    return {
      source: o.unit,
      target: where,
      method: 'appliance',
      snapshotTime: session.armedAt!.toISOString(),
      output: done.output,
      outputBytes: done.outputBytes,
      bytes: done.bytes,
      blocks: done.blocks,
      usedBlocks: done.usedBlocks,
      totalBlocks: done.totalBlocks,
      filesystem: done.filesystem,
      checksums: done.checksums,
      ...(done.runStatus !== undefined ? { runStatus: done.runStatus } : {}),
      durationMs: performance.now() - started,
      freezeMs,
      worstWriteDelayMs: st.worstWriteDelayMs,
      writesDelayed: st.writesDelayed,
      blocksSavedByWriters: sent.blocks,
      originalsSentBytes: sent.bytes,
      linkBytesSent: link.bytesOut,
      linkBytesReceived: link.bytesIn,
      originalsUsed: done.originalsUsed,
      odcPeakBytes: Math.max(done.odcPeakBytes, progress.odcUsedBytes),
      cpuMs: (cpu.user + cpu.system) / 1000,
      badBlocks: [],
    };
  } catch (e) {
    fail(failure ?? (e as Error));
    await session?.release().catch(() => {});
    throw failure ?? e;
  } finally {
    clearInterval(timer);
    o.signal?.removeEventListener('abort', onAbort);
    if (!link.closed) link.close();
  }
}
