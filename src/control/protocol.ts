// The daemon's control protocol: one JSON object per line over an owner-only unix socket.
// A client sends one request; the daemon answers with zero or more events and exactly one
// result or error, then closes. A backup's connection stays open for its events: when the client
// goes away (Ctrl-C) without --detach, the daemon cancels the job.
import * as path from 'node:path';
import { config } from '../config';
import * as t from 'typanion';
import { CACHE_MODES, type ExportSpec } from '../export/export-spec';
import { WRITER_PRIORITIES } from '../snapshot/writer-priority';
import { HOLD_MODES } from '../snapshot/hold-modes';
import { UserError } from '../util/errors';

// The requests, as typanion schemas: the types below are inferred from them, and the daemon checks
// every request against them on arrival (parseControlRequest), so a request the CLI could not have
// sent is refused naming the field.
const str = t.isString();
const optStr = t.isOptional(t.isString());
const optBool = t.isOptional(t.isBoolean());
const optNum = t.isOptional(t.isNumber());
const onError = t.isEnum(['abort', 'ignore'] as const);

// Field meanings: ExportSpec.
const isServeRequest = t.isObject({
  op: t.isLiteral('serve'),
  device: str,
  name: str,
  socket: optStr,
  listen: optStr,
  tlsPsk: optStr,
  insecurePlaintext: optBool,
  cache: t.isOptional(t.isEnum(CACHE_MODES)),
  state: optStr,
});
const isStopRequest = t.isObject({ op: t.isLiteral('stop'), name: optStr });
const isStatusRequest = t.isObject({ op: t.isLiteral('status') });
const isCancelRequest = t.isObject({ op: t.isLiteral('cancel'), job: str });
/** The second connection of a backup to '-': the daemon writes the archive stream into it. */
const isDataRequest = t.isObject({ op: t.isLiteral('data'), token: str });
const isBackupRequest = t.isObject({
  op: t.isLiteral('backup'),
  export: str,
  to: str,
  format: t.isOptional(t.isEnum(['raw', 'tar'] as const)),
  force: optBool,
  container: optStr,
  freeze: optStr,
  onError,
  highWater: optNum,
  recordSize: optNum,
  compress: t.isOptional(t.isLiteral('zstd')),
  tapeSize: optNum,
  nextVolumeCommand: optStr,
  detach: optBool,
  maxRate: optNum,
  writerPriority: t.isOptional(t.isEnum(WRITER_PRIORITIES)),
  /** --write-wait-limit in ms. */
  writeWaitLimitMs: optNum,
  /** --method hold (default: copy-before-write), --hold MODE, --hold-limit in bytes. */
  method: t.isOptional(t.isEnum(['cbw', 'hold'] as const)),
  hold: t.isOptional(t.isEnum(HOLD_MODES)),
  holdLimit: optNum,
  /** --hold-log PATH[:SIZE]. */
  holdLog: optStr,
  /** --to appliance://HOST:PORT: the PSK file (--key) and --appliance-timeout in ms. */
  key: optStr,
  applianceTimeoutMs: optNum,
  /** --incremental: only blocks changed since the export's last backup (and used and wanted). */
  incremental: optBool,
  /** The protection map: --exclude PATTERN..., --exclude-swap (default true), and --mount MOUNTPOINT to resolve them. */
  exclude: t.isOptional(t.isArray(t.isString())),
  excludeSwap: optBool,
  mount: optStr,
});
/** `livesnap snapshot`: arm a snapshot of an export and serve the instant read-only. */
const isSnapshotRequest = t.isObject({
  op: t.isLiteral('snapshot'),
  export: str,
  container: optStr,
  freeze: optStr,
  onError: t.isOptional(onError),
  detach: optBool,
  writeWaitLimitMs: optNum,
  /** --method hold: the export holds every write (--hold metadata: those to metadata) for as long as the view is served. */
  method: t.isOptional(t.isLiteral('hold')),
  hold: t.isOptional(t.isEnum(['all', 'metadata'] as const)),
  holdLimit: optNum,
  holdLog: optStr,
});

/** A serve request is an export's spec (export/export-spec.ts), field for field. */
export type ServeRequest = t.InferType<typeof isServeRequest> & ExportSpec;
export type StopRequest = t.InferType<typeof isStopRequest>;
export type StatusRequest = t.InferType<typeof isStatusRequest>;
export type CancelRequest = t.InferType<typeof isCancelRequest>;
export type DataRequest = t.InferType<typeof isDataRequest>;
export type BackupRequest = t.InferType<typeof isBackupRequest>;
export type SnapshotRequest = t.InferType<typeof isSnapshotRequest>;
export type ControlRequest = SnapshotRequest | ServeRequest | StopRequest | StatusRequest | CancelRequest | BackupRequest | DataRequest;

const SCHEMAS: Record<string, t.StrictValidator<unknown, ControlRequest>> = {
  serve: isServeRequest, stop: isStopRequest, status: isStatusRequest, cancel: isCancelRequest,
  data: isDataRequest, backup: isBackupRequest, snapshot: isSnapshotRequest,
};

/** One line of the control socket as a request, or a UserError saying what is wrong with it. */
export function parseControlRequest(line: string): ControlRequest {
  let v: unknown;
  try { v = JSON.parse(line); } catch { throw new UserError('malformed control request (not JSON)'); }
  const op = typeof v === 'object' && v !== null ? (v as { op?: unknown }).op : undefined;
  const schema = typeof op === 'string' ? SCHEMAS[op] : undefined;
  if (!schema) throw new UserError(`unknown control request${typeof op === 'string' ? ` "${op}"` : ' (no op)'}`, 'the CLI and the daemon must be the same livesnap version');
  const errors: string[] = [];
  if (!schema(v, { errors })) throw new UserError(`malformed "${op}" request: ${errors.join('; ')}`, 'the CLI and the daemon must be the same livesnap version');
  return v as ControlRequest;
}

export type ControlReply =
  | { type: 'event'; event: string; [k: string]: unknown }
  | { type: 'result'; [k: string]: unknown }
  | { type: 'error'; message: string; hint?: string; exitCode?: number };

export function defaultControlPath(): string {
  return config().control;
}

/** An export's NBD socket lives next to the control socket unless told otherwise. */
export function defaultExportSocket(controlPath: string, name: string): string {
  return path.join(path.dirname(controlPath), `${name}.sock`);
}


/** The control socket a command talks to: --control, else $LIVESNAP_CONTROL, else the default. */
export function resolveControlPath(option: string | undefined): string {
  return path.resolve(option ?? defaultControlPath());
}
