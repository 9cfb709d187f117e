// A replica over the appliance's authenticated link (replica://HOST:PORT/NAME): the host's sink end.
// One link per backup: first `rquery` (what the replica NAME on the appliance holds, recovered there
// first), then the backup as `rbegin`, the block sets (`rused`, `rzero`), `rsets`, the data (`rdata`,
// ascending), `rfinish`; the appliance stages everything in the replica's journal and answers `rdone`
// only once it is committed and applied (jobs/replica-unit.ts there). Any failure: `cancel`, and the
// appliance drops the uncommitted journal: the replica keeps the snapshot it held.
import type { PskKeys } from '../nbd/tls-psk';
import type { BackupSink, DataBatch, FinishInfo, VolumeInfo } from '../sink/sink';
import type { Bitset } from '../util/bitset';
import { UserError } from '../util/errors';
import { connectAppliance, type HostLink, parseApplianceAddress } from './link';
import { type ApplianceMessage, LINK_VERSION, MAX_PAYLOAD, MAX_RANGES } from './link-protocol';

/** replica://HOST:PORT/NAME, checked. */
export function parseReplicaUrl(url: string): { host: string; port: number; name: string } {
  const m = /^replica:\/\/([^/]+)\/([A-Za-z0-9][A-Za-z0-9._-]{0,254})$/.exec(url);
  if (!m) throw new UserError(`--to ${url} is not replica://HOST:PORT/NAME`, 'e.g. replica://10.0.0.2:10810/data (NAME: the appliance\'s --replica NAME=PATH)');
  return { ...parseApplianceAddress(m[1]!, `--to ${url}`), name: m[2]! };
}

export class RemoteReplicaSink implements BackupSink {
  readonly randomAccess = false;
  readonly description: string;
  private waiters: Array<{ want: string; resolve: (m: ApplianceMessage) => void; reject: (e: Error) => void }> = [];
  private failure: Error | undefined;
  private bytes = 0;
  private staged: Buffer | undefined;

  private constructor(private readonly link: HostLink, private readonly name: string, where: string) {
    this.description = `replica "${name}" on the appliance at ${where}`;
    link.onMessage((m) => {
      if (m.t === 'error') return this.fail(new UserError(`the appliance: ${m.message}`, m.hint));
      const w = this.waiters.shift();
      if (!w) return;
      if (m.t === w.want) w.resolve(m); else w.reject(new Error(`the appliance answered "${m.t}", expected "${w.want}"`));
    });
    link.onClose((e) => this.fail(e ?? new Error(`the appliance at ${where} closed the link`)));
  }

  private fail(e: Error): void {
    this.failure ??= e;
    for (const w of this.waiters.splice(0)) w.reject(this.failure);
    this.link.close(e);
  }

  private next(want: string): Promise<ApplianceMessage> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => this.waiters.push({ want, resolve, reject }));
  }

  /** Connects and asks what the replica holds (the appliance recovers an interrupted apply first). */
  static async open(url: string, keys: PskKeys, timeoutMs = 30_000): Promise<{ sink: RemoteReplicaSink; held: string | null; untrusted?: string }> {
    const a = parseReplicaUrl(url);
    const link = await connectAppliance(a, keys, timeoutMs);
    const sink = new RemoteReplicaSink(link, a.name, `${a.host}:${a.port}`);
    const answer = sink.next('rheld');
    link.send({ t: 'rquery', version: LINK_VERSION, replica: a.name });
    const h = await answer as Extract<ApplianceMessage, { t: 'rheld' }>;
    return { sink, held: h.snapshotId, ...(h.untrusted ? { untrusted: h.untrusted } : {}) };
  }

  private async send(m: Parameters<HostLink['send']>[0], payload?: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    if (!this.link.send(m, payload)) await this.link.drained();
    if (this.failure) throw this.failure;
  }

  private async sendRanges(kind: 'rused' | 'rzero', set: Bitset | undefined): Promise<void> {
    if (!set) return;
    let ranges: Array<[number, number]> = [];
    for (const r of set.runs()) {
      ranges.push(r);
      if (ranges.length === MAX_RANGES) { await this.send({ t: kind, ranges }); ranges = []; }
    }
    if (ranges.length) await this.send({ t: kind, ranges });
  }

  async begin(volume: VolumeInfo, used: Bitset): Promise<void> {
    const b = volume.backup;
    if (!b) throw new Error('a replica is kept only by online backups of a served export');
    await this.send({
      t: 'rbegin', replica: this.name, size: volume.size, blockSize: volume.blockSize, id: b.id, parent: b.parent, kind: b.kind, granularity: b.granularity,
      instant: volume.snapshotTime.toISOString(), source: volume.source, usedBlocks: used.setCount, zeroedBlocks: b.zeroed?.setCount ?? 0, excludedBytes: b.excludedBytes,
    });
    await this.sendRanges('rused', used);
    await this.sendRanges('rzero', b.zeroed);
    const ready = this.next('rready');
    await this.send({ t: 'rsets' });
    await ready;
  }

  async write(batch: DataBatch): Promise<void> {
    const seg = batch.segments;
    const src = Buffer.from(batch.buffer);
    for (let i = 0; i + 2 < seg.length; i += 3) {
      let off = seg[i]!, len = seg[i + 1]!, at = seg[i + 2]!;
      while (len > 0) {
        const n = Math.min(len, MAX_PAYLOAD);
        // A copy: the batch's buffer is reused once write() returns, the socket may still hold it.
        this.staged = Buffer.from(src.subarray(at, at + n));
        await this.send({ t: 'rdata', offset: off, length: n }, this.staged);
        this.bytes += n; off += n; at += n; len -= n;
      }
    }
  }

  async finish(info: FinishInfo): Promise<void> {
    const done = this.next('rdone');
    await this.send({ t: 'rfinish', badBlocks: info.badBlocks.slice(0, MAX_RANGES) });
    await done;
    this.link.close();
  }

  async abort(reason: Error): Promise<void> {
    if (!this.link.closed) {
      this.link.send({ t: 'cancel', reason: reason.message.slice(0, 4000) });
      this.link.close();
    }
  }
}
