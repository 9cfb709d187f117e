import { Command, Option } from 'clipanion';
import * as path from 'node:path';
import { resolveControlPath, type ServeRequest } from '../../control/protocol';
import type { CacheMode } from '../../export/export-spec';
import { stateRoot } from '../../config';
import { UserError } from '../../util/errors';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';

export const controlOption = () => Option.String('--control', { description: 'Daemon control socket (default $LIVESNAP_CONTROL or /run/livesnap/control.sock)' });

export class ServeCommand extends LivesnapCommand {
  static override paths = [['serve']];
  static override usage = Command.Usage({
    description: 'Serve a volume over NBD so it can be backed up online',
    details: `
      Exports the device over the NBD protocol (newstyle, fixed handshake) on a unix socket
      (default: /run/livesnap/<name>.sock, owner-only), or also on TCP with --listen HOST:PORT
      (":PORT" is loopback, 127.0.0.1). Everything that writes the volume must go through this
      export: attach it with nbd-client (production) or nbdfuse + "losetup --direct-io=on" and mount
      the file system from there. Then "livesnap backup <name>" takes a point-in-time backup while
      writers go on.

      TCP needs TLS: --tls-psk FILE (a key made by "livesnap keygen FILE") makes every TCP client
      start TLS 1.3 with that pre-shared key before anything else (as nbdkit --tls=require).
      Clients: nbdinfo/nbdcopy/nbdfuse with "nbds://ID@HOST:PORT/NAME?tls-psk-file=FILE",
      qemu with "--object tls-creds-psk,id=tls0,endpoint=client,dir=DIR,username=ID" (the file
      named keys.psk in DIR). Without TLS, TCP is refused unless you say --insecure-plaintext:
      on any address, loopback included, whoever can connect can write the volume.

      With --cache none (the default) the export writes with O_DIRECT: an acknowledged write is
      on the device. With --cache writeback it writes through the kernel's page cache, as nbdkit's
      file plugin and QEMU do by default: about 2x the small-write rate, an acknowledged write still
      survives livesnap being killed, and NBD FLUSH (sent by every file system at a commit) makes it
      durable; the cost is memory for dirty pages. Backups read with O_DIRECT in both modes.

      The export runs in the livesnap daemon (started on first use, in the background; its log is
      daemon.log next to the control socket). One daemon serves several devices. --foreground runs
      the daemon in this process instead (for systemd units and containers).
    `,
    examples: [
      ['Serve a disk as "data"', '$0 serve /dev/sdb --name data'],
      ['Attach it here and mount it', 'nbdfuse /mnt/nbd/data --unix /run/livesnap/data.sock & losetup --direct-io=on -f --show /mnt/nbd/data  # then mount /dev/loopN'],
      ['Attach it with the kernel client', 'nbd-client -unix /run/livesnap/data.sock -N data /dev/nbd0'],
      ['Also on TCP, with TLS', '$0 keygen /etc/livesnap/keys.psk && $0 serve /dev/sdb --name data --listen 0.0.0.0:10809 --tls-psk /etc/livesnap/keys.psk'],
      ['Read it from another machine', 'nbdinfo "nbds://livesnap@SERVER:10809/data?tls-psk-file=/etc/livesnap/keys.psk"'],
      ['Through the page cache (faster small writes)', '$0 serve /dev/sdb --name data --cache writeback'],
    ],
  });

  device = Option.String({ name: 'device' });
  name = Option.String('--name', { description: 'Export name (default: the device file name)' });
  socket = Option.String('--socket', { description: 'Unix socket path for the export' });
  listen = Option.String('--listen', { description: 'Also listen on TCP HOST:PORT (:PORT = 127.0.0.1); needs --tls-psk or --insecure-plaintext' });
  state = Option.String('--state', { description: 'State directory of the export (default /var/lib/livesnap/<name>, or $LIVESNAP_STATE_DIR/<name>)' });
  tlsPsk = Option.String('--tls-psk', { description: 'PSK file (livesnap keygen): TCP clients must use TLS with this key' });
  insecurePlaintext = Option.Boolean('--insecure-plaintext', false, { description: 'Allow TCP without TLS (anyone who reaches the port can write the volume)' });
  cache = Option.String('--cache', { description: 'none (O_DIRECT, default) or writeback (page cache, flushed on NBD FLUSH)' });
  control = controlOption();
  foreground = Option.Boolean('--foreground', false, { description: 'Run the daemon in this process (logs on stderr) until stopped' });

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { call, isDaemonRunning } = require('../../control/client') as typeof import('../../control/client');
    const { Daemon } = require('../../control/daemon') as typeof import('../../control/daemon');
    const { loadKeys } = require('../../export/served-export') as typeof import('../../export/served-export');
    const { checkTcpSecurity, parseListen, plaintextWarning } = require('../../export/listen') as typeof import('../../export/listen');
    const { startDaemon } = require('../../control/spawn') as typeof import('../../control/spawn');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const control = resolveControlPath(this.control);
    if (this.cache !== undefined && this.cache !== 'none' && this.cache !== 'writeback') {
      throw new UserError(`--cache ${this.cache}: not a cache mode`, 'use --cache none (O_DIRECT, the default) or --cache writeback');
    }
    // TCP options are checked (and the key file read) before a daemon is started or anything opened.
    const tlsPsk = this.tlsPsk !== undefined ? path.resolve(this.tlsPsk) : undefined;
    const listen = this.listen !== undefined ? parseListen(this.listen) : undefined;
    const security = checkTcpSecurity({ listen: this.listen, tlsPsk, insecurePlaintext: this.insecurePlaintext });
    if (tlsPsk) loadKeys(tlsPsk);
    if (security === 'plaintext' && listen) process.stderr.write(`livesnap: ${plaintextWarning(listen)}\n`);
    const req: ServeRequest = {
      cache: this.cache as CacheMode | undefined,
      op: 'serve',
      device: path.resolve(this.device),
      name: this.name ?? path.basename(this.device).replace(/[^A-Za-z0-9._-]/g, '_'),
      state: path.resolve(this.state ?? path.join(stateRoot(), this.name ?? path.basename(this.device).replace(/[^A-Za-z0-9._-]/g, '_'))),
      socket: this.socket ? path.resolve(this.socket) : undefined,
      listen: this.listen,
      tlsPsk,
      insecurePlaintext: this.insecurePlaintext || undefined,
    };
    if (this.foreground) {
      const d = new Daemon(control);
      await d.listen();
      const res = await d.serve(req).catch(async (e) => { await d.shutdown(); throw e; });
      this.print(res);
      return runUntilStopped(d);
    }
    if (!(await isDaemonRunning(control))) {
      const log = await startDaemon(control);
      this.reporter.info(`started the livesnap daemon (control ${control}, log ${log})`);
    }
    this.print(await call(control, req));
    return 0;
  }

  private print(res: Record<string, unknown>): void {
    for (const l of (res.leftovers as Array<{ job: string; pid: number; started: string; to: string; cleaned: string[] }> | undefined) ?? []) {
      this.reporter.info(`found what a livesnap daemon that died left of backup ${l.job} (pid ${l.pid}, started ${l.started}, to ${l.to}): ${l.cleaned.join('; ') || 'nothing'}`);
    }
    if (this.json) process.stdout.write(JSON.stringify({ event: 'done', ...res }) + '\n');
    else {
      const tcp = res.tcp ? `  tcp         ${res.tcp} (${res.tls === 'psk' ? `TLS-PSK, identity ${res.tlsIdentity}` : 'NO TLS'})\n  tcp uri     ${res.tcpUri}\n` : '';
      process.stdout.write(`serving ${res.device} as "${res.name}" (${formatBytes(res.size as number)})\n  unix socket ${res.socket}\n  uri         ${res.uri}\n  cache       ${res.cache}\n  state       ${res.state}\n${tcp}`);
    }
  }
}

export class DaemonCommand extends LivesnapCommand {
  static override paths = [['daemon']];
  static override usage = Command.Usage({ category: 'Internal', description: 'Run the daemon with no exports (started by "serve")' });
  control = controlOption();

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { Daemon } = require('../../control/daemon') as typeof import('../../control/daemon');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const d = new Daemon(resolveControlPath(this.control));
    await d.listen();
    return runUntilStopped(d);
  }
}

export class StopCommand extends LivesnapCommand {
  static override paths = [['stop']];
  static override usage = Command.Usage({
    description: 'Stop serving one export, or stop the daemon',
    details: 'In-flight requests finish and are flushed first. A running backup of that export is cancelled.',
    examples: [['Stop one export', '$0 stop data'], ['Stop the daemon and all its exports', '$0 stop']],
  });
  name = Option.String({ name: 'name', required: false });
  control = controlOption();

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { call } = require('../../control/client') as typeof import('../../control/client');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const res = await call(resolveControlPath(this.control), { op: 'stop', name: this.name });
    if (this.json) process.stdout.write(JSON.stringify({ event: 'done', ...res }) + '\n');
    else process.stdout.write(this.name ? `stopped serving "${this.name}"\n` : `daemon stopping (exports: ${(res.stopped as string[]).join(', ') || 'none'})\n`);
    return 0;
  }
}

/** Serves until `livesnap stop`, SIGINT or SIGTERM; then the process ends. */
async function runUntilStopped(d: import('../../control/daemon').Daemon): Promise<number> {
  const stop = () => void d.shutdown();
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  await d.stopped;
  // Every export is closed and flushed by now. A handle someone forgot (a timer, a socket) must not
  // keep a stopped daemon alive: leave in a moment even then (unref: a clean exit does not wait).
  setTimeout(() => process.exit(0), 1000).unref();
  return 0;
}
