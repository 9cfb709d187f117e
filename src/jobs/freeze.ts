// FIFREEZE for the duration of a copy (seed 004: writers to that one file system wait, others do
// not), and FITHAW always after: on success, on error, on Ctrl-C and on process exit.
import { native } from '../device/native';
import { UserError } from '../util/errors';
import { mountAt } from '../util/mounts';
import type { Device } from '../device/device';

export function checkFreezeMount(mountPoint: string, source: Device): void {
  const m = mountAt(mountPoint);
  if (!m) throw new UserError(`${mountPoint} is not a mount point`, 'give the directory where the source file system is mounted (see "findmnt")');
  if (source.isBlockDevice && (m.major !== source.info.rdevMajor || m.minor !== source.info.rdevMinor)) {
    throw new UserError(`${mountPoint} is not where ${source.path} is mounted (it holds ${m.source})`, `freezing it would not make ${source.path} consistent; see "findmnt ${source.path}"`);
  }
  if (m.readOnly) return;
}

/**
 * FIFREEZE writes back every dirty page while writers are already stopped, so a busy file system
 * would be frozen for as long as that takes. syncfs first, with writers still going, leaves FIFREEZE
 * only what was dirtied meanwhile: rounds until one is quick (or three), then freeze.
 * (bench/freeze-window, a writer rewriting 1 MiB files: ~85-110 ms frozen without it.)
 */
async function presync(mountPoint: string): Promise<number> {
  const t0 = performance.now();
  for (let round = 0; round < 3; round++) {
    const t = performance.now();
    try { await native().syncfs(mountPoint); } catch { return performance.now() - t0; /* FIFREEZE will say what is wrong */ }
    if (performance.now() - t < 15) break;
  }
  return performance.now() - t0;
}

/**
 * Runs `work` with the file system frozen; returns its result, how long it was frozen, and how long
 * the write-back before the freeze took (writers were not stopped then).
 */
export async function withFrozen<T>(mountPoint: string, work: () => Promise<T>): Promise<{ result: T; frozenMs: number; presyncMs: number }> {
  let frozen = false;
  const thawNow = () => {
    if (!frozen) return;
    frozen = false;
    try { native().thawSync(mountPoint); } catch { /* already thawed */ }
  };
  const onSignal = (sig: NodeJS.Signals) => {
    thawNow();
    process.stderr.write(`\nlivesnap: ${sig}: ${mountPoint} thawed, backup cancelled\n`);
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.on('exit', thawNow);
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  const presyncMs = await presync(mountPoint);
  // The window counts from the FIFREEZE call (it blocks new writers while it syncs) to the end of FITHAW.
  const t0 = performance.now();
  try {
    try {
      await native().freeze(mountPoint);
    } catch (e) {
      throw new UserError(`cannot freeze ${mountPoint}: ${(e as Error).message}`, 'the file system must support FIFREEZE (ext4, xfs, btrfs) and not be frozen already');
    }
    frozen = true;
    const result = await work();
    frozen = false;
    await native().thaw(mountPoint);
    return { result, frozenMs: performance.now() - t0, presyncMs };
  } finally {
    thawNow();
    process.off('exit', thawNow);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.off('SIGHUP', onSignal);
  }
}
