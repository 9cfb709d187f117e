// One unit on the appliance (seed 002, FIG. 2-5): a host armed a snapshot of its export and said so
// (hello); the appliance checks that its own path to the shared LUN is that volume, then keeps the
// originals the host sends (ODC + MM, acknowledged once stored) while it reads the LUN itself through
// the reconciled view, into an archive in the store, or into an unmodified backup program through a
// read-only NBD export of the view (--run). Its output is complete only when it says done.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createArchiveSink } from '../archive';
import type { ApplianceLink } from '../appliance/link';
import { type Hello, LINK_VERSION, type Orig } from '../appliance/link-protocol';
import { blockHash } from '../appliance/fingerprint';
import { ModifiedMap, ODC_SLOT, type OriginalDataCache } from '../appliance/odc';
import { ReconciledView } from '../appliance/reconciled-view';
import { CopyMap } from '../copy/copy-map';
import { Device } from '../device/device';
import { NbdServer } from '../nbd/server';
import type { PointInTime, SnapshotMethod } from '../snapshot/method';
import { busyPace } from '../snapshot/writer-priority';
import { readUsedBlockMap } from '../fs/detect';
import { usedAtBlockSize } from '../fs/used-map';
import type { Bitset } from '../util/bitset';
import { PointInTimeBackend } from '../export/point-in-time-backend';
import { UserError } from '../util/errors';
import { runBackupJob } from './backup-job';
import { isS3Url } from '../s3/location';
import type { S3Options } from '../s3/options';

/** An output the host did not confirm: gone from the store (S3 has no ".partial" to leave it as). */
async function deleteS3Object(url: string, s3?: S3Options): Promise<void> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports -- the SDK loads only for s3://
  await (require('../s3/destination') as typeof import('../s3/destination')).deleteObject(url, s3);
}

export interface UnitOptions {
  link: ApplianceLink;
  hello: Hello;
  /** --lun NAME=PATH: this appliance's path to each host export's LUN. */
  luns: ReadonlyMap<string, string>;
  /** A directory, or s3://BUCKET/PREFIX/ (archives uploaded as they are made). */
  store: string;
  /** The endpoint and part sizes of an s3:// store. */
  s3?: S3Options;
  odc: OriginalDataCache;
  /** --run CMD: an unmodified program reads the instant from {uri}. */
  run?: string;
  /** Bytes per second the LUN is read at most. */
  maxRate?: number;
  log: (line: string) => void;
}

export interface UnitStatus {
  unit: string;
  host: string;
  instant: string;
  state: 'checking' | 'running' | 'done' | 'failed';
  output: string;
  bytesDone: number;
  bytesTotal: number;
  odcHeldBytes: number;
  originalsKept: number;
  originalsWaiting: number;
  error?: string;
}

/** UTC instant as a file name part: 2026-12-03T05-53-03.123Z. */
function instantName(iso: string): string {
  return iso.replace(/:/g, '-');
}

export class ApplianceUnit {
  readonly status: UnitStatus;
  private lun: Device | undefined;
  private mm: ModifiedMap | undefined;
  private view: ReconciledView | undefined;
  private readonly abort = new AbortController();
  /** Originals waiting for ODC room, in arrival order (their acks wait with them). */
  private waiting: Array<{ m: Orig; payload: Buffer; next: number }> = [];
  private lastAcked = 0;
  private received = 0;
  /** When the host last sent an original: its writers are writing blocks not yet read (they wait on us). */
  private lastOriginalAt = -Infinity;
  private reconciled: Array<[number, number]> = [];
  private flushTimer: NodeJS.Timeout | undefined;
  private silence: NodeJS.Timeout | undefined;
  private paused = false;
  /** Set while `done` waits for the host's commit. */
  private committed: (() => void) | undefined;
  private readonly onRoom = () => this.drainWaiting();
  private readonly totalBlocks: number;

  constructor(private readonly o: UnitOptions) {
    const h = o.hello;
    this.totalBlocks = Math.ceil(h.size / h.blockSize);
    this.status = {
      unit: h.unit, host: h.host, instant: h.instant, state: 'checking', output: '', bytesDone: 0, bytesTotal: 0,
      odcHeldBytes: 0, originalsKept: 0, originalsWaiting: 0,
    };
  }

  /** Runs the unit to its end; never throws (the host is told, the log says). */
  async run(): Promise<void> {
    const { link, hello } = this.o;
    try {
      await this.check();
      const name = `${hello.unit}-${instantName(hello.instant)}.tar`;
      const output = this.o.run ? `run: ${this.o.run}` : isS3Url(this.o.store) ? `${this.o.store}${name}` : path.join(this.o.store, name);
      this.status.output = output;
      link.onMessage((m, payload) => {
        if (m.t === 'orig') this.original(m, payload!);
        else if (m.t === 'ping') link.send({ t: 'pong', at: m.at });
        else if (m.t === 'cancel') this.abort.abort(new UserError(`the host cancelled: ${m.reason}`));
        else if (m.t === 'commit') this.committed?.();
        else if (m.t === 'hello') this.abort.abort(new UserError('the host sent a second hello'));
      });
      link.onClose((e) => {
        if (this.status.state === 'done') return;
        this.abort.abort(new UserError(e ? `${e.message}` : `${link.peer} closed the link before the output was complete`));
      });
      this.o.odc.onRoom(this.onRoom);
      // The host pings every second: silence for its timeout means it (or the link) is gone.
      this.silence = setInterval(() => {
        // While originals wait for ODC room this side stopped reading: that is not the host's silence.
        if (this.waiting.length) return;
        const quiet = performance.now() - link.lastHeard;
        if (quiet > hello.timeoutMs) this.abort.abort(new UserError(`${link.peer} went silent (nothing for ${(quiet / 1000).toFixed(1)} s, its timeout ${hello.timeoutMs / 1000} s): the output is abandoned`));
      }, Math.min(1000, hello.timeoutMs / 4));
      link.send({ t: 'ready', output, odcBytes: this.o.odc.capacity * ODC_SLOT });
      this.status.state = 'running';
      this.o.log(`unit ${hello.unit} from ${hello.host}: instant ${hello.instant}, ${hello.size} bytes; writing ${output}`);
      const done = this.o.run ? await this.runProgram(this.o.run) : await this.archive(output);
      this.flushReconciled();
      // The output stands only if the host's snapshot held to the end: it answers commit, or cancel.
      const confirmed = new Promise<boolean>((resolve) => {
        this.committed = () => resolve(true);
        if (this.abort.signal.aborted) resolve(false);
        this.abort.signal.addEventListener('abort', () => resolve(false), { once: true });
      });
      link.send(done);
      if (!(await confirmed)) {
        if (isS3Url(output)) await deleteS3Object(output, this.o.s3).catch((e: Error) => this.o.log(`unit ${hello.unit}: ${e.message}`));
        else if (!this.o.run) fs.rmSync(output, { force: true });
        throw new UserError(`the host did not confirm the output (its snapshot broke before the end, or it went away)${this.o.run ? '' : `: ${output} removed`}`);
      }
      this.status.state = 'done';
      link.close();
      this.o.log(`unit ${hello.unit}: done, ${done.bytes} bytes of ${done.usedBlocks} used blocks; ${done.originalsUsed} originals substituted of ${done.originalsReceived} received; ODC peak ${done.odcPeakBytes} bytes`);
    } catch (e) {
      const err = this.abort.signal.reason instanceof Error ? this.abort.signal.reason : e as Error;
      this.status.state = 'failed';
      this.status.error = err.message;
      this.o.log(`unit ${hello.unit} from ${hello.host}: failed: ${err.message}`);
      if (!link.closed) {
        link.send({ t: 'error', message: err.message, ...(err instanceof UserError && err.hint ? { hint: err.hint } : {}) });
        link.close();
      }
    } finally {
      clearInterval(this.silence);
      clearTimeout(this.flushTimer);
      this.o.odc.offRoom(this.onRoom);
      this.waiting = [];
      this.mm?.clear();
      this.lun?.close();
    }
  }

  /** The hello names a LUN this appliance has, of the host's size, holding the host's blocks. */
  private async check(): Promise<void> {
    const h = this.o.hello;
    if (h.version !== LINK_VERSION) throw new UserError(`the host speaks version ${h.version} of the appliance protocol, this appliance ${LINK_VERSION}`, 'run the same livesnap version on both');
    if (h.blockSize !== ODC_SLOT) throw new UserError(`the host's block size ${h.blockSize} is not ${ODC_SLOT}`);
    const lunPath = this.o.luns.get(h.unit);
    if (lunPath === undefined) throw new UserError(`this appliance has no LUN for "${h.unit}"`, `start it with --lun ${h.unit}=PATH (its path to the shared LUN of that export)`);
    this.lun = await Device.openAsync(lunPath, { write: false });
    if (this.lun.size !== h.size) throw new UserError(`the LUN ${lunPath} given for "${h.unit}" is ${this.lun.size} bytes, the host's volume ${h.size}: it is another volume`, `check --lun ${h.unit}=PATH on the appliance`);
    const blocks = h.fingerprint.map(([b]) => b);
    const bufs = await this.lun.readMany(blocks.map((b) => ({ offset: b * h.blockSize, length: Math.min(h.blockSize, h.size - b * h.blockSize) })));
    const differ = h.fingerprint.filter(([, hash], i) => blockHash(bufs[i]!) !== hash).map(([b]) => b);
    if (differ.length) throw new UserError(`the LUN ${lunPath} given for "${h.unit}" is not the host's volume: ${differ.length} of ${blocks.length} fingerprint blocks differ (first: block ${differ[0]})`, `check --lun ${h.unit}=PATH on the appliance: it must be this appliance's path to the same shared LUN`);
    this.mm = new ModifiedMap(this.totalBlocks, this.o.odc);
    this.view = new ReconciledView(this.lun, this.mm, this.o.odc, h.blockSize, (first, end) => this.consumed(first, end));
  }

  /** An original from the host: kept if it is the first of its block and the block is not read yet. */
  private original(m: Orig, payload: Buffer): void {
    // After the unit ended (its MM cleared), an original still in flight must not take a slot.
    if (this.status.state !== 'running') return;
    const bs = this.o.hello.blockSize;
    const want = Math.min(m.count * bs, this.o.hello.size - m.first * bs);
    if (m.first + m.count > this.totalBlocks || payload.length !== want || m.id <= this.lastAcked) {
      this.o.link.close(new UserError(`${this.o.link.peer} sent a malformed original (blocks ${m.first}+${m.count}, ${payload.length} bytes, id ${m.id})`));
      return;
    }
    this.received += m.count;
    this.lastOriginalAt = performance.now();
    this.waiting.push({ m, payload, next: 0 });
    this.drainWaiting();
  }

  /** Stores waiting originals while the ODC has room; acks in order; pauses the link while any waits. */
  private drainWaiting(): void {
    const mm = this.mm!;
    const odc = this.o.odc;
    const bs = this.o.hello.blockSize;
    while (this.waiting.length) {
      const w = this.waiting[0]!;
      while (w.next < w.m.count) {
        const b = w.m.first + w.next;
        if (mm.wants(b)) {
          const slot = odc.take();
          if (slot < 0) break;
          const from = w.next * bs;
          try {
            odc.write(slot, w.payload, from, Math.min(bs, w.payload.length - from));
          } catch (e) {
            // The spill file failed (ENOSPC, EIO): this unit cannot keep its originals.
            odc.free(slot);
            this.waiting = [];
            this.abort.abort(new UserError(`the ODC spill file failed: ${(e as Error).message}`, 'give --odc a file on a file system with room, or more memory'));
            return;
          }
          mm.keep(b, slot);
        } else {
          mm.originalsIgnored++;
        }
        w.next++;
      }
      if (w.next < w.m.count) break; // the ODC is full: the rest waits for the reader to free slots
      this.waiting.shift();
      this.lastAcked = w.m.id;
      this.o.link.send({ t: 'ack', id: w.m.id });
    }
    this.status.originalsWaiting = this.waiting.length;
    this.status.odcHeldBytes = mm.held * ODC_SLOT;
    this.status.originalsKept = mm.originalsKept;
    // Backpressure: while originals wait, TCP holds the rest on the host.
    if (this.waiting.length) {
      this.o.link.pause();
      this.paused = true;
    } else if (this.paused) {
      this.paused = false;
      this.o.link.lastHeard = performance.now();
      this.o.link.resume();
    }
  }

  /** Blocks read for the output (or outside the backup): the host need not send them. */
  private consumed(first: number, end: number): void {
    this.mm!.markDone(first, end);
    const last = this.reconciled[this.reconciled.length - 1];
    if (last && last[1] === first) last[1] = end; else this.reconciled.push([first, end]);
    if (this.reconciled.length >= 4096) this.flushReconciled();
    else this.flushTimer ??= setTimeout(() => this.flushReconciled(), 50);
  }

  private flushReconciled(): void {
    clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    if (this.reconciled.length === 0 || this.o.link.closed) return;
    this.o.link.send({ t: 'reconciled', ranges: this.reconciled });
    this.reconciled = [];
  }

  /** Blocks outside the backup (not in `used`): no original of them is needed, their slots are free. */
  private outsideBackup(used: Bitset): void {
    for (let s = used.next(0, false); s < this.totalBlocks; s = used.next(used.next(s, true), false)) this.consumed(s, used.next(s, true));
    this.drainWaiting();
  }

  /** The instant as a snapshot method: the view's reader for metadata, its consuming face for the copy. */
  private method(): SnapshotMethod {
    const h = this.o.hello;
    const view = this.view!;
    const mm = this.mm!;
    const signal = this.abort.signal;
    return {
      name: 'appliance',
      arm: async (): Promise<PointInTime> => ({
        instant: new Date(h.instant),
        reader: view.reader,
        restrict: (used) => {
          const bs = h.blockSize;
          const bits = usedAtBlockSize(used, bs, this.totalBlocks);
          this.outsideBackup(bits);
          const map = new CopyMap(this.totalBlocks, false);
          map.pending.orWith(bits);
          return { blockSize: bs, used: bits, source: { device: view.consuming, map } };
        },
        // The LUN is shared with the host's writers: while originals arrive they are writing (and one
        // waits for each original's read), so the reader leaves the disk room, as copy-before-write
        // does on the host. Originals waiting for ODC room: full speed (reading frees slots).
        pace: {
          writersActive: () => performance.now() - this.lastOriginalAt < 50,
          writersStarved: () => this.waiting.length > 0,
          busy: busyPace('normal'),
        },
        failure: () => (signal.aborted ? signal.reason as Error : undefined),
        facts: () => ({ odcPeakBytes: this.o.odc.peak * ODC_SLOT, originalsKept: mm.originalsKept }),
        release: async () => {},
        fail: () => {},
      }),
    };
  }

  private async archive(output: string) {
    const h = this.o.hello;
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- the SDK loads only for s3://
    const s3 = isS3Url(output) ? new (require('../s3/destination') as typeof import('../s3/destination')).S3Destination(output, this.o.s3, { note: (n) => this.o.log(`unit ${h.unit}: ${n}`), force: true }) : undefined;
    if (!s3) fs.mkdirSync(this.o.store, { recursive: true });
    const sink = createArchiveSink({ out: s3 ?? output });
    let lastProgress = 0;
    const r = await runBackupJob({
      method: this.method(),
      sink,
      source: h.unit,
      volumeSize: h.size,
      onError: 'abort',
      maxRate: this.o.maxRate,
      signal: this.abort.signal,
      cancelled: () => this.abort.signal.reason as Error,
      onProgress: (p) => {
        this.status.bytesDone = p.bytesDone;
        this.status.bytesTotal = p.bytesTotal;
        const now = performance.now();
        if (now - lastProgress < 500) return;
        lastProgress = now;
        this.o.link.send({ t: 'progress', bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, odcUsedBytes: this.o.odc.used * ODC_SLOT, odcPeakBytes: this.o.odc.peak * ODC_SLOT });
      },
    });
    return {
      t: 'done' as const,
      output,
      bytes: r.copy.bytes,
      blocks: r.copy.blocks,
      usedBlocks: r.usedBlocks,
      totalBlocks: r.totalBlocks,
      filesystem: r.map.filesystem,
      outputBytes: s3 ? s3.stats?.bytes ?? 0 : fs.statSync(output).size,
      checksums: { kind: 'xxh3-128 of the trailer chunk list', chunks: sink.chunkCount, digest: sink.chunkListDigest() },
      originalsReceived: this.received,
      originalsUsed: this.mm!.originalsUsed,
      odcPeakBytes: this.o.odc.peak * ODC_SLOT,
      durationMs: r.durationMs,
    };
  }

  /**
   * --run: the instant as a read-only NBD export on a unix socket in the store; CMD reads it (its
   * {uri}); its exit ends the snapshot. Originals stay in the ODC until then (a program may read a
   * block twice), so a small ODC under heavy writes makes host writers wait.
   */
  private async runProgram(cmd: string) {
    const h = this.o.hello;
    const view = this.view!;
    fs.mkdirSync(this.o.store, { recursive: true });
    const sock = path.join(this.o.store, `.${h.unit}-${process.pid}-${Date.now()}.sock`);
    // The instant as the snapshot command serves one: free blocks read as zeros and are holes.
    const map = await readUsedBlockMap(view.reader, h.unit);
    const used = usedAtBlockSize(map, h.blockSize, this.totalBlocks);
    this.outsideBackup(used);
    const backend = new PointInTimeBackend(view.reader, used, h.blockSize, h.size, `livesnap appliance: ${h.unit} at ${h.instant}`);
    const server = new NbdServer({ exports: { [h.unit]: backend }, log: (lvl, m) => { if (lvl !== 'debug') this.o.log(`unit ${h.unit}: nbd: ${m}`); } });
    await server.listenUnix(sock);
    const uri = `nbd+unix:///${encodeURIComponent(h.unit)}?socket=${sock}`;
    const t0 = performance.now();
    try {
      if (this.abort.signal.aborted) throw this.abort.signal.reason;
      const status = await new Promise<number>((resolve, reject) => {
        const child = spawn('/bin/sh', ['-c', cmd.split('{uri}').join(uri)], { stdio: ['ignore', 'inherit', 'inherit'] });
        const onAbort = () => child.kill('SIGTERM');
        this.abort.signal.addEventListener('abort', onAbort, { once: true });
        child.once('error', reject);
        child.once('exit', (code, sig) => {
          this.abort.signal.removeEventListener('abort', onAbort);
          resolve(code ?? 128 + (sig ? os.constants.signals[sig] : 0));
        });
      });
      if (this.abort.signal.aborted) throw this.abort.signal.reason;
      this.o.log(`unit ${h.unit}: --run exited with status ${status}`);
      return {
        t: 'done' as const, output: `run: ${cmd}`, bytes: backend.bytesRead, blocks: Math.ceil(backend.bytesRead / h.blockSize), usedBlocks: used.setCount, totalBlocks: this.totalBlocks,
        filesystem: map.filesystem, outputBytes: 0, checksums: { kind: 'none', chunks: 0, digest: '' },
        originalsReceived: this.received, originalsUsed: view.substituted, odcPeakBytes: this.o.odc.peak * ODC_SLOT,
        durationMs: performance.now() - t0, runStatus: status,
      };
    } finally {
      await server.close().catch(() => {});
      fs.rmSync(sock, { force: true });
    }
  }

  /** Ends the unit from outside (the appliance is shutting down). */
  cancel(e: Error): void {
    this.abort.abort(e);
  }
}
