// The daemon's control protocol: one JSON object per line over an owner-only unix socket.
// A client sends one request; the daemon answers with zero or more events and exactly one
// result or error, then closes. A backup's connection stays open for its events: when the client
// goes away (Ctrl-C) without --detach, the daemon cancels the job.
import * as path from 'node:path';
import type { WriterPriority } from '../snapshot/writer-priority';

/**
 * How the export writes the backing device. 'none': O_DIRECT, an acknowledged write is on the device
 * (in its volatile cache until FLUSH). 'writeback': through the kernel's page cache, as nbdkit's
 * file plugin and QEMU's default do; acknowledged writes survive a crash of livesnap (the kernel
 * holds them) and FLUSH makes them durable; the backup still reads the device with O_DIRECT.
 */
export type CacheMode = 'none' | 'writeback';
export const CACHE_MODES: readonly CacheMode[] = ['none', 'writeback'];
export interface ServeRequest {
  op: 'serve';
  device: string;
  name: string;
  socket?: string;
  /** TCP HOST:PORT (see listen.ts). */
  listen?: string;
  /** Absolute path of a PSK file (livesnap keygen): TCP clients must start TLS with one of its keys. */
  tlsPsk?: string;
  /** TCP without TLS, asked for explicitly. */
  insecurePlaintext?: boolean;
  cache?: CacheMode;
  /** The export's state directory (absolute); default <state root>/<name>. */
  state?: string;
}
export interface StopRequest { op: 'stop'; name?: string }
export interface StatusRequest { op: 'status' }
export interface CancelRequest { op: 'cancel'; job: string }
/** The second connection of a backup to '-': the daemon writes the archive stream into it. */
export interface DataRequest { op: 'data'; token: string }
export interface BackupRequest {
  op: 'backup';
  export: string;
  to: string;
  format?: 'raw' | 'tar';
  force?: boolean;
  container?: string;
  freeze?: string;
  onError: 'abort' | 'ignore';
  highWater?: number;
  recordSize?: number;
  compress?: 'zstd';
  tapeSize?: number;
  nextVolumeCommand?: string;
  detach?: boolean;
  maxRate?: number;
  writerPriority?: WriterPriority;
  /** --write-wait-limit in ms. */
  writeWaitLimitMs?: number;
}
/** `livesnap snapshot`: arm a snapshot of an export and serve the instant read-only. */
export interface SnapshotRequest {
  op: 'snapshot';
  export: string;
  container?: string;
  freeze?: string;
  onError?: 'abort' | 'ignore';
  detach?: boolean;
  writeWaitLimitMs?: number;
}
export type ControlRequest = SnapshotRequest | ServeRequest | StopRequest | StatusRequest | CancelRequest | BackupRequest | DataRequest;

export type ControlReply =
  | { type: 'event'; event: string; [k: string]: unknown }
  | { type: 'result'; [k: string]: unknown }
  | { type: 'error'; message: string; hint?: string; exitCode?: number };

export function defaultControlPath(): string {
  return process.env.LIVESNAP_CONTROL || '/run/livesnap/control.sock';
}

/** An export's NBD socket lives next to the control socket unless told otherwise. */
export function defaultExportSocket(controlPath: string, name: string): string {
  return path.join(path.dirname(controlPath), `${name}.sock`);
}

export const EXPORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** The control socket a command talks to: --control, else $LIVESNAP_CONTROL, else the default. */
export function resolveControlPath(option: string | undefined): string {
  return path.resolve(option ?? defaultControlPath());
}
