import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Command, Option } from 'clipanion';
import { UserError } from '../../util/errors';
import { LivesnapCommand } from '../base';
import { stateRoot } from '../../config';
import { isS3Url, parseS3Url, s3Url } from '../../s3/location';
import { parseS3Options } from '../../s3/options';

export class ApplianceCommand extends LivesnapCommand {
  static override paths = [['appliance']];
  static override usage = Command.Usage({
    description: 'Run the backup appliance: read shared LUNs, reconcile the originals hosts send, write archives',
    details: `
      The appliance half of \`livesnap backup <export> --to appliance://HOST:PORT\`. The host copies
      nothing: at the instant it tells the appliance, then sends the original of each block a writer
      is about to change (once per block) and lets the write go on when the appliance has it. The
      appliance reads the same LUN itself over the SAN, substitutes the originals it holds (its
      Original Data Cache, ODC) and writes the instant:
      - by default an archive in --store, "<export>-<UTC instant>.tar" (".partial" until complete;
        GNU tar and bsdtar extract it to the exact image; "livesnap restore" and "verify" read it);
        --store s3://BUCKET/PREFIX uploads it as it is made (an S3 multipart upload, credentials
        and endpoint as for the AWS CLI or --s3-endpoint; an output the host does not confirm is
        deleted);
      - with --run CMD, an unmodified backup program reads the instant from a read-only NBD export
        (CMD's {uri}), e.g. --run 'nbdcopy {uri} /tape/vol.img'; its exit ends the snapshot and its
        status goes back to the host's job.

      --lun NAME=PATH maps each host export name to this machine's path to the same LUN (device
      names differ between machines); the appliance checks size and a fingerprint of the volume and
      refuses another volume. The link is TLS 1.3 with the pre-shared key of --key (livesnap keygen;
      the same file on host and appliance); there is no plaintext mode. When the ODC is full the
      appliance delays its acknowledgements: only host writers of not-yet-saved blocks wait.
      With --run the originals stay in the ODC until CMD exits (a program may read a block twice):
      size --odc for the writes expected meanwhile.

      --replica NAME=PATH keeps a replica for hosts that back up with --to replica://HOST:PORT/NAME
      --key FILE: the image file or device PATH here always holds exactly one snapshot of the host's
      export; each backup arrives over the same TLS-PSK link, is staged in PATH's journal and applied
      only once complete (old or new state after any crash; "livesnap replica status|recover PATH").

      Without --foreground it starts in the background (log: appliance.log in --store, or in the
      state directory, /var/lib/livesnap, with an s3:// store) and returns
      once it listens; stop it with SIGTERM (its pid is in "livesnap status --control PATH").
    `,
    examples: [
      ['Serve two LUNs, archives in /backup', '$0 appliance --listen 0.0.0.0:10810 --key /etc/livesnap/appliance.psk --lun data=/dev/mapper/mpatha --lun logs=/dev/sdc --store /backup --control /run/livesnap/appliance.sock'],
      ['Hand the instant to an unmodified program', "$0 appliance --listen 10.0.0.2:10810 --key k.psk --lun data=/dev/sdb --store /var/tmp --run 'nbdcopy {uri} /tape/data.img' --foreground"],
      ['On the host', '$0 backup data --to appliance://10.0.0.2:10810 --key k.psk'],
      ['Keep a replica of a host\'s export "data"', '$0 appliance --listen 10.0.0.2:10810 --key k.psk --replica data=/backup/data.replica --store /backup'],
      ['... and on the host', '$0 backup data --to replica://10.0.0.2:10810/data --key k.psk'],
    ],
  });

  listen = Option.String('--listen', { required: true, description: 'HOST:PORT to listen on for hosts (TLS-PSK)' });
  key = Option.String('--key', { required: true, description: 'PSK file (livesnap keygen), the same as the hosts\'' });
  lun = Option.Array('--lun', [], { description: 'NAME=PATH: the host export NAME is the LUN at PATH here (repeat per LUN)' });
  replica = Option.Array('--replica', [], { description: 'NAME=PATH: keep the replica NAME (hosts back up with --to replica://THIS:PORT/NAME) in the image file or device PATH here (repeat per replica)' });
  store = Option.String('--store', { required: true, description: 'Directory for the archives (and the --run socket), or s3://BUCKET/PREFIX' });
  s3Endpoint = Option.String('--s3-endpoint', { description: 'With --store s3://: the S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS itself)' });
  s3PartSize = Option.String('--s3-part-size', { description: 'With --store s3://: the smallest upload part (default 16M)' });
  s3Parallel = Option.String('--s3-parallel', { description: 'With --store s3://: parts uploaded at once per backup (default 4)' });
  odc = Option.String('--odc', 'memory:256M', { description: 'Original Data Cache: memory:SIZE (default 256M), file:PATH:SIZE, or memory:SIZE+file:PATH:SIZE (memory first, then spilling into the file)' });
  runCmd = Option.String('--run', { description: 'Command reading the instant from {uri} (a read-only NBD URI) instead of an archive' });
  maxRate = Option.String('--max-rate', { description: 'Read each LUN at most this fast (e.g. 200M), to leave the SAN to production I/O' });
  control = Option.String('--control', { description: 'Owner-only status socket (livesnap status --control PATH)' });
  foreground = Option.Boolean('--foreground', false, { description: 'Run in this process, log on stderr, until SIGINT/SIGTERM' });

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { parseApplianceAddress } = require('../../appliance/link') as typeof import('../../appliance/link');
    const { parseOdc } = require('../../appliance/odc') as typeof import('../../appliance/odc');
    const { loadPskFile } = require('../../nbd/tls-psk') as typeof import('../../nbd/tls-psk');
    const { ApplianceDaemon } = require('../../control/appliance-daemon') as typeof import('../../control/appliance-daemon');
    const { parseSize } = require('../../util/size') as typeof import('../../util/size');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const listen = parseApplianceAddress(this.listen, '--listen');
    let keys;
    try { keys = loadPskFile(path.resolve(this.key)); } catch (e) { throw new UserError(`--key: ${(e as Error).message}`, 'make one with "livesnap keygen FILE" and copy it to every host'); }
    const luns = new Map<string, string>();
    for (const l of this.lun) {
      const m = /^([A-Za-z0-9._-]{1,255})=(.+)$/.exec(l);
      if (!m) throw new UserError(`--lun ${l}: expected NAME=PATH`, 'NAME is the export name on the host (letters, digits, . _ -), PATH this machine\'s path to the same LUN');
      if (luns.has(m[1]!)) throw new UserError(`--lun ${m[1]} is given twice`);
      luns.set(m[1]!, path.resolve(m[2]!));
    }
    const replicas = new Map<string, string>();
    for (const l of this.replica) {
      const m = /^([A-Za-z0-9][A-Za-z0-9._-]{0,254})=(.+)$/.exec(l);
      if (!m) throw new UserError(`--replica ${l}: expected NAME=PATH`, 'NAME is what hosts name in replica://HOST:PORT/NAME, PATH this machine\'s image file or device for it');
      if (replicas.has(m[1]!)) throw new UserError(`--replica ${m[1]} is given twice`);
      replicas.set(m[1]!, path.resolve(m[2]!));
    }
    if (!luns.size && !replicas.size) throw new UserError('an appliance needs at least one --lun NAME=PATH or --replica NAME=PATH', 'e.g. --lun data=/dev/mapper/mpatha, or --replica data=/backup/data.replica');
    const odc = parseOdc(this.odc);
    const toS3 = isS3Url(this.store);
    const store = toS3 ? s3Url(parseS3Url(this.store, { prefix: true })) : path.resolve(this.store);
    if (toS3 && this.runCmd !== undefined) throw new UserError('--run does not go with an s3:// store: the program writes the output itself', 'give --store a local directory (it holds the NBD socket)');
    if (!toS3 && (this.s3Endpoint ?? this.s3PartSize ?? this.s3Parallel) !== undefined) throw new UserError('--s3-endpoint, --s3-part-size and --s3-parallel go with --store s3://BUCKET/PREFIX');
    const s3 = toS3 ? parseS3Options({ endpoint: this.s3Endpoint, partSize: this.s3PartSize, parallel: this.s3Parallel }) : undefined;
    const control = this.control ? path.resolve(this.control) : undefined;
    if (this.runCmd !== undefined && !this.runCmd.includes('{uri}')) throw new UserError(`--run ${this.runCmd}: the command never reads {uri}`, "put {uri} where the program takes its NBD source, e.g. --run 'nbdcopy {uri} /tape/vol.img'");
    if (!this.foreground) return this.background(store, control);
    const maxRate = this.maxRate !== undefined ? parseSize(this.maxRate, '--max-rate') : undefined;
    const d = new ApplianceDaemon({ listen, keys, luns, replicas, store, s3, odc, run: this.runCmd, control, maxRate });
    await d.start();
    if (this.json) process.stdout.write(JSON.stringify({ event: 'listening', ...d.status() }) + '\n');
    else process.stdout.write(`appliance listening on ${listen.host}:${listen.port}\n`);
    await new Promise<void>((resolve) => {
      const stop = () => resolve();
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
    });
    await d.stop();
    setTimeout(() => process.exit(0), 1000).unref();
    return 0;
  }

  /** Re-runs this command with --foreground, detached, and returns once it listens (or says why not). */
  private async background(store: string, control: string | undefined): Promise<number> {
    const logDir = isS3Url(store) ? stateRoot() : store;
    fs.mkdirSync(logDir, { recursive: true });
    const logFile = path.join(logDir, 'appliance.log');
    const log = fs.openSync(logFile, 'a', 0o600);
    const args = process.argv.slice(process.argv.indexOf('appliance'));
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on use (startup time)
    const { selfCommand } = require('../../control/spawn') as typeof import('../../control/spawn');
    const child = spawn(process.execPath, [...selfCommand(), ...args, '--foreground'], { detached: true, stdio: ['ignore', 'pipe', log] });
    fs.closeSync(log);
    const line = await new Promise<string | undefined>((resolve) => {
      let out = '';
      child.stdout!.on('data', (d: Buffer) => { out += d.toString(); if (out.includes('\n')) resolve(out.split('\n')[0]); });
      child.once('exit', () => resolve(undefined));
      setTimeout(() => resolve(undefined), 15_000);
    });
    if (!line) {
      const tail = fs.readFileSync(logFile, 'utf8').trim().split('\n').slice(-3).join('\n');
      throw new UserError(`the appliance did not start${tail ? `:\n${tail}` : ''}`, `see ${logFile}`);
    }
    child.stdout!.destroy();
    child.unref();
    if (this.json) process.stdout.write(JSON.stringify({ event: 'done', pid: child.pid, log: logFile, control }) + '\n');
    else process.stdout.write(`${line} (pid ${child.pid}, log ${logFile}${control ? `, status: livesnap status --control ${control}` : ''})\n`);
    return 0;
  }
}
