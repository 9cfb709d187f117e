// The backup appliance (`livesnap appliance`): listens for hosts on TLS-PSK, runs one unit per
// host backup (jobs/appliance-unit.ts) over one shared, bounded ODC, and answers `status` on an
// owner-only control socket in the daemon's line protocol (so `livesnap status --control` shows it).
import { isS3Url } from '../s3/location';
import type { S3Options } from '../s3/options';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { type ApplianceLink, listenForHosts } from '../appliance/link';
import type { Hello } from '../appliance/link-protocol';
import { ODC_SLOT, OriginalDataCache, type OdcSpec } from '../appliance/odc';
import { ApplianceUnit } from '../jobs/appliance-unit';
import { ReplicaUnit } from '../jobs/replica-unit';
import type { PskKeys } from '../nbd/tls-psk';
import { UserError } from '../util/errors';
import { type ControlReply, parseControlRequest } from './protocol';

export interface ApplianceOptions {
  listen: { host: string; port: number };
  keys: PskKeys;
  luns: ReadonlyMap<string, string>;
  /** --replica NAME=PATH: replicas kept here for hosts' replica://HOST:PORT/NAME. */
  replicas?: ReadonlyMap<string, string>;
  store: string;
  /** The endpoint and part sizes of an s3:// store. */
  s3?: S3Options;
  odc: OdcSpec;
  run?: string;
  control?: string;
  /** --max-rate: bytes per second each unit reads its LUN at most. */
  maxRate?: number;
  /** A host that sends nothing (not even its hello) for this long is dropped (default 30 s). */
  helloTimeoutMs?: number;
  log?: (line: string) => void;
}

export class ApplianceDaemon {
  private server: net.Server | undefined;
  private control: net.Server | undefined;
  private odc: OriginalDataCache | undefined;
  private readonly units = new Set<ApplianceUnit>();
  private readonly replicaUnits = new Set<ReplicaUnit>();
  private readonly finished: ApplianceUnit[] = [];
  private readonly links = new Set<ApplianceLink>();
  readonly log: (line: string) => void;

  constructor(private readonly o: ApplianceOptions) {
    this.log = o.log ?? ((l) => process.stderr.write(`${new Date().toISOString()} ${l}\n`));
  }

  async start(): Promise<void> {
    const o = this.o;
    for (const [name, p] of o.luns) {
      try { fs.accessSync(p, fs.constants.R_OK); } catch { throw new UserError(`--lun ${name}=${p}: cannot read ${p}`, 'give this machine\'s path to the shared LUN (a block device or file it can read)'); }
    }
    if (isS3Url(o.store)) {
      // eslint-disable-next-line @typescript-eslint/no-require-imports -- the SDK loads only for s3://
      await (require('../s3/destination') as typeof import('../s3/destination')).checkStore(o.store, o.s3);
    } else {
      fs.mkdirSync(o.store, { recursive: true });
      fs.accessSync(o.store, fs.constants.W_OK);
    }
    this.odc = new OriginalDataCache(o.odc);
    try {
      if (o.control) this.control = await this.listenControl(o.control);
      this.server = await listenForHosts(o.listen, o.keys, (link, identity) => this.accept(link, identity), this.log);
    } catch (e) {
      await this.stop();
      throw e;
    }
    this.log(`appliance: listening on ${o.listen.host}:${o.listen.port} (TLS-PSK, ${o.keys.identities.length} key(s) of ${o.keys.source}); LUNs ${[...o.luns].map(([n, p]) => `${n}=${p}`).join(', ') || 'none'}; replicas ${[...(o.replicas ?? [])].map(([n, p]) => `${n}=${p}`).join(', ') || 'none'}; store ${o.store}; ODC ${this.odc.description}${o.run ? `; --run ${o.run}` : ''}`);
  }

  private accept(link: ApplianceLink, identity: string): void {
    this.links.add(link);
    link.onClose(() => this.links.delete(link));
    this.log(`${link.peer}: key "${identity}" accepted`);
    const t = setTimeout(() => link.close(new UserError('no hello within the time allowed')), this.o.helloTimeoutMs ?? 30_000);
    let unit: ApplianceUnit | undefined;
    link.onClose((e) => { clearTimeout(t); if (!unit) this.log(`${link.peer}: ${e ? e.message : 'closed'} before a hello`); });
    let replica: ReplicaUnit | undefined;
    link.onMessage((m) => {
      if (!unit && !replica && m.t === 'rquery') {
        clearTimeout(t);
        const p = this.o.replicas?.get(m.replica);
        if (p === undefined) {
          link.send({ t: 'error', message: `the appliance keeps no replica named "${m.replica}"`, hint: `start it with --replica ${m.replica}=PATH` });
          link.close();
          return;
        }
        if ([...this.replicaUnits].some((u) => u.status.path === p)) {
          link.send({ t: 'error', message: `the replica "${m.replica}" is being written by another backup`, hint: 'wait for it to end' });
          link.close();
          return;
        }
        replica = new ReplicaUnit(link, p, m.replica, this.log);
        this.replicaUnits.add(replica);
        const r = replica;
        void r.run().finally(() => this.replicaUnits.delete(r));
        return;
      }
      if (replica) return;
      if (unit || m.t !== 'hello') {
        if (!unit) link.close(new UserError(`${link.peer} sent "${m.t}" before its hello`));
        return;
      }
      clearTimeout(t);
      const busy = [...this.units].find((u) => u.status.unit === m.unit);
      if (busy) {
        link.send({ t: 'error', message: `the appliance already runs a backup of "${m.unit}" (instant ${busy.status.instant})`, hint: 'wait for it to end' });
        link.close();
        return;
      }
      unit = this.startUnit(link, m);
    });
  }

  private startUnit(link: ApplianceLink, hello: Hello): ApplianceUnit {
    const unit = new ApplianceUnit({ link, hello, luns: this.o.luns, store: this.o.store, s3: this.o.s3, odc: this.odc!, run: this.o.run, maxRate: this.o.maxRate, log: this.log });
    this.units.add(unit);
    void unit.run().finally(() => {
      this.units.delete(unit);
      this.finished.push(unit);
      if (this.finished.length > 20) this.finished.shift();
    });
    return unit;
  }

  status(): Record<string, unknown> {
    return {
      appliance: true,
      pid: process.pid,
      control: this.o.control,
      listen: `${this.o.listen.host}:${this.o.listen.port}`,
      luns: Object.fromEntries(this.o.luns),
      store: this.o.store,
      odc: { description: this.odc?.description, capacityBytes: (this.odc?.capacity ?? 0) * ODC_SLOT, usedBytes: (this.odc?.used ?? 0) * ODC_SLOT, peakBytes: (this.odc?.peak ?? 0) * ODC_SLOT },
      units: [...this.units].map((u) => u.status),
      recent: this.finished.map((u) => u.status),
    };
  }

  private listenControl(p: string): Promise<net.Server> {
    fs.mkdirSync(path.dirname(p), { recursive: true, mode: 0o700 });
    try { fs.rmSync(p, { force: true }); } catch { /* none */ }
    const srv = net.createServer((sock) => {
      let buf = '';
      sock.on('data', (d) => {
        buf += d.toString();
        const nl = buf.indexOf('\n');
        if (nl < 0) { if (buf.length > 65536) sock.destroy(); return; }
        let reply: ControlReply;
        try {
          const req = parseControlRequest(buf.slice(0, nl));
          reply = req.op === 'status' ? { type: 'result', ...this.status() } : { type: 'error', message: `an appliance answers only "status", not "${req.op}"`, hint: 'that goes to the control socket of "livesnap serve"' };
        } catch (e) {
          reply = { type: 'error', message: (e as Error).message };
        }
        sock.end(JSON.stringify(reply) + '\n');
      });
      sock.on('error', () => {});
    });
    return new Promise((resolve, reject) => {
      srv.once('error', reject);
      srv.listen(p, () => { fs.chmodSync(p, 0o600); resolve(srv); });
    });
  }

  /** Ends every unit (their outputs stay .partial and are removed), closes the listeners and the ODC. */
  async stop(): Promise<void> {
    for (const u of this.units) u.cancel(new UserError('the appliance is shutting down'));
    const deadline = Date.now() + 5000;
    while (this.units.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    for (const l of this.links) l.close(new Error('the appliance is shutting down'));
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    await new Promise<void>((r) => (this.control ? this.control.close(() => r()) : r()));
    if (this.o.control) fs.rmSync(this.o.control, { force: true });
    this.odc?.close();
  }
}
