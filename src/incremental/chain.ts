// A chain of backups: one full, then incrementals, each naming the one before it as its parent.
// Applying them in order gives the last one's instant; this checks the order before anything is
// written, from the manifests alone.
import { UserError } from '../util/errors';

/** What a chain check needs of each backup's manifest. */
export interface ChainLink {
  /** How the user named it (the file). */
  name: string;
  id?: string;
  parent?: string | null;
  kind?: 'full' | 'incremental';
  volumeSize: number;
  source: string;
  snapshotTime: string;
}

/** Refuses a chain that does not apply: a first that is not full, a parent that is not the one before, another volume. */
export function checkChain(links: ChainLink[]): void {
  const first = links[0];
  if (!first) throw new UserError('no backup to restore');
  if (links.length === 1) return;
  if (!first.id || first.kind !== 'full') {
    throw new UserError(first.kind === 'incremental'
      ? `${first.name} is an incremental backup (parent ${first.parent}): a chain starts with a full backup`
      : `${first.name} has no backup id (an offline backup, or one written by an older livesnap): it cannot start a chain`,
    'give the full backup the chain starts from first, then each incremental in order');
  }
  for (let i = 1; i < links.length; i++) {
    const prev = links[i - 1]!, l = links[i]!;
    if (l.kind !== 'incremental') {
      throw new UserError(`${l.name} is ${l.kind === 'full' ? `a full backup (${l.id})` : 'not part of a chain (no backup id)'}: only incremental backups follow the first`, 'restore a full backup on its own, or start the chain with it');
    }
    if (l.volumeSize !== prev.volumeSize) throw new UserError(`${l.name} is of a volume of ${l.volumeSize} bytes, ${prev.name} of ${prev.volumeSize}: not the same volume`);
    if (l.parent !== prev.id) {
      const hint = links.find((x) => x.id === l.parent);
      throw new UserError(`${l.name} (${l.id}) follows ${l.parent}, not ${prev.name} (${prev.id})`,
        hint ? `put ${l.name} right after ${hint.name}` : `its parent ${l.parent} is missing from the chain: give every backup from the full one on, in order`);
    }
  }
}
