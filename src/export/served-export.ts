// One served volume, built in one place: everything the request names is checked before anything
// is opened, then the device is opened and locked, the filter chain built in front of it (the
// snapshot gate), and the NBD listeners started. Any failure on the way closes and removes what was
// made, in reverse order, so a refused serve leaves no socket, no open descriptor and no lock.
import { Device } from '../device/device';
import { type Identity, identify, overlap } from '../device/identity';
import { DeviceBackend } from '../nbd/device-backend';
import { createNbdServer, type NbdServer } from '../nbd/server';
import { loadPskFile, type PskKeys } from '../nbd/tls-psk';
import { SnapshotFilter } from './snapshot-filter';
import { HoldFilter } from './hold-filter';
import { holdLogDevice, type ReplayReport, replayPendingHoldLog } from './hold-log';
import { UserError } from '../util/errors';
import { CACHE_MODES, type CacheMode, EXPORT_NAME, type ExportSpec } from './export-spec';
import { checkTcpSecurity, formatHostPort, type ListenAddress, parseListen, plaintextWarning } from './listen';
import * as path from 'node:path';
import { type Leftover, StateDir } from './state-dir';
import { ChangeFilter } from './change-filter';
import { ChangeMap } from '../incremental/change-map';
import { deviceStamp } from '../incremental/stamp';
import { config } from '../config';

export interface ExportContext {
  /** Where state directories go when the request names none. */
  stateRoot: string;
  /** Exports already served by this daemon (a device is served once). */
  served: Iterable<ServedExport>;
  /** The unix socket for `name` when the request gives none. */
  defaultSocket(name: string): string;
  log(line: string): void;
}

export class ServedExport {
  tcp?: string;
  tcpUri?: string;
  tls?: 'psk' | 'none';
  /** What a killed daemon had left of this export's jobs, found and cleaned when it was served. */
  leftovers: Leftover[] = [];
  /** What this serve replayed from a hold log a killed daemon left (--method hold --hold-log). */
  holdLogReplay?: ReplayReport;

  private constructor(
    readonly name: string,
    readonly devicePath: string,
    readonly identity: Identity,
    /** The export's handle on the device (buffered with cache=writeback); holds the served lock. */
    readonly device: Device,
    /** What backups read and write the device through: always O_DIRECT (the same handle with cache=none). */
    readonly directDevice: Device,
    /** A loop device's backing file, opened only to hold the served lock on it too. */
    private readonly backingLock: Device | undefined,
    readonly cache: CacheMode,
    readonly backend: DeviceBackend,
    readonly gate: SnapshotFilter,
    readonly nbd: NbdServer,
    readonly socket: string,
    readonly keys: PskKeys | undefined,
    readonly state: StateDir,
    /** The hold filter in front of the gate (--method hold queues changes here). */
    readonly hold: HoldFilter,
    /** Change tracking at the head of the chain (incremental backups); absent with LIVESNAP_CHANGE_TRACKING=off. */
    readonly changes: ChangeFilter | undefined,
    private readonly stamp: () => Promise<import('../incremental/change-map').DeviceStamp>,
  ) {}

  get uri(): string {
    return `nbd+unix:///${this.name}?socket=${this.socket}`;
  }

  static async open(req: ExportSpec, ctx: ExportContext): Promise<ServedExport> {
    // 1. Everything the request says, before anything is opened.
    if (!EXPORT_NAME.test(req.name)) throw new UserError(`export name "${req.name}" is not allowed`, 'use letters, digits, ".", "_" and "-" (up to 64), starting with a letter or digit');
    const served = [...ctx.served];
    if (served.some((e) => e.name === req.name)) throw new UserError(`an export named "${req.name}" is already served`, `choose another --name, or "livesnap stop ${req.name}" first`);
    const cache = req.cache ?? 'none';
    if (!CACHE_MODES.includes(cache)) throw new UserError(`--cache ${cache}: not a cache mode`, `use one of: ${CACHE_MODES.join(', ')}`);
    const listen: ListenAddress | undefined = req.listen !== undefined ? parseListen(req.listen) : undefined;
    const security = checkTcpSecurity(req);
    const keys = req.tlsPsk !== undefined ? loadKeys(path.resolve(req.tlsPsk)) : undefined;
    const socket = req.socket ?? ctx.defaultSocket(req.name);
    const identity = await identify(req.device);
    for (const e of served) {
      const why = overlap(identity, e.identity);
      if (why) throw new UserError(`${req.device} is already served as "${e.name}" (${e.devicePath}: ${why})`, 'a volume is served once: every writer must go through that export');
    }
    if (identity.kind === 'file' && identity.devices.length) {
      // A file with a loop device over it: writes through the loop would bypass the export.
      const loops = identity.lockPaths.slice(1).join(', ');
      throw new UserError(`${req.device} is attached to ${loops}: writes through it would bypass the export and its snapshots`, `detach it first ("losetup -d ${loops}")`);
    }

    const state = await StateDir.open(req.state ?? path.join(ctx.stateRoot, req.name), req.device, identity.files[0] ?? identity.devices[0] ?? req.device);
    if (state.adoptedFrom) ctx.log(`[${req.name}] the state directory ${state.dir} belonged to ${state.adoptedFrom}, which is gone: taken over for ${req.device}`);

    // 2. Open and lock, undoing on any failure.
    const undo: Array<() => void | Promise<void>> = [];
    try {
      const device = Device.open(req.device, { write: true, exclusive: true, direct: cache === 'none' });
      undo.push(() => device.close());
      if (!device.tryLock('exclusive')) {
        throw new UserError(`${req.device} is already served by another livesnap daemon (it holds the device's lock)`, 'stop it there ("livesnap stop" with that daemon\'s --control), or back it up through that export');
      }
      let backingLock: Device | undefined;
      const backing = identity.files.length ? identity.lockPaths.find((p) => p !== req.device) : undefined;
      if (device.isBlockDevice && backing) {
        backingLock = Device.open(backing, { write: false, direct: false });
        undo.push(() => backingLock!.close());
        if (!backingLock.tryLock('exclusive')) throw new UserError(`${backing}, the file behind ${req.device}, is served by another livesnap daemon`, 'serve it once');
      }
      let directDevice = device;
      if (cache === 'writeback') {
        directDevice = Device.open(req.device, { write: true, direct: true });
        undo.push(() => directDevice.close());
      }
      const backend = new DeviceBackend(device, { description: `livesnap export of ${req.device}` });
      undo.push(() => backend.dispose());
      // The change map is judged before anything writes the device (a hold-log replay would look
      // like a write made while unserved); the replayed writes were marked when acknowledged.
      const stampFiles = identity.lockPaths.filter((p) => p !== undefined);
      const stamp = () => deviceStamp(directDevice, stampFiles);
      const changeMap = !config().changeTracking ? undefined : await ChangeMap.open(state.dir, identity.files[0] ?? identity.devices[0] ?? req.device, device.size, stamp, state.created, config().changeIntentIdleMs);
      undo.push(() => changeMap?.closeNow());
      if (changeMap?.resetBecause && !state.created) ctx.log(`[${req.name}] the change map cannot be trusted: ${changeMap.resetBecause}; the next backup is full`);
      // Acknowledged writes a killed daemon left only in its hold log go onto the device before any client.
      const replay = await replayPendingHoldLog(state.dir, holdLogDevice(identity, req.device, device.size), backend);
      if (replay) ctx.log(`[${req.name}] replayed ${replay.records} held writes (${replay.bytes} bytes) from the hold log ${replay.log} before serving${replay.tornBytes ? `; dropped a torn tail of ${replay.tornBytes} bytes (never acknowledged)` : ''}`);
      // The filter chain in front of the device: the hold filter (--method hold queues changes there),
      // then the snapshot filter (copy-before-write attaches here; a hold's released changes pass it).
      const gate = new SnapshotFilter(backend);
      const hold = new HoldFilter(gate);
      const changes = changeMap ? new ChangeFilter(hold, changeMap) : undefined;
      const chain = changes ?? hold;
      const nbd = createNbdServer({ exports: { [req.name]: chain }, defaultExport: req.name, log: (level, m) => { if (level !== 'debug') ctx.log(`[${req.name}] ${m}`); } });
      undo.push(() => nbd.close());
      await nbd.listenUnix(socket).catch((e: Error) => {
        throw new UserError(`cannot listen on ${socket}: ${e.message}`, 'give another --socket, or stop what listens there');
      });
      const exp = new ServedExport(req.name, req.device, identity, device, directDevice, backingLock, cache, backend, gate, nbd, socket, keys, state, hold, changes, stamp);
      // Locked: this daemon alone owns the export now, so what a dead one left is ours to clean.
      exp.holdLogReplay = replay;
      exp.leftovers = await state.collectLeftovers();
      for (const l of exp.leftovers) ctx.log(`[${req.name}] found what a daemon that died left of job ${l.job} (pid ${l.pid}, started ${l.started}, to ${l.to}): ${l.cleaned.join('; ') || 'nothing'}`);
      if (listen) {
        const port = await nbd.listenTcp(listen.host, listen.port, { tls: keys }).catch((e: NodeJS.ErrnoException) => {
          if (e.code === 'EADDRINUSE') throw new UserError(`--listen ${req.listen}: the address is already in use`, 'choose another port, or stop what listens there');
          if (e.code === 'EADDRNOTAVAIL') throw new UserError(`--listen ${req.listen}: no interface of this machine has that address`, 'use an address of this machine, or :PORT for loopback');
          throw e;
        });
        exp.tcp = formatHostPort({ host: listen.host, port });
        exp.tls = keys ? 'psk' : 'none';
        if (security === 'plaintext') ctx.log(`[${req.name}] ${plaintextWarning({ host: listen.host, port })}`);
        exp.tcpUri = keys
          ? `nbds://${encodeURIComponent(keys.identities[0]!)}@${exp.tcp}/${req.name}?tls-psk-file=${uriValue(req.tlsPsk!)}`
          : `nbd://${exp.tcp}/${req.name}`;
      }
      return exp;
    } catch (e) {
      for (const f of undo.reverse()) { try { await f(); } catch { /* undoing: keep going */ } }
      throw e;
    }
  }

  /** Finishes in-flight requests, flushes, and releases everything (the lock last). */
  async close(): Promise<void> {
    await this.nbd.close();
    await this.device.sync().catch(() => {});
    // A clean stop: the map is stamped with the device as it is now.
    await this.changes?.map.close(this.stamp).catch(() => this.changes?.map.closeNow());
    this.backend.dispose();
    if (this.directDevice !== this.device) this.directDevice.close();
    this.backingLock?.close();
    this.device.close();
  }
}

/** The PSK file of --tls-psk, or a UserError saying what is wrong with it. */
export function loadKeys(file: string): PskKeys {
  try {
    return loadPskFile(file);
  } catch (e) {
    throw new UserError(`--tls-psk ${(e as Error).message}`, 'make one with "livesnap keygen FILE" (mode 0600, one identity:hexkey line)');
  }
}

/** A URI query value: percent-encoded, slashes kept (a path stays readable). */
function uriValue(v: string): string {
  return encodeURIComponent(v).replace(/%2F/g, '/');
}
