import { Command, Option } from 'clipanion';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { UserError } from '../../util/errors';
import { LivesnapCommand } from '../base';

export class KeygenCommand extends LivesnapCommand {
  static override paths = [['keygen']];
  static override usage = Command.Usage({
    description: 'Make a pre-shared key for NBD over TLS (serve --tls-psk)',
    details: `
      Writes a new random 256-bit key to FILE (mode 0600) in the PSK format of nbdkit, QEMU and
      gnutls: one line "identity:hexkey". Serve with "--listen HOST:PORT --tls-psk FILE"; give the
      same file to the clients (copy it over a secure channel): nbdinfo, nbdcopy and nbdfuse take
      "nbds://IDENTITY@HOST:PORT/NAME?tls-psk-file=FILE"; qemu takes
      "--object tls-creds-psk,id=tls0,endpoint=client,dir=DIR,username=IDENTITY" with the file
      named keys.psk in DIR. An existing FILE is kept unless --force.
    `,
    examples: [
      ['Make a key', '$0 keygen /etc/livesnap/keys.psk'],
      ['With another identity', '$0 keygen /etc/livesnap/keys.psk --identity backup-host'],
    ],
  });

  file = Option.String({ name: 'file' });
  identity = Option.String('--identity', 'livesnap', { description: 'PSK identity (the user name in the client\'s nbds:// URI; default livesnap)' });
  force = Option.Boolean('--force', false, { description: 'Replace an existing file' });

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { isValidIdentity, newPskLine } = require('../../nbd/tls-psk') as typeof import('../../nbd/tls-psk');
    /* eslint-enable @typescript-eslint/no-require-imports */
    if (!isValidIdentity(this.identity)) throw new UserError(`--identity ${JSON.stringify(this.identity)}: not a usable PSK identity`, 'use 1 to 128 printable characters without ":" or spaces');
    const file = path.resolve(this.file);
    const dir = path.dirname(file);
    if (!fs.existsSync(dir)) throw new UserError(`${dir}: no such directory`, `create it first (mkdir -m 0700 ${dir})`);
    let exists = false;
    try {
      const st = fs.lstatSync(file);
      exists = true;
      if (!st.isFile()) throw new UserError(`${file} exists and is not a regular file`, 'choose another path');
    } catch (e) {
      if (e instanceof UserError) throw e;
    }
    if (exists && !this.force) throw new UserError(`${file} already exists`, 'keep it (clients hold that key), or replace it with --force');
    const line = newPskLine(this.identity);
    // Written under a temporary name with mode 0600 from the start, then renamed: never readable by others, never half-written.
    const tmp = path.join(dir, `.${path.basename(file)}.${process.pid}.tmp`);
    let fd: number;
    try {
      fd = fs.openSync(tmp, 'wx', 0o600);
    } catch (e) {
      throw new UserError(`cannot write ${tmp}: ${(e as Error).message}`, 'choose a directory you can write');
    }
    try {
      fs.fchmodSync(fd, 0o600);
      fs.writeSync(fd, line);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    try {
      if (exists && !this.force) throw new UserError(`${file} already exists`);
      if (exists) fs.renameSync(tmp, file);
      else fs.linkSync(tmp, file); // fails if someone created the file meanwhile
    } finally {
      try { fs.unlinkSync(tmp); } catch { /* renamed */ }
    }
    if (this.json) process.stdout.write(JSON.stringify({ event: 'done', file, identity: this.identity, replaced: exists }) + '\n');
    else process.stdout.write(`wrote a new pre-shared key to ${file} (mode 0600)\n  identity ${this.identity}\n  serve:   livesnap serve DEVICE --name NAME --listen HOST:PORT --tls-psk ${file}\n  client:  nbdinfo "nbds://${this.identity}@HOST:PORT/NAME?tls-psk-file=${file}"\n`);
    return 0;
  }
}
