import { Command, Option } from 'clipanion';
import * as path from 'node:path';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';

const PROTOCOL = `
      A replica ("livesnap backup <export> --to replica:PATH") is an image file or block device that
      always holds exactly one snapshot of the export. The first backup to it is full; later ones
      send only the blocks changed since the snapshot it holds. A delta is first staged whole in a
      journal (PATH.livesnap-journal), made durable and sealed with a commit record, and only then
      written in place; the replica's metadata (PATH.livesnap-replica.json: the snapshot it holds,
      the volume's size, the file or device it belongs to, checksummed) is replaced last. A full to an
      image file is written to PATH.livesnap-partial and renamed over it. For a block device these
      files live under the state directory ($LIVESNAP_STATE_DIR/replicas/), not in /dev.

      If the daemon or the machine dies at any point, the replica is rolled forward to the new
      snapshot (the journal was committed: it is applied again, which is harmless) or stays at the
      old one (it was not: the journal is dropped), never in between. The next backup to the
      replica does this by itself; "livesnap replica recover" does it now.
`;

/** "livesnap replica" and "livesnap replica --help": what a replica is, and its two commands. */
export class ReplicaCommand extends LivesnapCommand {
  static override paths = [['replica']];
  static override usage = Command.Usage({
    description: 'A replica that only moves between snapshots: its files, its status, its recovery',
    details: `${PROTOCOL}
      "livesnap replica status PATH" tells which snapshot it holds (read only); "livesnap replica
      recover PATH" finishes or drops an interrupted apply. Each has its own --help.
    `,
    examples: [
      ['Keep a replica of the export "data"', '$0 backup data --to replica:/backup/data.replica'],
      ['What it holds', '$0 replica status /backup/data.replica'],
      ['After a crash of the machine', '$0 replica recover /backup/data.replica'],
    ],
  });

  async run(): Promise<number> {
    process.stdout.write(this.cli.usage(ReplicaCommand, { detailed: true }));
    return 0;
  }
}

export class ReplicaStatusCommand extends LivesnapCommand {
  static override paths = [['replica', 'status']];
  static override usage = Command.Usage({
    description: 'Show which snapshot a replica holds, and whether an interrupted apply waits for recovery',
    details: `${PROTOCOL}
      "status" only reads: it says "consistent" (the replica holds the snapshot named), "empty" (it
      holds none yet) or "needs-recovery" (an apply was interrupted: the snapshot named is the one
      held before it, and "livesnap replica recover" finishes or drops it). Metadata that cannot be
      trusted (damaged, edited, naming another file or device, a file written by something else) is
      an error: run a full backup to the replica.
    `,
    examples: [
      ['What does the replica hold?', '$0 replica status /backup/data.replica'],
      ['For a script', '$0 replica status /backup/data.replica --json   # {"event":"done","snapshotId":"data-12","instant":"...","state":"consistent",...}'],
    ],
  });

  replica = Option.String({ name: 'path' });

  async run(): Promise<number> {
    /* eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { replicaStatus } = require('../../incremental/replica') as typeof import('../../incremental/replica');
    const p = path.resolve(this.replica);
    const s = await replicaStatus(p);
    const held = s.snapshotId ? `snapshot ${s.snapshotId} taken ${s.instant}` : 'no snapshot';
    const lines = s.state === 'consistent'
      ? [`replica ${p}: consistent, holds ${held}`, `  volume ${formatBytes(s.volumeSize!)} in ${s.blockSize}-byte blocks; metadata ${s.metadata}`]
      : s.state === 'empty'
        ? [`replica ${p}: empty, holds no snapshot yet (the next backup to it is full)`]
        : [
          `replica ${p}: needs recovery, ${s.busy ? 'a backup or recovery is writing it now' : 'an apply was interrupted'}; before it, it held ${held}`,
          ...(s.journalBytes !== undefined ? [`  journal ${s.journal} (${formatBytes(s.journalBytes)})`] : []),
          ...(s.busy ? [] : [`  run "livesnap replica recover ${p}" (or the next backup to it does)`]),
        ];
    this.reporter.done({ replica: p, ...s }, lines);
    return 0;
  }
}

export class ReplicaRecoverCommand extends LivesnapCommand {
  static override paths = [['replica', 'recover']];
  static override usage = Command.Usage({
    description: 'Finish or undo an interrupted apply, so the replica holds exactly one snapshot',
    details: `${PROTOCOL}
      "recover" checks the journal record by record. Committed (its commit record and every
      checksum match): it is applied again and the metadata moves to the new snapshot
      ("rolled-forward"). Not committed (cut short while staging): it is removed and the replica
      keeps its snapshot ("dropped-uncommitted"). Nothing to do: "none". A committed journal that
      does not check (damaged storage) is never applied: recover fails and says so; a full backup
      to the replica then rewrites it. Safe to run at any time, also again after a crash of itself.
    `,
    examples: [
      ['After a crash', '$0 replica recover /backup/data.replica'],
      ['A replica on a device, for a script', '$0 replica recover /dev/sdc --json   # {"event":"done","action":"rolled-forward","snapshotId":"data-12",...}'],
    ],
  });

  replica = Option.String({ name: 'path' });

  async run(): Promise<number> {
    /* eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { recoverReplica } = require('../../incremental/replica') as typeof import('../../incremental/replica');
    const p = path.resolve(this.replica);
    const r = await recoverReplica(p);
    const held = r.snapshotId ? `it holds snapshot ${r.snapshotId}` : 'it holds no snapshot';
    const said = {
      none: `replica ${p}: nothing to recover; ${held}`,
      'rolled-forward': `replica ${p}: the interrupted apply was completed; ${held}`,
      'dropped-uncommitted': `replica ${p}: an apply that was never committed was dropped; ${held}`,
    }[r.action];
    this.reporter.done({ replica: p, ...r }, [said]);
    return 0;
  }
}
