// A real S3 server for the tests: a throw-away single-host Ceph cluster (one monitor, manager and
// bluestore OSD on a sparse file) with a RADOS Gateway on 127.0.0.1, made by test/rgw/rgw-up in a
// scratch directory and stopped by test/rgw/rgw-down. It takes ~8 s to come up, so a test file
// starts one in test.before and stops it in test.after.always, and its tests share it:
//
//   const needs = { commands: [...rgwRequirements.commands, '/usr/bin/aws'] };
//   let rgw: Rgw | undefined;
//   test.before(async () => { if (!requirements(needs)) rgw = await startRgw(); });
//   test.after.always(async () => { await rgw?.stop(); });
//
// Every daemon's config, data, logs and admin socket stay in that directory, so nothing of the host
// (/etc/ceph, ~/.aws) is read or touched, and several files' clusters run side by side.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const scripts = path.resolve(__dirname, '../../../test/rgw');
export const RGW_UP = path.join(scripts, 'rgw-up');
export const RGW_DOWN = path.join(scripts, 'rgw-down');

/**
 * Debian's AWS CLI (package awscli, which scripts/setup --test installs), by its path: another `aws`
 * earlier in PATH (pip's, pyenv's) is not what the tests are set up with. It ignores AWS_ENDPOINT_URL
 * (2.9): pass --endpoint-url.
 */
export const AWS_CLI = '/usr/bin/aws';

/** What startRgw needs (for testIf/serialIf/requirements from ./skip). Add AWS_CLI to use the awscli. */
export const rgwRequirements: { root?: boolean; commands: string[] } = {
  commands: ['ceph-mon', 'ceph-mgr', 'ceph-osd', 'radosgw', 'radosgw-admin', 'monmaptool', 'ceph', 'curl', 'ss', 'uuidgen'],
};
/** What startRgw({ tls: true }) needs. */
export const rgwTlsRequirements: { root?: boolean; commands: string[] } = { commands: [...rgwRequirements.commands, 'openssl'] };

export interface RgwOptions {
  /** https with a fresh self-signed CA (Rgw.ca) and a certificate for IP 127.0.0.1. */
  tls?: boolean;
  /** The gateway's port; default: a free one. */
  port?: number;
  /** The OSD's sparse file, in bytes (default 8 GiB; only what is written takes disk space). */
  size?: number;
  /** Load the manager's always-on modules (HEALTH_OK without a mute; ~120 MB more). */
  mgrModules?: boolean;
  /** A directory to build the cluster in (kept by stop()); default: a fresh one, removed by stop(). */
  dir?: string;
  /** Progress lines of rgw-up (t.log, console.log). */
  log?: (line: string) => void;
}

export interface Rgw {
  /** The cluster's directory (ceph.conf, log/, the OSD's file). */
  dir: string;
  /** http(s)://127.0.0.1:PORT */
  endpoint: string;
  accessKey: string;
  secretKey: string;
  region: string;
  /** With tls: the CA certificate (PEM) the gateway's certificate is signed with. */
  ca?: string;
  /**
   * process.env without any AWS_* of the host, plus AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
   * AWS_REGION and AWS_DEFAULT_REGION (us-east-1), AWS_ENDPOINT_URL (honoured by awscli >= 1.29 /
   * 2.13 and the SDKs; Debian 12's awscli 2.9 needs --endpoint-url), AWS_CONFIG_FILE and
   * AWS_SHARED_CREDENTIALS_FILE (empty files in dir), AWS_EC2_METADATA_DISABLED; with tls also
   * AWS_CA_BUNDLE and NODE_EXTRA_CA_CERTS (the CA).
   */
  env: NodeJS.ProcessEnv;
  /** The daemons' pids (monitor, manager, OSD, gateway); the gateway's changes on startGateway(). */
  pids(): number[];
  /** How long rgw-up took, ms. */
  startupMs: number;
  /** The summed VmRSS of the daemons, bytes. */
  rss(): number;
  /** Stops radosgw only (kill: SIGKILL at once, as a server that vanishes mid-upload). */
  stopGateway(opts?: { kill?: boolean }): Promise<void>;
  /** Starts radosgw again (same port, same user); resolves when it answers. */
  startGateway(): Promise<void>;
  /** Stops every daemon and removes the directory (unless it was given). Idempotent. */
  stop(): Promise<void>;
}

function runScript(cmd: string, args: string[], log?: (line: string) => void): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '', partial = '';
    c.stdout.on('data', (d) => (stdout += d));
    c.stderr.on('data', (d) => {
      stderr += d;
      if (!log) return;
      partial += d;
      let nl;
      while ((nl = partial.indexOf('\n')) >= 0) {
        log(partial.slice(0, nl));
        partial = partial.slice(nl + 1);
      }
    });
    c.once('error', reject);
    c.once('close', (status) => resolve({ status, stdout, stderr }));
  });
}

/** The KEY=VALUE lines rgw-up prints last (values plain or in double quotes). */
export function parseRgwEnv(stdout: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of stdout.split('\n')) {
    const m = /^([A-Z][A-Z0-9_]*)=(.*)$/.exec(line.trim());
    if (!m) continue;
    const v = m[2];
    out[m[1]] = v.length >= 2 && v.startsWith('"') && v.endsWith('"') ? v.slice(1, -1) : v;
  }
  return out;
}

function vmRss(pid: number): number {
  try {
    const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0; // gone
  }
}

// Clusters not stopped when the process ends (a crash, a hook that threw) are killed on the way out.
const running = new Set<string>();
process.once('exit', () => {
  for (const dir of running) spawnSync(RGW_DOWN, [dir, '--kill'], { stdio: 'ignore' });
});

/** Brings up a cluster and its gateway (see the top of this file); rejects with rgw-up's message and log tails. */
export async function startRgw(opts: RgwOptions = {}): Promise<Rgw> {
  const own = !opts.dir;
  const base = process.env.LIVESNAP_TEST_DIR ?? os.tmpdir();
  fs.mkdirSync(base, { recursive: true });
  const dir = opts.dir ?? fs.mkdtempSync(path.join(base, 'livesnap-rgw-'));
  const args = [dir];
  if (opts.tls) args.push('--tls');
  if (opts.port !== undefined) args.push('--port', String(opts.port));
  if (opts.size !== undefined) args.push('--size', String(opts.size));
  if (opts.mgrModules) args.push('--mgr-modules');

  const t0 = performance.now();
  running.add(dir);
  const up = await runScript(RGW_UP, args, opts.log);
  const startupMs = performance.now() - t0;
  if (up.status !== 0) {
    // rgw-up has stopped what it started; its message ends with the tails of the logs.
    running.delete(dir);
    if (own) fs.rmSync(dir, { recursive: true, force: true });
    throw new Error(`rgw-up ${args.join(' ')} failed (exit ${up.status}):\n${up.stderr}`);
  }
  const vars = parseRgwEnv(up.stdout);
  for (const k of ['RGW_ENDPOINT', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'RGW_PIDS']) {
    if (!vars[k]) throw new Error(`rgw-up printed no ${k}:\n${up.stdout}`);
  }
  // DIR/pids is kept by the scripts: "NAME PID" for each daemon running now.
  const pids = (): number[] => {
    try {
      return fs.readFileSync(path.join(dir, 'pids'), 'utf8').split('\n').map((l) => Number(l.trim().split(/\s+/)[1])).filter((n) => Number.isInteger(n) && n > 0);
    } catch {
      return [];
    }
  };

  const region = 'us-east-1';
  const awsConfig = path.join(dir, 'aws-config');
  const awsCredentials = path.join(dir, 'aws-credentials');
  fs.writeFileSync(awsConfig, '');
  fs.writeFileSync(awsCredentials, '');
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('AWS_')) env[k] = v;
  Object.assign(env, {
    AWS_ACCESS_KEY_ID: vars.AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY: vars.AWS_SECRET_ACCESS_KEY,
    AWS_REGION: region,
    AWS_DEFAULT_REGION: region,
    AWS_ENDPOINT_URL: vars.RGW_ENDPOINT,
    AWS_CONFIG_FILE: awsConfig,
    AWS_SHARED_CREDENTIALS_FILE: awsCredentials,
    AWS_EC2_METADATA_DISABLED: 'true',
  });
  if (vars.RGW_CA) Object.assign(env, { AWS_CA_BUNDLE: vars.RGW_CA, NODE_EXTRA_CA_CERTS: vars.RGW_CA });

  let stopped = false;
  const down = async (extra: string[]) => {
    const r = await runScript(RGW_DOWN, [dir, ...extra]);
    if (r.status !== 0) throw new Error(`rgw-down ${dir} ${extra.join(' ')} failed (exit ${r.status}):\n${r.stderr}`);
  };
  return {
    dir,
    endpoint: vars.RGW_ENDPOINT,
    accessKey: vars.AWS_ACCESS_KEY_ID,
    secretKey: vars.AWS_SECRET_ACCESS_KEY,
    region,
    ca: vars.RGW_CA,
    env,
    pids,
    startupMs,
    rss: () => pids().reduce((sum, p) => sum + vmRss(p), 0),
    async stopGateway(o = {}) {
      await down(['--gateway', ...(o.kill ? ['--kill'] : [])]);
    },
    async startGateway() {
      const r = await runScript(RGW_UP, [dir, '--gateway'], opts.log);
      if (r.status !== 0) throw new Error(`rgw-up ${dir} --gateway failed (exit ${r.status}):\n${r.stderr}`);
    },
    async stop() {
      if (stopped) return;
      await down([]);
      stopped = true;
      running.delete(dir);
      if (own) fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
