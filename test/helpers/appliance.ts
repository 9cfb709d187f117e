// Two hosts for the appliance tests: the appliance runs in a network namespace the test makes,
// linked to this one by a veth pair whose addresses (10.231.N.1 and .2/30) exist only inside that
// pair. It reads the LUN through a second loop device on the host's backing file (a second path
// to the same LUN, as a SAN gives each machine its own device name). Everything is removed at
// teardown, also when the test failed.
import type { ExecutionContext } from 'ava';
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN } from './cli';
import { cli, sleep } from './online';
import { run, runStatus } from './system';

export interface Netns {
  name: string;
  /** This side's address, the appliance side's address. */
  hostAddr: string;
  applianceAddr: string;
  /** The appliance side's end of the pair (inside the namespace). */
  inner: string;
  cut(): void;
}

let seq = 0;

export function twoHosts(t: ExecutionContext): Netns {
  const id = `${process.pid % 10000}${++seq}`;
  const name = `lsap${id}`;
  const outer = `lsa${id}`;
  const inner = `lsb${id}`;
  const net = 1 + ((process.pid * 7 + seq * 13) % 250);
  t.teardown(() => {
    runStatus('ip', ['netns', 'del', name]);
    runStatus('ip', ['link', 'del', outer]);
  });
  run('ip', ['netns', 'add', name]);
  run('ip', ['link', 'add', outer, 'type', 'veth', 'peer', 'name', inner]);
  run('ip', ['link', 'set', inner, 'netns', name]);
  run('ip', ['addr', 'add', `10.231.${net}.1/30`, 'dev', outer]);
  run('ip', ['link', 'set', outer, 'up']);
  run('ip', ['netns', 'exec', name, 'ip', 'addr', 'add', `10.231.${net}.2/30`, 'dev', inner]);
  run('ip', ['netns', 'exec', name, 'ip', 'link', 'set', inner, 'up']);
  run('ip', ['netns', 'exec', name, 'ip', 'link', 'set', 'lo', 'up']);
  return {
    name, hostAddr: `10.231.${net}.1`, applianceAddr: `10.231.${net}.2`, inner,
    cut: () => run('ip', ['netns', 'exec', name, 'ip', 'link', 'set', inner, 'down']),
  };
}

export interface RunningAppliance {
  proc: ChildProcess;
  address: string;
  store: string;
  log(): string;
  /** Resolves when it exited (after stop()). */
  stop(): Promise<void>;
}

/** A PSK file made by livesnap keygen. */
export async function keyFile(dir: string, name = 'k.psk', identity = 'livesnap'): Promise<string> {
  const f = path.join(dir, name);
  const r = await cli(['keygen', f, '--identity', identity]);
  if (r.status !== 0) throw new Error(`keygen: ${r.stderr}`);
  return f;
}

/** `livesnap appliance --foreground` inside `ns`, listening on its address; waits until it listens. */
export async function startAppliance(t: ExecutionContext, ns: Netns, o: { key: string; luns: Record<string, string>; store: string; args?: string[]; port?: number }): Promise<RunningAppliance> {
  const port = o.port ?? 10810;
  const address = `${ns.applianceAddr}:${port}`;
  const args = ['netns', 'exec', ns.name, process.execPath, BIN, 'appliance', '--listen', address, '--key', o.key, '--store', o.store,
    ...Object.entries(o.luns).flatMap(([n, p]) => ['--lun', `${n}=${p}`]), ...(o.args ?? []), '--foreground', '--json'];
  const proc = spawn('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<void>((r) => proc.once('close', () => r()));
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const k = setTimeout(() => proc.kill('SIGKILL'), 8000);
      await exited;
      clearTimeout(k);
    }
  };
  t.teardown(stop);
  const end = Date.now() + 15_000;
  while (!out.includes('"listening"')) {
    if (proc.exitCode !== null || Date.now() > end) throw new Error(`the appliance did not start: ${err}${out}`);
    await sleep(50);
  }
  return { proc, address, store: o.store, log: () => err, stop };
}

/** The appliance's archive of a done event, on this machine (the store is a directory both see). */
export function outputOf(done: Record<string, unknown>): string {
  const p = String(done.output);
  if (!fs.existsSync(p)) throw new Error(`the appliance's output ${p} does not exist`);
  return p;
}
