// The typed contract of the C++ addon (native/). Mechanism only: every decision is made by the caller.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { config } from '../config';

export interface OpenFlags {
  write?: boolean;
  /** O_DIRECT (default true). */
  direct?: boolean;
  /** O_EXCL on a block device: fails with EBUSY while it is mounted or otherwise claimed. */
  exclusive?: boolean;
  create?: boolean;
}

export interface NativeStat {
  size: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  blockDevice: boolean;
  regularFile: boolean;
  rdevMajor: number;
  rdevMinor: number;
}

/** A system error from the addon: same shape as Node's fs errors. */
export interface NativeError extends Error {
  code: string;
  errno: number;
  syscall: string;
  path?: string;
}

/**
 * The addon's IoRing (native/io_ring.cc): one io_uring owned by the JavaScript thread. Completions
 * land in `tags` / `results` and onComplete(count) is called from the event loop. Ops are 7-number
 * records [fd, kind (0 read, 1 write, 2 fdatasync; +4 urgent), buffer index, offset, length,
 * buffer offset, tag]; submit returns how many it accepted, or -(accepted + 1) at a malformed one.
 */
export interface NativeIoRing {
  readonly tags: Int32Array;
  readonly results: Int32Array;
  readonly inflight: number;
  readonly capacity: number;
  register(buffer: ArrayBuffer): number;
  unregister(index: number): void;
  submit(ops: Float64Array, first: number, count: number): number;
  close(): void;
}
export type NativeIoRingClass = new (depth: number, onComplete: (count: number) => void) => NativeIoRing;

export interface NativeAddon {
  /** Undefined where the addon was built without liburing. */
  IoRing?: NativeIoRingClass;
  open(path: string, flags?: OpenFlags): number;
  /** open on the thread pool: for paths whose lookup may wait on a file system this process serves. */
  openAsync(path: string, flags?: OpenFlags): Promise<number>;
  /** flock(2) without waiting: true if taken, false if another open file holds a conflicting lock. */
  lock(fd: number, mode: 'exclusive' | 'shared' | 'unlock'): boolean;
  close(fd: number): void;
  stat(fd: number): NativeStat;
  /** Zeroed memory aligned for O_DIRECT. Pool it: it is only freed when GC runs. */
  allocAligned(size: number, alignment?: number): ArrayBuffer;
  /**
   * Zeroes a buffer of allocAligned's that is an anonymous mapping (1 MiB and up) by giving its
   * pages back to the kernel (no longer resident until touched): true; false for any other buffer
   * (nothing done: zero it yourself).
   */
  zeroAligned(buffer: ArrayBuffer): boolean;
  /**
   * Runs a whole batch of positioned reads into `buffer`: `segments` holds [offset, length, bufOffset]
   * triplets. Resolves with one entry per segment: bytes read (short only at end of file) or -errno.
   */
  readBatch(fd: number, buffer: ArrayBuffer, segments: Float64Array): Promise<Int32Array>;
  writeBatch(fd: number, buffer: ArrayBuffer, segments: Float64Array): Promise<Int32Array>;
  fdatasync(fd: number): Promise<void>;
  /** BLKDISCARD on a device, punch hole on a file. */
  discard(fd: number, offset: number, length: number): Promise<void>;
  /** BLKZEROOUT on a device, FALLOC_FL_ZERO_RANGE (or punch hole) on a file. */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  ioEngine(): 'io_uring' | 'threadpool';
  /** Batches never use io_uring (set once, before the first batch). */
  useThreadpool?(on: boolean): void;
  freeze(mountPoint: string): Promise<void>;
  thaw(mountPoint: string): Promise<void>;
  /** syncfs(2) on the file system mounted there: its dirty data written back, writers not stopped. */
  syncfs(mountPoint: string): Promise<void>;
  /** SO_SNDBUF on a socket; returns the size the kernel granted. */
  setSendBuffer(fd: number, bytes: number): number;
  thawSync(mountPoint: string): void;
  /** [logical, physical, length, flags] quadruplets, FIEMAP_FLAG_SYNC unless sync is false (thread pool). */
  fiemap(path: string, sync?: boolean): Promise<Float64Array>;
  /**
   * The data ranges of a regular file within [offset, offset+length), by SEEK_DATA / SEEK_HOLE, as
   * [start, end) pairs, at most maxRanges of them; the rest of the range is holes.
   */
  dataRanges(fd: number, offset: number, length: number, maxRanges: number): Promise<Float64Array>;
  /** XXH3-128 of the bytes, canonical big-endian 16-byte form. */
  xxh128(bytes: Uint8Array | ArrayBuffer, seed?: number): Buffer;
}

let cached: NativeAddon | undefined;
let loader: (() => NativeAddon) | undefined;

/**
 * Loads the addon. In the single-binary release the bundle sets LIVESNAP_ADDON_PATH, or calls
 * setAddon / setAddonLoader (the addon travels in the SEA assets); from a checkout it is build/Release.
 */
export function native(): NativeAddon {
  if (cached) return cached;
  if (loader) {
    cached = configured(loader());
    loader = undefined;
    return cached;
  }
  const candidates = [
    config().addonPath,
    path.resolve(__dirname, '../../build/Release/livesnap_native.node'),
    path.resolve(__dirname, '../../../build/Release/livesnap_native.node'),
  ].filter((p): p is string => !!p);
  for (const p of candidates) {
    if (fs.existsSync(p)) {
      const m = { exports: {} as NativeAddon };
      process.dlopen(m, p);
      cached = configured(m.exports);
      return cached;
    }
  }
  throw new Error(`livesnap's native addon is not built (looked in ${candidates.join(', ')}); run "npm ci" or "npm run build:native"`);
}

export function setAddon(addon: NativeAddon): void {
  cached = configured(addon);
}

/** The addon takes no settings of its own from the environment: they are handed to it here. */
function configured(addon: NativeAddon): NativeAddon {
  addon.useThreadpool?.(config().ioEngine === 'threadpool');
  return addon;
}

/**
 * Loads the addon on the first native() call instead (so that "--help" never loads it). If the
 * loader throws, native() throws that error, and the next call tries the loader again.
 */
export function setAddonLoader(load: () => NativeAddon): void {
  cached = undefined;
  loader = load;
}

export function isNativeError(e: unknown): e is NativeError {
  return e instanceof Error && typeof (e as NativeError).code === 'string' && typeof (e as NativeError).syscall === 'string';
}
