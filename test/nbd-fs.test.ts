// The full stack the design relies on: ext4 on a loop device (direct I/O) on nbdfuse on livesnap's
// NBD unix socket on a backing file. Then e2fsck of the backing file itself.
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { Device } from '../src/device/device';
import { DeviceBackend } from '../src/nbd/device-backend';
import { createNbdServer } from '../src/nbd/server';
import { testIf } from './helpers/skip';
import { rng, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const exec = promisify(execFile);
const MiB = 1024 * 1024;

testIf({ root: true, commands: ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck'] })(
  'ext4 on loop (direct I/O) on nbdfuse on the NBD server: files survive umount and e2fsck -fn is clean',
  async (t) => {
    const seed = seedFromEnv(t);
    const r = rng(seed);
    const dir = scratchDir(t, 'nbdfs-');
    const file = sparseFile(path.join(dir, 'disk.img'), 128 * MiB);
    const logs: string[] = [];
    const server = createNbdServer({ log: (l, m) => logs.push(`${l} ${m}`) });
    const dev = Device.open(file, { write: true });
    // Teardowns run in reverse order of registration: umount, losetup -d, fusermount3 -u, server.close.
    t.teardown(async () => { await server.close(); dev.close(); });
    server.addExport('vol', new DeviceBackend(dev));
    const sock = path.join(dir, 'nbd.sock');
    await server.listenUnix(sock);

    const fuseDir = path.join(dir, 'fuse');
    fs.mkdirSync(fuseDir);
    const fuse = spawn('nbdfuse', [path.join(fuseDir, 'nbd'), `nbd+unix:///vol?socket=${sock}`], { stdio: ['ignore', 'ignore', 'pipe'] });
    let fuseErr = '';
    fuse.stderr!.on('data', (d) => { fuseErr += d; });
    const fuseExit = new Promise<void>((res) => fuse.once('exit', () => res()));
    t.teardown(async () => {
      await exec('fusermount3', ['-u', fuseDir]).catch(() => exec('fusermount3', ['-uz', fuseDir]).catch(() => {}));
      if (fuse.exitCode === null) { setTimeout(() => fuse.kill(), 2000).unref(); await fuseExit; }
    });
    // Nothing in this process may touch the stacked file system synchronously (or through the libuv
    // thread pool the server's I/O also uses): the server answering that I/O runs in this very
    // process. Every file operation below is a child process.
    const fuseFile = path.join(fuseDir, 'nbd');
    const sh = async (script: string) => (await exec('sh', ['-c', script], { maxBuffer: 16 * MiB })).stdout;
    for (let i = 0; i < 100; i++) {
      const size = await sh(`stat -c %s ${fuseFile} 2>/dev/null || true`);
      if (size.trim() === String(128 * MiB)) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    t.is((await sh(`stat -c %s ${fuseFile}`)).trim(), String(128 * MiB), fuseErr);

    const loop = (await exec('losetup', ['-f', '--show', '--direct-io=on', fuseFile])).stdout.trim();
    t.teardown(async () => { await exec('losetup', ['-d', loop]).catch(() => {}); });
    await exec('mkfs.ext4', ['-q', '-F', '-b', '4096', loop]);
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
    await exec('mount', [loop, mnt]);
    let mounted = true;
    t.teardown(async () => { if (mounted) await exec('umount', [mnt]).catch(() => exec('umount', ['-l', mnt]).catch(() => {})); });

    const writes: string[] = [];
    for (let i = 0; i < 24; i++) {
      const size = Math.floor(r() * 2 * MiB) + (i % 3 === 0 ? 0 : 1);
      writes.push(`head -c ${size} /dev/urandom > ${mnt}/f${i}.bin`);
    }
    await sh(writes.join(' && ') + ` && cp ${mnt}/f1.bin ${mnt}/f2.bin && rm ${mnt}/f3.bin && sync -f ${mnt}`);
    const before = await sh(`cd ${mnt} && sha256sum *.bin`);
    t.is(before.trim().split('\n').length, 23);
    await exec('umount', [mnt]);
    mounted = false;
    // Remount and verify through the whole stack.
    await exec('mount', [loop, mnt]);
    mounted = true;
    t.is(await sh(`cd ${mnt} && sha256sum *.bin`), before);
    await exec('umount', [mnt]);
    mounted = false;
    await exec('losetup', ['-d', loop]);
    await exec('fusermount3', ['-u', fuseDir]);
    await fuseExit;
    const fsck = await exec('e2fsck', ['-fn', file]).then((x) => ({ code: 0, out: x.stdout + x.stderr }), (e) => ({ code: e.code as number, out: String(e.stdout) + String(e.stderr) }));
    t.is(fsck.code, 0, fsck.out);
    const st = server.stats();
    t.true(st.exports.vol!.writes > 0 && st.exports.vol!.flushes > 0);
    t.is(st.errors, 0, logs.filter((l) => /warn|error/.test(l)).join('\n'));
  },
);
