// File-system controls through the addon: FIFREEZE / FITHAW, syncfs, FIEMAP. Each runs on the thread
// pool (the file system may be one this process serves), except thawSync, for a CLI's exit path.
import { native } from './native';

export const freezeFs = (mountPoint: string): Promise<void> => native().freeze(mountPoint);
export const thawFs = (mountPoint: string): Promise<void> => native().thaw(mountPoint);
/** For a process that serves nothing, on its way out: it cannot await. */
export const thawFsNow = (mountPoint: string): void => native().thawSync(mountPoint);
export const syncFs = (mountPoint: string): Promise<void> => native().syncfs(mountPoint);
/** [logical, physical, length, flags] quadruplets of a file's extents (FIEMAP_FLAG_SYNC unless sync is false). */
export const fileExtents = (file: string, sync = true): Promise<Float64Array> => native().fiemap(file, sync);
