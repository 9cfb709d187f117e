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
    `,
    examples: [
      ['Serve the instant and copy it with nbdcopy', '$0 snapshot data --json   # prints {"event":"armed",...,"uri":"nbd+unix:///data.snapshot-1?socket=..."}\nnbdcopy "nbd+unix:///data.snapshot-1?socket=/run/livesnap/data.snapshot-1.sock" /backup/data.raw'],
      ['File system consistent, in the background', '$0 snapshot data --freeze /srv/data --container file:/scratch/cow.bin:4G --detach'],
      ['End a detached one', '$0 cancel data-3'],
    ],
  });

  export = Option.String({ name: 'export' });
  container = Option.String('--container', { description: 'memory:SIZE (default memory:64M), file:PATH[:SIZE], partition:DEVICE' });
  freeze = Option.String('--freeze', { description: 'Mount point to freeze (FIFREEZE) for the instant of arming' });
  onError = Option.String('--on-error', { description: 'abort (default) | ignore: an original that cannot be read', validator: t.isEnum(['abort', 'ignore'] as const) });
  writeWaitLimit = Option.String('--write-wait-limit', { description: 'The longest a client write may wait on the snapshot before it is broken (default 30s)' });
  detach = Option.Boolean('--detach', false, { description: 'Return once the view is served; end it with "livesnap cancel <job>"' });
  control = controlOption();

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { request } = require('../../control/client') as typeof import('../../control/client');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const req: SnapshotRequest = {
      op: 'snapshot',
      export: this.export,
      container: this.container,
      freeze: this.freeze ? path.resolve(this.freeze) : undefined,
      onError: this.onError,
      detach: this.detach,
      writeWaitLimitMs: this.writeWaitLimit !== undefined ? parseDuration(this.writeWaitLimit, '--write-wait-limit') : undefined,
    };
    const r = this.reporter;
    const c = await request(resolveControlPath(this.control), req);
    // The view lives as long as this process holds the connection: a signal ends it, normally.
    let ended = false;
    const onSignal = () => { ended = true; c.close(); };
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    try {
      for await (const m of c.replies) {
        if (m.type === 'event' && m.event === 'armed') {
          r.event('armed', { ...m, type: undefined });
          r.info(`snapshot of ${this.export} taken at ${m.time} (freeze window ${Number(m.freezeMs).toFixed(1)} ms), served read-only as "${m.export}"\n  uri    ${m.uri}\n  job    ${m.job} (Ctrl-C${this.detach ? '' : ' here'} or "livesnap cancel ${m.job}" ends it)`);
        } else if (m.type === 'result') {
          if (m.detached) {
            r.done({ ...m, type: undefined }, [`snapshot served in the daemon as job ${m.job}: ${m.uri}`]);
            return 0;
          }
          r.done({ ...m, type: undefined }, [`snapshot ${m.job} ended after ${(Number(m.livedMs) / 1000).toFixed(1)} s; clients read ${formatBytes(Number(m.bytesRead))}`]);
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
