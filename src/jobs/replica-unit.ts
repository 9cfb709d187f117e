// The appliance's end of a replica over the link (replica://HOST:PORT/NAME; the host's end is
// appliance/remote-replica.ts): answers what the replica NAME (--replica NAME=PATH) holds, then
// receives one backup into a ReplicaSink (incremental/replica.ts): staged in the replica's journal,
// committed and applied only when the host's rfinish arrives; a cancel or a cut link before that
// drops the uncommitted journal, and the replica keeps the snapshot it held.
import type { ApplianceLink } from '../appliance/link';
import type { HostMessage, RBegin } from '../appliance/link-protocol';
import { giveAligned, takeAligned } from '../device/memory';
import { ReplicaSink, replicaHolding } from '../incremental/replica';
import type { VolumeInfo } from '../sink/sink';
import { Bitset } from '../util/bitset';
import { errorText, UserError } from '../util/errors';
import { TOOL_VERSION } from './version';

const STAGE = 4 << 20;

export class ReplicaUnit {
  private begin: RBegin | undefined;
  private used: Bitset | undefined;
  private zeroed: Bitset | undefined;
  private sink: ReplicaSink | undefined;
  private chain: Promise<void> = Promise.resolve();
  private finished = false;
  private stage: ArrayBuffer | undefined;
  private stageView: Buffer | undefined;
  private readonly segment = new Float64Array(3);
  readonly status: { replica: string; path: string; state: string; snapshotId?: string; bytes: number; error?: string };

  constructor(private readonly link: ApplianceLink, private readonly path: string, name: string, private readonly log: (l: string) => void) {
    this.status = { replica: name, path, state: 'query', bytes: 0 };
  }

  /** Runs the unit to its end (the link closed); never throws. */
  async run(): Promise<void> {
    const ended = new Promise<Error | null>((r) => this.link.onClose(r));
    this.link.onMessage((m, payload) => {
      // One message at a time, in order: the link is paused while the replica works.
      this.link.pause();
      this.chain = this.chain.then(() => this.on(m, payload)).then(() => this.link.resume(), (e: unknown) => this.refuse(e));
    });
    const held = await replicaHolding(this.path).catch((e: unknown) => ({ snapshotId: null, untrusted: errorText(e) }));
    this.link.send({ t: 'rheld', snapshotId: held.snapshotId, ...(held.untrusted ? { untrusted: held.untrusted.slice(0, 4000) } : {}) });
    const why = await ended;
    await this.chain.catch(() => {});
    if (!this.finished) {
      await this.sink?.abort(why ?? new Error('the host closed the link')).catch(() => {});
      this.status.state = 'abandoned';
      this.status.error ??= why?.message ?? 'the host closed the link before the backup was complete';
      this.log(`replica ${this.status.replica}: backup abandoned (${this.status.error}); ${this.path} keeps the snapshot it held`);
    }
    if (this.stage) giveAligned(this.stage);
  }

  private refuse(e: unknown): void {
    const message = errorText(e).split('\n  hint: ')[0]!;
    this.status.state = 'failed';
    this.status.error = message;
    this.link.send({ t: 'error', message: message.slice(0, 4000), ...(e instanceof UserError && e.hint ? { hint: e.hint.slice(0, 4000) } : {}) });
    this.link.close();
  }

  private async on(m: HostMessage, payload: Buffer | undefined): Promise<void> {
    switch (m.t) {
      case 'rquery': return;
      case 'rbegin': {
        if (this.begin) throw new UserError('a second rbegin on one link');
        const total = Math.ceil(m.size / m.blockSize);
        this.begin = m;
        this.used = new Bitset(total);
        this.zeroed = new Bitset(total);
        this.status.state = 'receiving';
        this.status.snapshotId = m.id;
        return;
      }
      case 'rused': case 'rzero': {
        const set = m.t === 'rused' ? this.used : this.zeroed;
        if (!set || this.sink) throw new UserError(`"${m.t}" outside the block sets of a backup`);
        for (const [s, e] of m.ranges) {
          if (!(s < e && e <= set.size)) throw new UserError(`"${m.t}" range ${s}..${e} is outside the volume's ${set.size} blocks`);
          set.setRange(s, e);
        }
        return;
      }
      case 'rsets': {
        const b = this.begin;
        if (!b || this.sink) throw new UserError('"rsets" without a backup');
        if (this.used!.setCount !== b.usedBlocks || this.zeroed!.setCount !== b.zeroedBlocks) throw new UserError(`the block sets arrived incomplete (${this.used!.setCount} of ${b.usedBlocks} used, ${this.zeroed!.setCount} of ${b.zeroedBlocks} zeroed)`);
        const volume: VolumeInfo = {
          source: b.source, size: b.size, blockSize: b.blockSize, totalBlocks: this.used!.size, usedBlocks: b.usedBlocks, filesystem: 'unknown',
          snapshotTime: new Date(b.instant), notes: [], toolVersion: TOOL_VERSION,
          backup: { id: b.id, parent: b.parent, kind: b.kind, granularity: b.granularity, excludedBytes: b.excludedBytes, ...(b.zeroedBlocks ? { zeroed: this.zeroed! } : {}) },
        };
        const sink = new ReplicaSink(this.path);
        await sink.begin(volume, this.used!);
        this.sink = sink;
        this.log(`replica ${this.status.replica}: receiving ${b.kind} ${b.id}${b.parent ? ` over ${b.parent}` : ''} into ${this.path}`);
        this.link.send({ t: 'rready' });
        return;
      }
      case 'rdata': {
        if (!this.sink || !payload) throw new UserError('"rdata" before the replica was ready');
        if (payload.length !== m.length) throw new UserError(`"rdata" says ${m.length} bytes and carries ${payload.length}`);
        // O_DIRECT wants aligned memory: one staging buffer, reused.
        if (!this.stage) { this.stage = takeAligned(STAGE); this.stageView = Buffer.from(this.stage); }
        payload.copy(this.stageView!, 0);
        this.segment[0] = m.offset; this.segment[1] = m.length; this.segment[2] = 0;
        await this.sink.write({ buffer: this.stage, segments: this.segment });
        this.status.bytes += m.length;
        return;
      }
      case 'rfinish': {
        if (!this.sink) throw new UserError('"rfinish" before the replica was ready');
        await this.sink.finish({ badBlocks: m.badBlocks });
        this.finished = true;
        this.status.state = 'done';
        this.log(`replica ${this.status.replica}: ${this.path} holds ${this.begin!.id} (${this.status.bytes} bytes received)`);
        this.link.send({ t: 'rdone', snapshotId: this.begin!.id, bytes: this.status.bytes });
        this.link.close();
        return;
      }
      case 'cancel':
        throw new UserError(`the host cancelled the backup: ${m.reason}`);
      default:
        throw new UserError(`"${m.t}" is not part of a replica backup`);
    }
  }
}
