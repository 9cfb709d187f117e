// FIFREEZE for the duration of a copy (seed 004: writers to that one file system wait, others do
// not), and FITHAW always after: on success, on error, on Ctrl-C and on process exit.
import { freezeFs as freezeIoctl, syncFs, thawFs, thawFsNow } from '../device/fsctl';
import { UserError } from '../util/errors';
import { deviceOfMount, fingerprintOf, fingerprintOfVolume, mountEntryAt } from '../export/on-volume';
import type { Device } from '../device/device';

/**
 * Refuses a --freeze / --mount that is not the file system of `source`: freezing another one (or a
 * directory on one) would make nothing consistent while the backup still reported a freeze window.
 * The mount's device is compared by number where it is the source itself, otherwise by the file
 * systems' own superblocks (UUID and size), which also follows nbdfuse + loop and /dev/nbdN stacks.
 */
export async function checkFreezeMount(mountPoint: string, source: Device): Promise<void> {
  const m = await mountEntryAt(mountPoint);
  if (!m) throw new UserError(`${mountPoint} is not a mount point`, 'give the directory where the file system of the volume is mounted (see "findmnt")');
  if (source.isBlockDevice && m.major === source.info.rdevMajor && m.minor === source.info.rdevMinor) return;
  const want = await fingerprintOfVolume(source);
  if (!want) {
    throw new UserError(`${mountPoint} cannot be checked against ${source.path}: no file system livesnap can identify (ext2/3/4, XFS, btrfs) is on it`, 'leave out the freeze, or freeze the file system by hand around the arming');
  }
  const node = await deviceOfMount(m);
  const got = node ? await fingerprintOf(node) : undefined;
  if (got !== want) {
    throw new UserError(`${mountPoint} is not where ${source.path} is mounted (it holds ${m.source}, ${m.fsType})`, `freezing it would not make ${source.path} consistent; see "findmnt"`);
  }
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
    try { await syncFs(mountPoint); } catch { return performance.now() - t0; /* FIFREEZE will say what is wrong */ }
    if (performance.now() - t < 15) break;
  }
  return performance.now() - t0;
}

/** How long FITHAW may take before the backup reports it (the call goes on in the background). */
const THAW_TIMEOUT_MS = 30_000;

/** File systems this process holds frozen now. */
const frozenNow = new Set<string>();

/**
 * Thaws, synchronously and at once, everything this process froze: for a process that serves
 * nothing (the CLI), on exit or a signal. Never in the daemon: a synchronous FITHAW there would
 * wait for writes only its own event loop can serve. Returns the mount points thawed.
 */
export function thawAllNowSync(): string[] {
  const done = [...frozenNow];
  for (const m of done) {
    frozenNow.delete(m);
    try { thawFsNow(m); } catch { /* already thawed */ }
  }
  return done;
}

async function thaw(mountPoint: string): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new UserError(
      `FITHAW of ${mountPoint} did not return within ${THAW_TIMEOUT_MS / 1000} s (it goes on in the background)`,
      `check the file system's device; "fsfreeze -u ${mountPoint}" thaws it by hand`,
    )), THAW_TIMEOUT_MS);
  });
  try {
    await Promise.race([thawFs(mountPoint), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** A frozen file system: thaw() ends the window and says how long it lasted. */
export interface Frozen {
  readonly mountPoint: string;
  /** The write-back before the freeze (writers were not stopped then), in ms. */
  readonly presyncMs: number;
  /** Thaws (on the thread pool); resolves with the frozen window in ms. Idempotent. */
  thaw(): Promise<number>;
}

/**
 * Freezes the file system at `mountPoint` after a syncfs that writes back what is dirty while
 * writers still run. The window counts from the FIFREEZE call (it blocks new writers while it syncs)
 * to the end of FITHAW.
 */
export async function freezeFs(mountPoint: string): Promise<Frozen> {
  const presyncMs = await presync(mountPoint);
  const t0 = performance.now();
  try {
    await freezeIoctl(mountPoint);
  } catch (e) {
    throw new UserError(`cannot freeze ${mountPoint}: ${(e as Error).message}`, 'the file system must support FIFREEZE (ext4, xfs, btrfs) and not be frozen already');
  }
  frozenNow.add(mountPoint);
  let thawed: Promise<number> | undefined;
  return {
    mountPoint,
    presyncMs,
    thaw: () => {
      thawed ??= (async () => {
        frozenNow.delete(mountPoint);
        await thaw(mountPoint);
        return performance.now() - t0;
      })();
      return thawed;
    },
  };
}

/**
 * Runs `work` with the file system frozen; returns its result, how long it was frozen, and how long
 * the write-back before the freeze took. Thaws always, on the thread pool; an error of `work` wins
 * over one of the thaw.
 */
export async function withFrozen<T>(mountPoint: string, work: () => Promise<T>): Promise<{ result: T; frozenMs: number; presyncMs: number }> {
  const f = await freezeFs(mountPoint);
  let result: T;
  try {
    result = await work();
  } catch (e) {
    await f.thaw().catch(() => { /* the work's error is the one to report */ });
    throw e;
  }
  return { result, frozenMs: await f.thaw(), presyncMs: f.presyncMs };
}
