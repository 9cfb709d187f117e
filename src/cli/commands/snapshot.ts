import { Command, Option } from 'clipanion';
import * as path from 'node:path';
import * as t from 'typanion';
import { resolveControlPath, type SnapshotRequest } from '../../control/protocol';
import { parseDuration } from '../../util/duration';
import { UserError } from '../../util/errors';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';
import { controlOption } from './serve';

export class SnapshotCommand extends LivesnapCommand {
  static override paths = [['snapshot']];
  static override usage = Command.Usage({
    description: 'Serve one instant of a served export read-only over NBD, for any backup program to read',
    details: `
      Arms a snapshot of the export (copy-before-write, as "livesnap backup" does, optionally inside
      a FIFREEZE of --freeze <mountpoint>) and serves that instant READ-ONLY as a second NBD export,
      while the live export keeps taking writes (QEMU calls this fleecing). Any NBD client reads it:
      nbdcopy, qemu-img convert, nbdinfo, or nbdfuse + a loop device + "mount -o ro,noload" for a file
      backup program (tar, partclone, a Bacula file daemon). Free blocks of the instant read as zeros
      and are reported as holes (NBD block status), so nbdcopy and qemu-img skip them. Writes to the
      view are refused.

      The first write to a used block after the instant saves its original into the container
      (--container, default memory:64M); when the container is full, such writers wait, and after
      --write-wait-limit (default 30s) the snapshot is broken and the view closed, so writers go on.
      The view lasts until Ctrl-C / SIGTERM of this command, or with --detach until
      "livesnap cancel <job>". "livesnap status" shows it, its container fill and its age.

      \`--method hold\`: instead of copy-before-write, the export queues every write, trim and
      write-zeroes from the instant on (reads of the export see them) and the view reads the device
      itself; when the view ends, the queue is written in arrival order, and only then does this
      command return. Without --hold-log a held write is NOT acknowledged until then: clients wait
      for as long as the view is served (see "livesnap backup --help" on client timeouts). With
      \`--hold-log PATH[:SIZE]\` (on another device) held writes are appended to a durable log and
      acknowledged at once; after a crash "livesnap serve" replays it. Past \`--hold-limit\` (default
      256M in memory) the queue is released in order and the rest is copy-before-write (--container);
      no write fails. \`--hold metadata\` (ext2/3/4, and XFS with --freeze) holds only writes to the file system's
      metadata blocks: the view's structure is one instant, its file data may be newer.
    `,
    examples: [
      ['Serve the instant and copy it with nbdcopy', '$0 snapshot data --json   # prints {"event":"armed",...,"uri":"nbd+unix:///data.snapshot-1?socket=..."}\nnbdcopy "nbd+unix:///data.snapshot-1?socket=/run/livesnap/data.snapshot-1.sock" /backup/data.raw'],
      ['File system consistent, in the background', '$0 snapshot data --freeze /srv/data --container file:/scratch/cow.bin:4G --detach'],
      ['End a detached one', '$0 cancel data-3'],
      ['Writes held in a durable log instead of copy-before-write (the log on another device)', '$0 snapshot data --method hold --hold-log /ssd/data.holdlog:4G'],
      ['Only metadata writes held: a structurally consistent view, data may be newer', '$0 snapshot data --method hold --hold metadata'],
    ],
  });

  export = Option.String({ name: 'export' });
  container = Option.String('--container', { description: 'memory:SIZE (default memory:64M), file:PATH[:SIZE], partition:DEVICE' });
  freeze = Option.String('--freeze', { description: 'Mount point to freeze (FIFREEZE) for the instant of arming' });
  onError = Option.String('--on-error', { description: 'abort (default) | ignore: an original that cannot be read', validator: t.isEnum(['abort', 'ignore'] as const) });
  writeWaitLimit = Option.String('--write-wait-limit', { description: 'The longest a client write may wait on the snapshot before it is broken (default 30s)' });
  detach = Option.Boolean('--detach', false, { description: 'Return once the view is served; end it with "livesnap cancel <job>"' });
  method = Option.String('--method', { description: 'hold: queue the export\'s writes while the view is served, instead of copy-before-write', validator: t.isEnum(['hold'] as const) });
  hold = Option.String('--hold', { description: 'With --method hold: all (default) | metadata (only writes to file-system metadata are held); backup-blocks needs a copier: "livesnap backup"' });
  holdLimit = Option.String('--hold-limit', { description: 'With --method hold: the most held write data in memory (default 256M); beyond it copy-before-write, no write fails' });
  holdLog = Option.String('--hold-log', { description: 'With --method hold: PATH[:SIZE] of a durable log on ANOTHER device: held writes are acknowledged at once' });
  control = controlOption();

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { call, request } = require('../../control/client') as typeof import('../../control/client');
    /* eslint-enable @typescript-eslint/no-require-imports */
    if (this.hold !== undefined && this.hold !== 'all' && this.hold !== 'metadata') throw new UserError(`--hold ${this.hold} does not go with a snapshot view`, this.hold === 'backup-blocks' ? 'a view has no copier to take held blocks first: --hold all (the default) or metadata, or "livesnap backup --method hold --hold backup-blocks"' : 'give --hold all (the default) or --hold metadata');
    if (this.method !== 'hold' && (this.hold ?? this.holdLimit ?? this.holdLog) !== undefined) throw new UserError(`${this.hold !== undefined ? '--hold' : this.holdLimit !== undefined ? '--hold-limit' : '--hold-log'} goes with --method hold`, 'add --method hold, or drop the option');
    /* eslint-disable @typescript-eslint/no-require-imports -- checked here for the message, parsed again by the daemon */
    const { parseSize } = require('../../util/size') as typeof import('../../util/size');
    if (this.holdLog !== undefined) (require('../../export/hold-log') as typeof import('../../export/hold-log')).parseHoldLog(this.holdLog);
    /* eslint-enable @typescript-eslint/no-require-imports */
    const holdLimit = this.holdLimit !== undefined ? parseSize(this.holdLimit, '--hold-limit') : undefined;
    if (holdLimit !== undefined && holdLimit < 1) throw new UserError(`--hold-limit ${this.holdLimit}: give a size of at least 1 byte`, 'e.g. --hold-limit 256M');
    const req: SnapshotRequest = {
      op: 'snapshot',
      ...(this.method === 'hold' ? { method: 'hold' as const, hold: this.hold as 'all' | 'metadata' | undefined, holdLimit, holdLog: this.holdLog !== undefined ? path.resolve(this.holdLog) : undefined } : {}),
      export: this.export,
      container: this.container,
      freeze: this.freeze ? path.resolve(this.freeze) : undefined,
      onError: this.onError,
      detach: this.detach,
      writeWaitLimitMs: this.writeWaitLimit !== undefined ? parseDuration(this.writeWaitLimit, '--write-wait-limit') : undefined,
    };
    const r = this.reporter;
    const control = resolveControlPath(this.control);
    const c = await request(control, req);
    // The view lives as long as this process holds the connection: a signal ends it, normally. Once
    // armed, a signal asks the daemon to end the job and waits for its result (with --method hold,
    // until the held writes are on the device); a second signal, or a failed cancel, just hangs up.
    let ended = false;
    let jobId: string | undefined;
    const onSignal = () => {
      if (ended || jobId === undefined) { ended = true; c.close(); return; }
      ended = true;
      process.once('SIGINT', onSignal);
      process.once('SIGTERM', onSignal);
      call(control, { op: 'cancel', job: jobId }).catch(() => c.close());
    };
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    try {
      for await (const m of c.replies) {
        if (m.type === 'event' && m.event === 'armed') {
          jobId = String(m.job);
          r.event('armed', { ...m, type: undefined });
          r.info(`snapshot of ${this.export} taken at ${m.time} (freeze window ${Number(m.freezeMs).toFixed(1)} ms), served read-only as "${m.export}"\n  uri    ${m.uri}\n  job    ${m.job} (Ctrl-C${this.detach ? '' : ' here'} or "livesnap cancel ${m.job}" ends it)`);
        } else if (m.type === 'result') {
          if (m.detached) {
            r.done({ ...m, type: undefined }, [`snapshot served in the daemon as job ${m.job}: ${m.uri}`]);
            return 0;
          }
          const h = m.hold as { heldWrites: number; maxHoldMs: number; releaseMs: number | null; peakHeldBytes: number; fellBack: boolean } | undefined;
          r.done({ ...m, type: undefined }, [
            `snapshot ${m.job} ended after ${(Number(m.livedMs) / 1000).toFixed(1)} s; clients read ${formatBytes(Number(m.bytesRead))}`,
            ...(h ? [`  hold    ${h.heldWrites} writes held (peak ${formatBytes(h.peakHeldBytes)}), longest ${h.maxHoldMs.toFixed(0)} ms, released in ${Number(h.releaseMs ?? 0).toFixed(0)} ms${h.fellBack ? '; the hold limit was reached: the rest was copy-before-write' : ''}`] : []),
          ]);
          return 0;
        } else if (m.type === 'error') {
          throw new UserError(m.message, m.hint, m.exitCode ?? 1);
        }
      }
      if (ended) {
        r.done({ ended: 'interrupted' }, ['snapshot ended (interrupted); the export keeps serving']);
        return 0;
      }
      throw new UserError('the daemon closed the connection while the snapshot was served', 'see "livesnap status" and the daemon log');
    } catch (e) {
      if (ended) {
        r.done({ ended: 'interrupted' }, ['snapshot ended (interrupted); the export keeps serving']);
        return 0;
      }
      throw e;
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      c.close();
    }
  }
}
