// Every LIVESNAP_* setting of the environment is read here, once, checked, and handed to whoever
// needs it from here; nothing else reads process.env for livesnap's own knobs. (LIVESNAP_VOLUME and
// LIVESNAP_ARCHIVE are set for the commands livesnap runs between tape volumes, not read.)
import * as path from 'node:path';
import { UserError } from './util/errors';
import { checkEndpoint } from './s3/endpoint';

export interface Config {
  /** LIVESNAP_CONTROL: the daemon's control socket when --control is not given. */
  readonly control: string;
  /** LIVESNAP_STATE_DIR: where exports keep their state directories unless serve --state says otherwise. */
  readonly stateRoot: string;
  /** LIVESNAP_DEBUG: print the stack of an unexpected error. */
  readonly debug: boolean;
  /** LIVESNAP_ADDON_PATH: the compiled addon to load (the single binary sets it). */
  readonly addonPath: string | undefined;
  /** LIVESNAP_IO_ENGINE=threadpool: no io_uring (libuv's pool and plain pread/pwrite). */
  readonly ioEngine: 'auto' | 'threadpool';
  /**
   * LIVESNAP_CLIENT_IO_PRIORITY=realtime: clients' own reads and writes in the real-time I/O class
   * (off by default: under mq-deadline it starves the backup's reads).
   */
  readonly clientIoPriority: 'normal' | 'realtime';
  /** LIVESNAP_BUSY_BATCH / LIVESNAP_BUSY_DEPTH: a fixed copier pace while clients write (measuring points between the presets). */
  readonly busyBatchBytes: number | undefined;
  readonly busyDepth: number | undefined;
  /** LIVESNAP_AUTO_TRACE=FILE: one line per decision of --writer-priority auto appended to FILE. */
  readonly autoTrace: string | undefined;
  /** LIVESNAP_NBD_READ_BUFFER=0 / LIVESNAP_NBD_SEND_BUFFER=0: the plain socket paths, to compare. */
  readonly nbdReadBuffer: boolean;
  readonly nbdSendBuffer: boolean;
  /** LIVESNAP_CHANGE_TRACKING=off: serve without the change map (bench/incremental measures its cost; every backup is then full). */
  readonly changeTracking: boolean;
  /**
   * LIVESNAP_CHANGE_INTENT_IDLE_MS: a 4 MiB intent of the change map is cleared after this long with
   * no write to its region (default 30000; shorter makes the incremental after a crash smaller, and
   * makes writers to a region idle that long wait for one more flush of the map).
   */
  readonly changeIntentIdleMs: number;
  /**
   * LIVESNAP_TEST_KILL_AT=replica:N — test fault injection only: the replica code SIGKILLs its own
   * process when it reaches its N-th I/O step (a real kill -9 at a chosen point of the apply).
   */
  readonly testKillAt: { readonly scope: 'replica'; readonly step: number } | undefined;
  /**
   * AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL: the S3 endpoint when --s3-endpoint is not given
   * (the AWS CLI's names; credentials and region the SDK reads itself, as the CLI does).
   */
  readonly s3Endpoint: string | undefined;
  /** AWS_CA_BUNDLE: a PEM file of CAs trusted for the S3 endpoint besides the system's. */
  readonly awsCaBundle: string | undefined;
}

function endpointUrl(env: NodeJS.ProcessEnv): string | undefined {
  for (const name of ['AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL']) {
    const v = env[name];
    if (v === undefined || v === '') continue;
    return checkEndpoint(v, name);
  }
  return undefined;
}

function positiveInt(env: NodeJS.ProcessEnv, name: string, min: number): number | undefined {
  const v = env[name];
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min) throw new UserError(`${name}=${v}: expected a whole number of at least ${min}`, `unset ${name} or give a valid value`);
  return n;
}

function killAt(env: NodeJS.ProcessEnv): Config['testKillAt'] {
  const v = env.LIVESNAP_TEST_KILL_AT;
  if (v === undefined || v === '') return undefined;
  const m = /^replica:([1-9][0-9]{0,14})$/.exec(v);
  if (!m) throw new UserError(`LIVESNAP_TEST_KILL_AT=${v}: expected replica:N (N a whole number from 1)`, 'it is for tests only: unset it');
  return { scope: 'replica', step: Number(m[1]) };
}

function oneOf<T extends string>(env: NodeJS.ProcessEnv, name: string, values: readonly T[], dflt: T): T {
  const v = env[name];
  if (v === undefined || v === '') return dflt;
  if (!(values as readonly string[]).includes(v)) throw new UserError(`${name}=${v}: expected one of ${values.join(', ')}`, `unset ${name} or give one of those`);
  return v as T;
}

/** How long a change-map intent outlives the last write to its region. */
export const DEFAULT_CHANGE_INTENT_IDLE_MS = 30_000;

export function readConfig(env: NodeJS.ProcessEnv = process.env): Config {
  return {
    control: path.resolve(env.LIVESNAP_CONTROL || '/run/livesnap/control.sock'),
    stateRoot: path.resolve(env.LIVESNAP_STATE_DIR || '/var/lib/livesnap'),
    debug: !!env.LIVESNAP_DEBUG,
    addonPath: env.LIVESNAP_ADDON_PATH || undefined,
    ioEngine: oneOf(env, 'LIVESNAP_IO_ENGINE', ['auto', 'io_uring', 'threadpool'] as const, 'auto') === 'threadpool' ? 'threadpool' : 'auto',
    clientIoPriority: oneOf(env, 'LIVESNAP_CLIENT_IO_PRIORITY', ['normal', 'realtime'] as const, 'normal'),
    busyBatchBytes: positiveInt(env, 'LIVESNAP_BUSY_BATCH', 512),
    busyDepth: positiveInt(env, 'LIVESNAP_BUSY_DEPTH', 1),
    autoTrace: env.LIVESNAP_AUTO_TRACE || undefined,
    nbdReadBuffer: env.LIVESNAP_NBD_READ_BUFFER !== '0',
    nbdSendBuffer: env.LIVESNAP_NBD_SEND_BUFFER !== '0',
    changeTracking: oneOf(env, 'LIVESNAP_CHANGE_TRACKING', ['on', 'off'] as const, 'on') === 'on',
    changeIntentIdleMs: positiveInt(env, 'LIVESNAP_CHANGE_INTENT_IDLE_MS', 0) ?? DEFAULT_CHANGE_INTENT_IDLE_MS,
    testKillAt: killAt(env),
    s3Endpoint: endpointUrl(env),
    awsCaBundle: env.AWS_CA_BUNDLE || undefined,
  };
}

let cached: Config | undefined;

/** The process's configuration, read from the environment on first use. */
export function config(): Config {
  cached ??= readConfig();
  return cached;
}

/** Where exports keep their state directories unless `serve --state` says otherwise. */
export function stateRoot(): string {
  return config().stateRoot;
}
