// The livesnap daemon: serves volumes over NBD (every write to them passes the snapshot gate) and
// runs online backups of them, driven through an owner-only control socket.
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { ioEngineName, ioRing } from '../device/io-ring';
import { runOnlineBackup, type OnlineBackupSummary } from '../jobs/online-backup';
import { runApplianceBackup } from '../jobs/appliance-backup';
import { parseApplianceAddress } from '../appliance/link';
import { loadPskFile, type PskKeys } from '../nbd/tls-psk';
import { stateRoot } from '../config';
import { PointInTimeBackend } from '../export/point-in-time-backend';
import { ServedExport } from '../export/served-export';
import { createNbdServer, type NbdServer } from '../nbd/server';
import { CopyBeforeWriteMethod } from '../snapshot/cbw-method';
import type { PointInTime } from '../snapshot/method';
import { type JobRecord, SELF } from '../export/state-dir';
import { identify, lockedPath, overlap } from '../device/identity';
import { deviceHolding, fingerprintOf, fingerprintOfVolume } from '../export/on-volume';
import { checkTargetOptions, isTapeDevice, openBackupTarget } from '../jobs/open-target';
import { parseContainer } from '../snapshot/parse-container';
import type { SnapshotSession } from '../snapshot/session';
import { HoldMethod, type HoldJobStats } from '../snapshot/hold-method';
import { holdLogDevice, parseHoldLog } from '../export/hold-log';
import { DEFAULT_WRITER_PRIORITY, type WriterPriority } from '../snapshot/writer-priority';
import { errorText, UserError } from '../util/errors';
import type { BackupSink } from '../sink/sink';
import { checkProtection } from '../incremental/protection';
import { GRANULARITY } from '../incremental/change-map';
import { checkFreezeMount } from '../snapshot/freeze';
import { type SnapshotRequest, type BackupRequest, type ControlReply, type ControlRequest, defaultExportSocket, parseControlRequest, type ServeRequest } from './protocol';

/** A served export and the backup running on it, if any. */
type Entry = ServedExport & { job?: Job };

interface Job {
  kind: 'backup' | 'snapshot';
  id: string;
  export: string;
  to: string;
  started: Date;
  state: 'running' | 'done' | 'failed' | 'cancelled';
  abort: AbortController;
  session?: SnapshotSession;
  progress: { bytesDone: number; bytesTotal: number; badBlocks: number };
  summary?: OnlineBackupSummary;
  error?: string;
  finished?: Date;
  detached: boolean;
  writerPriority: WriterPriority;
  /** --method hold: the hold's live numbers. */
  hold?: () => HoldJobStats | undefined;
  /** A snapshot job's read-only export of the instant. */
  view?: { name: string; socket: string; uri: string; backend: PointInTimeBackend };
}

export type DaemonLog = (line: string) => void;

export class Daemon {
  private readonly exports = new Map<string, Entry>();
  private readonly jobs = new Map<string, Job>();
  private control?: net.Server;
  private jobSeq = 0;
  /** Backups to '-' waiting for their data connection, by token. */
  private readonly dataWaiters = new Map<string, (sock: net.Socket) => void>();
  private stopping = false;
  readonly stopped: Promise<void>;
  private resolveStopped!: () => void;

  constructor(readonly controlPath: string, private readonly log: DaemonLog = (l) => process.stderr.write(`${new Date().toISOString()} ${l}\n`)) {
    this.stopped = new Promise((r) => (this.resolveStopped = r));
  }

  async listen(): Promise<void> {
    const dir = path.dirname(this.controlPath);
    if (!fs.existsSync(dir)) fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    if (fs.existsSync(this.controlPath)) {
      const alive = await new Promise<boolean>((resolve) => {
        const s = net.connect(this.controlPath);
        s.once('connect', () => { s.destroy(); resolve(true); });
        s.once('error', () => resolve(false));
      });
      if (alive) throw new UserError(`a livesnap daemon is already running on ${this.controlPath}`, 'use it ("livesnap serve" adds exports to it), or give another --control');
      fs.unlinkSync(this.controlPath); // stale: its daemon died (kill -9)
    }
    const server = net.createServer((sock) => this.onClient(sock));
    const old = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(this.controlPath, () => resolve()); });
    } finally {
      process.umask(old);
    }
    fs.chmodSync(this.controlPath, 0o600);
    this.control = server;
    this.log(`control socket ${this.controlPath}`);
  }

  private onClient(sock: net.Socket): void {
    let buf = '';
    let handled = false;
    sock.on('error', () => {});
    sock.on('data', (chunk) => {
      if (handled) return;
      buf += chunk.toString('utf8');
      if (buf.length > 1 << 16) { sock.destroy(); return; }
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      handled = true;
      let req: ControlRequest;
      try {
        req = parseControlRequest(buf.slice(0, nl));
      } catch (e) {
        this.reply(sock, { type: 'error', message: (e as Error).message, hint: e instanceof UserError ? e.hint : undefined });
        sock.end();
        return;
      }
      if (req.op === 'data') {
        // Not a request with an answer: this socket becomes the archive stream of a backup to '-'.
        const w = this.dataWaiters.get(req.token);
        if (!w) { this.reply(sock, { type: 'error', message: 'unknown data token' }); sock.end(); return; }
        this.dataWaiters.delete(req.token);
        w(sock);
        return;
      }
      const send = (r: ControlReply) => this.reply(sock, r);
      this.handle(req, send, sock)
        .then((res) => { if (res) send({ type: 'result', ...res }); })
        .catch((e: unknown) => send({ type: 'error', message: errorText(e).split('\n  hint: ')[0]!, hint: e instanceof UserError ? e.hint : undefined, exitCode: e instanceof UserError ? e.exitCode : 1 }))
        .finally(() => sock.end());
    });
  }

  private reply(sock: net.Socket, r: ControlReply): void {
    if (!sock.destroyed && sock.writable) sock.write(JSON.stringify(r) + '\n');
  }

  private async handle(req: ControlRequest, send: (r: ControlReply) => void, sock: net.Socket): Promise<Record<string, unknown> | undefined> {
    switch (req.op) {
      case 'serve': return this.serve(req);
      case 'stop': return this.stop(req.name);
      case 'status': return this.status();
      case 'cancel': return this.cancel(req.job);
      case 'backup': return this.backup(req, send, sock);
      case 'snapshot': return this.snapshot(req, send, sock);
      case 'data': return undefined;
      default: throw new UserError(`unknown control request "${(req as { op?: string }).op}"`);
    }
  }

  async serve(req: ServeRequest): Promise<Record<string, unknown>> {
    const e: Entry = await ServedExport.open(req, {
      served: this.exports.values(),
      defaultSocket: (name) => defaultExportSocket(this.controlPath, name),
      stateRoot: stateRoot(),
      log: (l) => this.log(l),
    });
    if (this.exports.has(e.name) || this.stopping) {
      // Another serve of the same name won the race, or the daemon is stopping.
      await e.close();
      throw new UserError(this.stopping ? 'the daemon is stopping' : `an export named "${e.name}" is already served`);
    }
    this.exports.set(e.name, e);
    const keys = e.keys;
    this.log(`serving ${e.devicePath} as "${e.name}" on ${e.socket}${e.tcp ? ` and tcp ${e.tcp} (${keys ? `TLS-PSK, identities ${keys.identities.join(', ')}` : 'NO TLS'})` : ''} (cache ${e.cache})`);
    return {
      name: e.name, device: e.devicePath, size: e.backend.size, socket: e.socket, tcp: e.tcp ?? null, tls: e.tls ?? null, cache: e.cache,
      uri: e.uri, tcpUri: e.tcpUri ?? null, tlsIdentity: keys?.identities[0] ?? null, state: e.state.dir, leftovers: e.leftovers,
    };
  }

  async stop(name?: string): Promise<Record<string, unknown>> {
    if (name) {
      const e = this.exports.get(name);
      if (!e) throw new UserError(`no export named "${name}"`, 'see "livesnap status"');
      await this.closeExport(e);
      return { stopped: [name] };
    }
    const names = [...this.exports.keys()];
    setImmediate(() => void this.shutdown());
    return { stopped: names, daemon: 'stopping' };
  }

  private async closeExport(e: Entry): Promise<void> {
    e.job?.abort.abort(new UserError(`the backup was cancelled: its export "${e.name}" was stopped`, 'no acknowledged write was lost; serve it again and rerun the backup', 130));
    this.exports.delete(e.name);
    await e.close();
    this.log(`stopped serving "${e.name}"`);
  }

  async shutdown(): Promise<void> {
    if (this.stopping) return this.stopped;
    this.stopping = true;
    for (const e of [...this.exports.values()]) await this.closeExport(e).catch((err) => this.log(`stopping ${e.name}: ${errorText(err)}`));
    await new Promise<void>((r) => (this.control ? this.control.close(() => r()) : r()));
    try { fs.unlinkSync(this.controlPath); } catch { /* gone */ }
    this.log('daemon stopped');
    this.resolveStopped();
  }

  status(): Record<string, unknown> {
    const exports = [...this.exports.values()].map((e) => {
      const c = e.nbd.stats();
      return {
        name: e.name,
        device: e.devicePath,
        size: e.device.size,
        cache: e.cache,
        socket: e.socket,
        tcp: e.tcp ?? null,
        tls: e.tls ?? null,
        connections: c.connections,
        requests: c.requests,
        bytesWritten: c.bytesWritten,
        bytesRead: c.bytesRead,
        job: e.job ? this.jobInfo(e.job) : null,
        state: e.state.dir,
        leftovers: e.leftovers,
        held: heldNow(e.hold.holdStats()),
        changes: e.changes ? { base: e.changes.map.base, changedRegions: e.changes.map.changedRegions(), granularity: GRANULARITY, flushes: e.changes.map.flushes, nextBackupFullBecause: e.changes.map.fullBecause } : null,
      };
    });
    const jobs = [...this.jobs.values()].map((j) => this.jobInfo(j));
    // How the exports do their I/O: 'io_uring ring' (per-request completions) or the batch engine.
    const io = ioRing() ? 'io_uring ring' : ioEngineName();
    return { control: this.controlPath, pid: process.pid, io, exports, jobs };
  }

  private jobInfo(j: Job): Record<string, unknown> {
    const s = j.session?.stats();
    const h = j.state === 'running' ? j.hold?.() : undefined;
    return {
      id: j.id,
      export: j.export,
      to: j.to,
      state: j.state,
      started: j.started.toISOString(),
      finished: j.finished?.toISOString() ?? null,
      bytesDone: j.progress.bytesDone,
      bytesTotal: j.progress.bytesTotal,
      badBlocks: j.progress.badBlocks,
      containerUsedBytes: s?.containerUsedBytes ?? null,
      containerCapacityBytes: s?.containerCapacityBytes ?? null,
      writesWaiting: s?.writesWaiting ?? h?.count ?? 0,
      ...(j.hold ? { method: 'hold', held: h ? { ...heldNow(h), mode: h.mode, limitBytes: h.limitBytes, fellBack: h.fellBack, loggedWrites: h.loggedWrites, ...(h.log ? { log: h.log } : {}) } : null } : {}),
      worstWriteDelayMs: s?.worstWriteDelayMs ?? j.summary?.worstWriteDelayMs ?? 0,
      writerPriority: j.writerPriority,
      error: j.error ?? null,
      kind: j.kind,
      ...(j.view ? { view: j.view.name, uri: j.view.uri, socket: j.view.socket, bytesRead: j.view.backend.bytesRead, livedMs: (j.finished ?? new Date()).getTime() - j.started.getTime() } : {}),
    };
  }

  /**
   * "--to -": the archive goes to the CLI's standard output. The CLI opens a second connection
   * ({op:'data', token}) and the daemon writes the record stream into it; the CLI copies it to fd 1.
   */
  private async stdoutSink(req: BackupRequest, send: (r: ControlReply) => void) {
    checkTargetOptions('-', req);
    const { createArchiveSink } = await import('../archive');
    const token = `${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}`;
    const data = new Promise<net.Socket>((resolve, reject) => {
      const timer = setTimeout(() => { this.dataWaiters.delete(token); reject(new UserError('the CLI did not open the data connection for --to -')); }, 10_000);
      this.dataWaiters.set(token, (sock) => { clearTimeout(timer); resolve(sock); });
    });
    send({ type: 'event', event: 'data-channel', token });
    const sock = await data;
    sock.on('error', () => {});
    const { WritableRecordOutput, DEFAULT_RECORD_SIZE } = await import('../sink/stream/record-writer');
    const where = 'the standard output of the backup command';
    // The archive's expected size goes to the CLI first: an upload to S3 sizes its parts by it.
    const out = {
      where,
      open: async (expectedBytes: number | undefined) => {
        send({ type: 'event', event: 'archive-size', expectedBytes: expectedBytes ?? null });
        return new WritableRecordOutput(sock, req.recordSize ?? DEFAULT_RECORD_SIZE, { end: true, where });
      },
    };
    return createArchiveSink({ out, recordSize: req.recordSize, compress: req.compress });
  }

  /**
   * A backup must never write where a served volume lives: not into a served device or file (by
   * inode, through links and loop devices, or another daemon's lock), and its target not inside a
   * served file system (found by the file system's own superblock; writing a backup into the volume
   * it backs up is not supported). All lookups run on the thread pool.
   */
  private async checkBackupPaths(req: BackupRequest): Promise<void> {
    const paths: Array<{ p: string; what: string }> = [];
    if (req.to !== '-' && req.to !== '/dev/null') paths.push({ p: req.to, what: `the target ${req.to}` });
    const c = req.container !== undefined ? parseContainer(req.container) : undefined;
    if (c && c.kind !== 'memory') paths.push({ p: c.path, what: `the container ${c.kind}:${c.path}` });
    for (const { p, what } of paths) {
      const id = await identify(p);
      for (const e of this.exports.values()) {
        const why = overlap(id, e.identity);
        if (why) throw new UserError(`${what} is the volume served as "${e.name}" (${e.devicePath}: ${why})`, 'writing it would overwrite live data; choose a path on another device');
      }
      const held = await lockedPath(id);
      if (held) throw new UserError(`${what} is a volume served by another livesnap daemon (${held} is locked)`, 'choose a path on another device');
    }
    if (req.to === '-' || req.to === '/dev/null' || isTapeDevice(req.to)) return;
    const node = await deviceHolding(req.to);
    if (!node) return;
    const got = await fingerprintOf(node);
    if (!got) return;
    for (const e of this.exports.values()) {
      if (got === (await fingerprintOfVolume(e.directDevice))) {
        throw new UserError(`the target ${req.to} is inside the file system served as "${e.name}" (${node} holds it)`, 'a backup cannot be written into the volume it backs up: write it to another file system');
      }
    }
  }

  /**
   * `livesnap snapshot`: arms copy-before-write on the export with no copier, and serves the instant
   * READ-ONLY as a second export until the CLI goes away (or `cancel`, with --detach). Writers to
   * blocks not yet overwritten go straight through; the first write to a used block saves its
   * original, which the view then reads from the container.
   */
  private async snapshot(req: SnapshotRequest, send: (r: ControlReply) => void, sock: net.Socket): Promise<Record<string, unknown> | undefined> {
    const e = this.exports.get(req.export);
    if (!e) throw new UserError(`no export named "${req.export}"`, 'see "livesnap status"');
    if (e.job) throw new UserError(`export "${e.name}" already has a job running (${e.job.id})`, `wait for it, or "livesnap cancel ${e.job.id}"`);
    await this.checkBackupPaths({ op: 'backup', export: req.export, to: '/dev/null', container: req.container, onError: 'abort' });
    const holdLog = this.holdLogOf(req, e);
    if (req.method !== 'hold' && req.holdLimit !== undefined) throw new UserError('--hold-limit goes with --method hold', 'add --method hold, or drop the option');
    if (req.method !== 'hold' && req.hold !== undefined) throw new UserError('--hold goes with --method hold', 'add --method hold, or drop the option');
    const id = `${e.name}-${++this.jobSeq}`;
    const viewName = `${e.name}.snapshot-${this.jobSeq}`;
    const job: Job = { kind: 'snapshot', id, export: e.name, to: viewName, started: new Date(), state: 'running', abort: new AbortController(), progress: { bytesDone: 0, bytesTotal: 0, badBlocks: 0 }, detached: !!req.detach, writerPriority: DEFAULT_WRITER_PRIORITY };
    e.job = job;
    this.jobs.set(id, job);
    const record: JobRecord = { job: id, export: e.name, pid: SELF.pid, pidStart: SELF.start, started: job.started.toISOString(), to: viewName, files: await jobFiles({ op: 'backup', export: e.name, to: '-', container: req.container, onError: 'abort' }) };
    const onClose = () => { if (!job.detached && job.state === 'running') { this.log(`job ${id}: client went away, ending the snapshot`); job.abort.abort(); } };
    sock.once('close', onClose);
    let view: NbdServer | undefined;
    let pit: PointInTime | undefined;
    try {
      await e.state.recordJob(record);
      // --method hold: every write waits (or goes to the hold log) while the view is served; the view
      // reads the device itself. Past --hold-limit the queue is released through copy-before-write.
      const method = holdLog !== undefined || req.method === 'hold'
        ? new HoldMethod({ device: e.directDevice, hold: e.hold, gate: e.gate, mode: req.hold ?? 'all', limitBytes: req.holdLimit, container: req.container, freeze: req.freeze, onError: req.onError, writeWaitLimitMs: req.writeWaitLimitMs, holdLog, log: (l) => this.log(`job ${id}: ${l}`) })
        : new CopyBeforeWriteMethod({ device: e.directDevice, gate: e.gate, container: req.container, freeze: req.freeze, onError: req.onError, writeWaitLimitMs: req.writeWaitLimitMs, onSession: (s) => (job.session = s) });
      if (method instanceof HoldMethod) job.hold = () => method.stats();
      pit = await method.arm();
      const { readUsedBlockMap } = await import('../fs/detect');
      const map = await readUsedBlockMap(pit.reader, e.name);
      const r = pit.restrict(map);
      const backend = new PointInTimeBackend(pit.reader, r.used, r.blockSize, e.directDevice.size, `livesnap point-in-time view of "${e.name}" at ${pit.instant.toISOString()}`);
      view = createNbdServer({ exports: { [viewName]: backend }, defaultExport: viewName, log: (level, m) => { if (level !== 'debug') this.log(`[${viewName}] ${m}`); } });
      const socket = defaultExportSocket(this.controlPath, viewName);
      await view.listenUnix(socket);
      const uri = `nbd+unix:///${viewName}?socket=${socket}`;
      job.view = { name: viewName, socket, uri, backend };
      void identifyJobFiles(record).then(() => e.state.recordJob(record)).catch(() => {});
      const f = pit.facts();
      this.log(`job ${id}: snapshot of "${e.name}" at ${pit.instant.toISOString()} served read-only as "${viewName}" on ${socket}`);
      send({ type: 'event', event: 'armed', job: id, time: pit.instant.toISOString(), freezeMs: f.freezeMs ?? 0, presyncMs: f.presyncMs ?? 0, container: String(f.container), export: viewName, uri, socket, filesystem: map.filesystem, usedBlocks: r.used.setCount, blockSize: r.blockSize });
      if (job.detached) { send({ type: 'result', detached: true, job: id, export: viewName, uri }); sock.end(); }
      // Until cancelled (or the CLI goes away), or the snapshot breaks (a writer held too long).
      await new Promise<void>((resolve) => {
        const done = () => { clearInterval(timer); resolve(); };
        const timer = setInterval(() => { if (pit!.failure()) done(); }, 200);
        job.abort.signal.addEventListener('abort', done, { once: true });
      });
      const failure = pit.failure();
      if (failure) throw failure;
      job.state = 'done';
      const facts = pit.facts();
      // A held queue is written only now, after the view is gone (no reader may see a released
      // instant): the result waits for it and says how long it took.
      await view.close().catch(() => {});
      view = undefined;
      await pit.release();
      const held = (pit.facts() as { hold?: Record<string, unknown> }).hold;
      return { job: id, export: viewName, ended: 'cancelled', livedMs: Date.now() - job.started.getTime(), bytesRead: backend.bytesRead, containerPeakBytes: facts.containerPeakBytes, blocksSavedByWriters: facts.blocksSavedByWriters, worstWriteDelayMs: facts.worstWriteDelayMs, ...(held ? { method: 'hold', hold: held } : {}) };
    } catch (err) {
      job.state = job.abort.signal.aborted ? 'cancelled' : 'failed';
      job.error = errorText(err);
      this.log(`job ${id}: ${job.state}: ${job.error}`);
      throw err;
    } finally {
      // The view goes first (no reader may see a released instant), then the instant itself.
      await view?.close().catch(() => {});
      pit?.fail(new UserError('the snapshot ended'));
      await pit?.release().catch(() => {});
      job.finished = new Date();
      await e.state.dropJob(id).catch(() => {});
      sock.off('close', onClose);
      if (e.job === job) e.job = undefined;
    }
  }

  /** --hold-log of a backup or snapshot: checked, and kept off every served volume. */
  private holdLogOf(req: { method?: string; holdLog?: string }, e: ServedExport) {
    if (req.holdLog !== undefined && req.method !== 'hold') throw new UserError('--hold-log goes with --method hold', 'add --method hold, or drop the option');
    const holdLog = req.holdLog !== undefined ? { spec: parseHoldLog(req.holdLog), stateDir: e.state.dir, device: holdLogDevice(e.identity, e.devicePath, e.device.size) } : undefined;
    if (holdLog && overlapsServed(holdLog.spec.path, [...this.exports.values()])) throw new UserError(`--hold-log ${holdLog.spec.path} is a served volume`, 'put the log on another device, outside every served volume');
    return holdLog;
  }

  cancel(idOrExport: string): Record<string, unknown> {
    const j = this.jobs.get(idOrExport) ?? this.exports.get(idOrExport)?.job;
    if (!j || j.state !== 'running') throw new UserError(`no running backup "${idOrExport}"`, 'see "livesnap status" for job ids');
    j.abort.abort();
    return { cancelled: j.id };
  }

  private async backup(req: BackupRequest, send: (r: ControlReply) => void, sock: net.Socket): Promise<Record<string, unknown> | undefined> {
    const e = this.exports.get(req.export);
    if (!e) throw new UserError(`no export named "${req.export}"`, `serve it first ("livesnap serve <device> --name ${req.export}"), or see "livesnap status"`);
    if (e.job) throw new UserError(`export "${e.name}" already has a backup running (${e.job.id})`, `wait for it, or "livesnap cancel ${e.job.id}"`);
    if (req.to.startsWith('appliance://')) {
      if (req.incremental || req.exclude?.length || req.mount !== undefined) throw new UserError(`${req.incremental ? '--incremental' : req.mount !== undefined ? '--mount' : '--exclude'} does not go with --to appliance:// (the appliance reads the whole LUN)`, 'drop the option');
      return this.applianceBackup(req, send, sock, e);
    }
    const remoteReplica = req.to.startsWith('replica://');
    if (!remoteReplica && (req.key !== undefined || req.applianceTimeoutMs !== undefined)) throw new UserError('--key and --appliance-timeout go with --to appliance://HOST:PORT or replica://HOST:PORT/NAME');
    if (remoteReplica && req.key === undefined) throw new UserError(`--to ${req.to} needs --key FILE`, 'the PSK file the appliance was started with (livesnap keygen FILE)');
    const replicaPath = req.to.startsWith('replica:') && !remoteReplica ? path.resolve(req.to.slice('replica:'.length)) : undefined;
    if (replicaPath !== undefined || remoteReplica) {
      if (replicaPath === '/' || req.to === 'replica:') throw new UserError(`--to ${req.to}: name the replica's image file or device, e.g. replica:/backup/data.replica`);
      for (const [flag, v] of [['--format', req.format], ['--compress', req.compress], ['--record-size', req.recordSize], ['--tape-size', req.tapeSize], ['--next-volume-command', req.nextVolumeCommand], ['--force', req.force || undefined]] as const) {
        if (v !== undefined) throw new UserError(`${flag} does not go with --to replica:PATH (a replica is an image kept in place)`, 'drop the option');
      }
    }
    if (!e.changes && (req.incremental || req.exclude?.length || replicaPath !== undefined || remoteReplica)) throw new UserError(`this daemon serves "${e.name}" without change tracking (LIVESNAP_CHANGE_TRACKING=off): no incremental, replica or --exclude`, 'serve it from a daemon started without LIVESNAP_CHANGE_TRACKING=off');
    const protection = { mount: req.mount ?? req.freeze, patterns: req.exclude ?? [], excludeSwap: req.excludeSwap ?? true };
    checkProtection(protection);
    if (req.mount !== undefined) await checkFreezeMount(req.mount, e.directDevice);
    await this.checkBackupPaths(replicaPath !== undefined ? { ...req, to: replicaPath } : remoteReplica ? { ...req, to: '/dev/null' } : req);
    // Only after the paths are checked (a stat inside a file system this daemon serves would wait
    // for itself): where the backup's id is kept in a chain (an archive, a replica), it becomes the next one's parent.
    const chained = replicaPath !== undefined || remoteReplica || checkTargetOptions(req.to, req) === 'tar';
    if (req.incremental && !chained && req.to !== '/dev/null') {
      throw new UserError(`--incremental writes an archive of the changed blocks, and ${req.to} is a raw image`, 'give a .tar target (file, "-", tape), or keep a replica with --to replica:PATH');
    }
    const holdLog = this.holdLogOf(req, e);
    let held: string | null | undefined;
    let heldUntrusted: string | undefined;
    let replicaSink: BackupSink | undefined;
    if (replicaPath !== undefined) {
      const { ReplicaSink, replicaHolding } = await import('../incremental/replica');
      const h = await replicaHolding(replicaPath);
      held = h.snapshotId;
      heldUntrusted = h.untrusted;
      replicaSink = new ReplicaSink(replicaPath);
    } else if (remoteReplica) {
      const { RemoteReplicaSink } = await import('../appliance/remote-replica');
      let keys: PskKeys;
      try { keys = loadPskFile(req.key!); } catch (err) { throw new UserError(`--key: ${(err as Error).message}`, 'the PSK file the appliance was started with (livesnap keygen FILE)'); }
      const r = await RemoteReplicaSink.open(req.to, keys, req.applianceTimeoutMs);
      held = r.held;
      heldUntrusted = r.untrusted;
      replicaSink = r.sink;
    }
    const sink = replicaSink ?? (req.to === '-' ? await this.stdoutSink(req, send) : openBackupTarget(req.to, { force: req.force, format: req.format, recordSize: req.recordSize, compress: req.compress, tapeSize: req.tapeSize, nextVolumeCommand: req.nextVolumeCommand }));
    const job: Job = { kind: 'backup', id: `${e.name}-${++this.jobSeq}`, export: e.name, to: req.to, started: new Date(), state: 'running', abort: new AbortController(), progress: { bytesDone: 0, bytesTotal: 0, badBlocks: 0 }, detached: !!req.detach, writerPriority: req.writerPriority ?? DEFAULT_WRITER_PRIORITY };
    e.job = job;
    this.jobs.set(job.id, job);
    // What this job will create, on record in the export's state directory until it ends: if the
    // daemon is killed, the next serve finds and removes it.
    const record: JobRecord = { job: job.id, export: e.name, pid: SELF.pid, pidStart: SELF.start, started: job.started.toISOString(), to: req.to, files: replicaPath !== undefined || remoteReplica ? [] : await jobFiles(req) };
    try {
      await e.state.recordJob(record);
    } catch (err) {
      e.job = undefined;
      this.jobs.delete(job.id);
      await sink.abort(err as Error);
      throw new UserError(`cannot write the job record in ${e.state.dir}: ${(err as Error).message}`, 'the state directory must be writable (serve --state DIR)');
    }
    // Without --detach the job lives as long as the CLI that started it.
    const onClose = () => { if (!job.detached && job.state === 'running') { this.log(`job ${job.id}: client went away, cancelling`); job.abort.abort(); } };
    sock.once('close', onClose);
    this.log(`job ${job.id}: backup of "${e.name}" to ${req.to}`);
    const run = runOnlineBackup({
      device: e.directDevice,
      gate: e.gate,
      sink,
      source: e.name,
      container: req.container,
      freeze: req.freeze,
      onError: req.onError,
      throttle: req.highWater !== undefined ? { highWater: req.highWater } : undefined,
      signal: job.abort.signal,
      maxRate: req.maxRate,
      writerPriority: job.writerPriority,
      writeWaitLimitMs: req.writeWaitLimitMs,
      selection: e.changes && { changes: e.changes, name: e.name, chained, incremental: !!req.incremental || replicaPath !== undefined || remoteReplica, protection, held, heldUntrusted, log: (l) => this.log(`job ${job.id}: ${l}`) },
      ...(req.method === 'hold' ? { hold: { filter: e.hold, mode: req.hold, limitBytes: req.holdLimit, holdLog, onStats: (f) => (job.hold = f), log: (l) => this.log(`job ${job.id}: ${l}`) } } : {}),
      onSession: (s) => (job.session = s),
      onEvent: (ev) => {
        if (ev.event === 'progress') job.progress = { bytesDone: ev.bytesDone, bytesTotal: ev.bytesTotal, badBlocks: ev.badBlocks };
        if (ev.event === 'armed') void identifyJobFiles(record).then(() => e.state.recordJob(record)).catch((err: Error) => this.log(`job ${job.id}: job record: ${err.message}`));
        if (ev.event === 'done') return;
        const payload = ev.event === 'progress' ? { bytesDone: ev.bytesDone, bytesTotal: ev.bytesTotal, badBlocks: ev.badBlocks, writesWaiting: ev.stats.writesWaiting, containerUsedBytes: ev.stats.containerUsedBytes } : ev;
        send({ type: 'event', ...payload, event: ev.event, job: job.id });
        if (ev.event === 'armed' && job.detached) { send({ type: 'result', detached: true, job: job.id }); sock.end(); }
      },
    });
    if (remoteReplica) {
      // The link was opened before the job: whatever ends the job early (a cancel, a failed arming)
      // closes it, so the appliance drops the uncommitted journal and frees the replica.
      const endLink = () => void replicaSink!.abort(new Error('the backup ended'));
      job.abort.signal.addEventListener('abort', endLink, { once: true });
      run.catch(endLink);
    }
    return this.settle(job, e, sock, onClose, run, (summary) => {
      job.summary = summary;
      job.progress = { bytesDone: summary.bytes, bytesTotal: summary.bytes, badBlocks: summary.badBlocks.length };
      this.log(`job ${job.id}: done, ${summary.bytes} bytes, worst write delay ${summary.worstWriteDelayMs.toFixed(1)} ms`);
      return { ...summary, job: job.id, badBlockCount: summary.badBlocks.length };
    }, true);
  }

  /** How every backup job ends: its state, error and log line, its record dropped, the export free again. */
  private async settle<R>(job: Job, e: Entry, sock: net.Socket, onClose: () => void, run: Promise<R>, done: (r: R) => Record<string, unknown>, recorded: boolean): Promise<Record<string, unknown>> {
    try {
      const r = await run;
      job.state = 'done';
      return done(r);
    } catch (err) {
      job.state = job.abort.signal.aborted ? 'cancelled' : 'failed';
      job.error = errorText(err);
      this.log(`job ${job.id}: ${job.state}: ${job.error}`);
      throw err;
    } finally {
      job.finished = new Date();
      if (recorded) await e.state.dropJob(job.id).catch((err: Error) => this.log(`job ${job.id}: removing its record: ${err.message}`));
      sock.off('close', onClose);
      if (e.job === job) e.job = undefined;
    }
  }
  /** --to appliance://: the host side of the appliance split (jobs/appliance-backup.ts); the appliance writes the output. */
  private async applianceBackup(req: BackupRequest, send: (r: ControlReply) => void, sock: net.Socket, e: Entry): Promise<Record<string, unknown>> {
    const addr = parseApplianceAddress(req.to.slice('appliance://'.length).replace(/\/$/, ''), `--to ${req.to}`);
    if (req.key === undefined) throw new UserError('--to appliance:// needs --key FILE');
    let keys: PskKeys;
    try { keys = loadPskFile(req.key); } catch (err) { throw new UserError(`--key: ${(err as Error).message}`, 'the PSK file the appliance was started with (livesnap keygen FILE)'); }
    const job: Job = { kind: 'backup', id: `${e.name}-${++this.jobSeq}`, export: e.name, to: req.to, started: new Date(), state: 'running', abort: new AbortController(), progress: { bytesDone: 0, bytesTotal: 0, badBlocks: 0 }, detached: !!req.detach, writerPriority: DEFAULT_WRITER_PRIORITY };
    e.job = job;
    this.jobs.set(job.id, job);
    const onClose = () => { if (!job.detached && job.state === 'running') { this.log(`job ${job.id}: client went away, cancelling`); job.abort.abort(); } };
    sock.once('close', onClose);
    this.log(`job ${job.id}: backup of "${e.name}" by the appliance ${req.to}`);
    const run = runApplianceBackup({
      device: e.directDevice, gate: e.gate, unit: e.name, address: addr, keys, timeoutMs: req.applianceTimeoutMs, freeze: req.freeze, signal: job.abort.signal,
      onSession: (s) => (job.session = s),
      onEvent: (ev) => {
        if (ev.event === 'progress') job.progress = { bytesDone: ev.bytesDone, bytesTotal: ev.bytesTotal, badBlocks: 0 };
        send({ type: 'event', ...ev, job: job.id });
        if (ev.event === 'armed' && job.detached) { send({ type: 'result', detached: true, job: job.id }); sock.end(); }
      },
    });
    return this.settle(job, e, sock, onClose, run, (summary) => {
      job.progress = { bytesDone: summary.bytes, bytesTotal: summary.bytes, badBlocks: 0 };
      this.log(`job ${job.id}: done: the appliance wrote ${summary.output} (${summary.bytes} bytes); ${summary.blocksSavedByWriters} originals sent; worst write delay ${summary.worstWriteDelayMs.toFixed(1)} ms`);
      return { ...summary, job: job.id, badBlockCount: 0 };
    }, false);
  }
}

/** The path is one of the served devices or files (a log there would bypass and corrupt it). */

function overlapsServed(p: string, served: ReadonlyArray<{ devicePath: string }>): boolean {
  const real = (x: string) => { try { return fs.realpathSync(x); } catch { return x; } };
  return served.some((e) => real(e.devicePath) === real(p));
}

/** Held changes of an export now: count, payload bytes, the oldest one's age. */
function heldNow(h: { count: number; bytes: number; oldestMs: number }): { count: number; bytes: number; oldestMs: number } {
  return { count: h.count, bytes: h.bytes, oldestMs: Math.round(h.oldestMs) };
}

/** The files a backup creates: its partial target (a file target), and a container file. */
async function jobFiles(req: BackupRequest): Promise<JobRecord['files']> {
  const files: JobRecord['files'] = [];
  if (req.to !== '-' && req.to !== '/dev/null' && !isTapeDevice(req.to)) {
    const st = await fs.promises.stat(req.to).catch(() => undefined);
    if (!st || st.isFile()) files.push({ path: `${req.to}.partial`, what: 'partial target' });
  }
  const c = req.container !== undefined ? parseContainer(req.container) : undefined;
  if (c?.kind === 'file') files.push({ path: c.path, what: 'container file' });
  return files;
}

/** Records the device and inode of each file the job has made by now. */
async function identifyJobFiles(rec: JobRecord): Promise<void> {
  for (const f of rec.files) {
    const st = await fs.promises.stat(f.path).catch(() => undefined);
    if (st) { f.dev = st.dev; f.ino = st.ino; }
  }
}
