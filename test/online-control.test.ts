// Online backup jobs as a user drives them: cancel, Ctrl-C, --detach, and the errors (no such
// export, no daemon, serving a mounted device, a target that runs out of space). After every
// failure or cancel the export keeps serving, and writes to it go through at once.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import { cli, QemuIo, type Served, serialIf as testIf, serveDevice, sleep, startBackup, waitUntil } from './helpers/online';
import { BIN } from './helpers/cli';
import { loopDevice, mount, run, scratchDir, sparseFile } from './helpers/system';

const MiB = 1 << 20;

/** One 64 KiB write through a fresh NBD connection; returns how long it took (ms). */
async function writeThrough(t: ExecutionContext, served: Served, dir: string, offset = 0): Promise<number> {
  const src = path.join(dir, 'probe.bin');
  fs.writeFileSync(src, Buffer.alloc(64 * 1024, 'after '));
  const q = new QemuIo(t, served.uri);
  const t0 = performance.now();
  await q.write(src, offset, 64 * 1024);
  const ms = performance.now() - t0;
  t.is(await q.quit(), 0);
  return ms;
}

async function jobState(served: Served, id: string): Promise<string | undefined> {
  return (await served.status()).jobs.find((j) => j.id === id)?.state;
}

// A 4 GiB sparse raw volume: no file system, so every block is copied; --max-rate 1G makes each
// backup last at least 4 s, so cancel, Ctrl-C and --detach always find it running.
testIf({ root: true, commands: ['qemu-io'] })('cancel, Ctrl-C and --detach: cancelled jobs exit 130 and leave no partial image; the export keeps serving', async (t) => {
  const dir = scratchDir(t, 'online-cancel-');
  const vol = sparseFile(path.join(dir, 'vol.raw'), 4096 * MiB);
  const served = await serveDevice(t, dir, vol, 'big');

  // 1. livesnap cancel
  const img1 = path.join(dir, 'one.img');
  const b1 = startBackup(t, [served.name, '--to', img1, '--control', served.control, '--max-rate', '1G']);
  const armed1 = await b1.armed;
  const job1 = String(armed1.event.job);
  const c = await cli(['cancel', served.name, '--control', served.control]);
  t.is(c.status, 0, c.stderr);
  t.regex(c.stdout, new RegExp(`cancelled ${job1}`));
  const r1 = await b1.exit;
  t.is(r1.status, 130, r1.stderr);
  t.regex(r1.stderr, /cancelled/);
  t.false(r1.lines.some((l) => l.event === 'done' && l.bytes !== undefined), 'no done summary');
  t.false(fs.existsSync(img1), 'no image');
  t.false(fs.existsSync(`${img1}.partial`), 'the partial image was removed');
  t.is(await jobState(served, job1), 'cancelled');
  const ms1 = await writeThrough(t, served, dir);
  t.true(ms1 < 2000, `a write after the cancel took ${ms1.toFixed(0)} ms`);

  // 2. Ctrl-C (SIGINT) of the CLI without --detach cancels the job in the daemon.
  const img2 = path.join(dir, 'two.img');
  const b2 = startBackup(t, [served.name, '--to', img2, '--control', served.control, '--max-rate', '1G']);
  const job2 = String((await b2.armed).event.job);
  b2.proc.kill('SIGINT');
  const r2 = await b2.exit;
  await waitUntil(async () => (await jobState(served, job2)) !== 'running', 10_000, 'the job to end after Ctrl-C');
  t.is(await jobState(served, job2), 'cancelled');
  t.not(r2.status, 0, 'Ctrl-C is not a success');
  t.log(`Ctrl-C: CLI exit ${r2.status ?? r2.signal}, said: ${r2.stderr.trim().split('\n')[0]}`);
  // An interrupted command exits 130 (128 + SIGINT), as "livesnap cancel" makes it do.
  // BUG (reported to the lead, src/cli/online-backup.ts runOnlineBackupViaDaemon): the SIGINT handler
  // destroys the control socket, the `for await` over it then throws ERR_STREAM_PREMATURE_CLOSE, and
  // the CLI exits 1 with "livesnap: error: Premature close" instead of 130 "the backup was cancelled".
  // The job itself is cancelled correctly (asserted above). This assertion fails until that is fixed.
  t.is(r2.status, 130, `exit code after Ctrl-C (stderr: ${r2.stderr.trim()})`);
  t.false(fs.existsSync(img2) || fs.existsSync(`${img2}.partial`), 'the partial image was removed');
  const ms2 = await writeThrough(t, served, dir, 4096 * 100);
  t.true(ms2 < 2000, `a write after Ctrl-C took ${ms2.toFixed(0)} ms`);

  // 3. --detach: the CLI returns once armed; the job finishes in the daemon.
  const img3 = path.join(dir, 'three.img');
  const t0 = performance.now();
  const d = await cli(['backup', served.name, '--to', img3, '--detach', '--json', '--control', served.control, '--max-rate', '1G']);
  const cliMs = performance.now() - t0;
  t.is(d.status, 0, d.stderr);
  const last = JSON.parse(d.stdout.trim().split('\n').pop()!) as Record<string, unknown>;
  t.is(last.detached, true);
  const job3 = String(last.job);
  const cliReturned = Date.now();
  await waitUntil(async () => (await jobState(served, job3)) !== 'running', 60_000, 'the detached job to finish');
  const st = (await served.status()).jobs.find((j) => j.id === job3)!;
  t.is(st.state, 'done', st.error ?? '');
  // The job went on after the CLI had returned (the daemon stamps when it ended).
  t.true(Date.parse(String((st as unknown as { finished: string }).finished)) > cliReturned, 'the job ended after the CLI returned');
  t.is(st.bytesDone, 4096 * MiB);
  t.is(fs.statSync(img3).size, 4096 * MiB);
  t.log(`detached CLI returned in ${cliMs.toFixed(0)} ms; the job copied ${st.bytesDone} bytes`);
});

testIf({ root: true, commands: ['qemu-io', 'mkfs.ext4'] })('errors: unknown export, no daemon, serving a mounted device, a full target (the export keeps serving)', async (t) => {
  const dir = scratchDir(t, 'online-errors-');
  // Random data: the image cannot be sparse, so it does not fit on the small target below.
  const vol = path.join(dir, 'vol.raw');
  run('dd', ['if=/dev/urandom', `of=${vol}`, 'bs=1M', 'count=64', 'status=none']);
  const served = await serveDevice(t, dir, vol, 'data');

  const nx = await cli(['backup', 'nosuch', '--to', path.join(dir, 'x.img'), '--control', served.control]);
  t.is(nx.status, 1);
  t.regex(nx.stderr, /no export named "nosuch"/);
  t.false(fs.existsSync(path.join(dir, 'x.img')));

  const noDaemon = path.join(dir, 'nodaemon', 'control.sock');
  const nd = await cli(['backup', 'data', '--to', path.join(dir, 'y.img'), '--control', noDaemon]);
  t.is(nd.status, 1);
  t.regex(nd.stderr, /no livesnap daemon is running/);
  t.false(fs.existsSync(noDaemon), 'backup does not start a daemon');
  const ns = await cli(['status', '--control', noDaemon]);
  t.is(ns.status, 1);
  t.regex(ns.stderr, /no livesnap daemon is running/);
  const ne = await cli(['backup', 'data', '--to', path.join(dir, 'y.img')], { LIVESNAP_CONTROL: noDaemon });
  t.regex(ne.stderr, /no livesnap daemon is running/, '$LIVESNAP_CONTROL is honoured');

  // A mounted device cannot be served: something else writes it behind the export's back.
  const other = loopDevice(t, sparseFile(path.join(dir, 'other.raw'), 64 * MiB));
  run('mkfs.ext4', ['-q', '-F', other]);
  mount(t, other, path.join(dir, 'other-mnt'));
  const sm = await cli(['serve', other, '--name', 'mounted', '--control', served.control]);
  t.not(sm.status, 0);
  t.regex(sm.stderr, /in use|mounted/);
  t.false((await served.status()).exports.some((e) => e.name === 'mounted'));
  // A cache mode that does not exist: refused by the CLI, nothing served.
  const bc = await cli(['serve', other, '--name', 'badcache', '--cache', 'unsafe', '--control', served.control]);
  t.is(bc.status, 1);
  t.regex(bc.stderr, /--cache unsafe: not a cache mode[\s\S]*--cache writeback/);
  t.false((await served.status()).exports.some((e) => e.name === 'badcache'));
  // A writer priority that does not exist, and one given for an offline backup: refused, with the choices.
  const bp = await cli(['backup', 'data', '--to', path.join(dir, 'bp.img'), '--writer-priority', 'fast', '--control', served.control]);
  t.is(bp.status, 1);
  // On stderr (clipanion's own choice is stdout; main.ts routes its error reports to stderr).
  t.regex(bp.stderr, /--writer-priority: expected one of "auto", "high", "normal", or "low" \(got "fast"\)/);
  t.is(bp.stdout, '');
  t.false(fs.existsSync(path.join(dir, 'bp.img')));
  const bo = await cli(['backup', other, '--to', path.join(dir, 'bo.img'), '--writer-priority', 'high']);
  t.is(bo.status, 1);
  t.regex(bo.stderr, /--writer-priority is for online backups of a served export/);

  // A target with no space: the job fails cleanly, the partial image is gone, the export serves on.
  const small = loopDevice(t, sparseFile(path.join(dir, 'small.raw'), 16 * MiB));
  run('mkfs.ext4', ['-q', '-F', small]);
  const smallMnt = mount(t, small, path.join(dir, 'small-mnt'));
  const target = path.join(smallMnt, 'backup.img');
  const full = startBackup(t, ['data', '--to', target, '--control', served.control]);
  const fr = await full.exit;
  t.is(fr.status, 1, fr.stderr);
  t.regex(fr.stderr, /no space left/);
  t.deepEqual(fs.readdirSync(smallMnt).filter((f) => f.startsWith('backup')), [], 'no image or partial image left on the full target');
  const job = (await served.status()).jobs.find((j) => j.export === 'data')!;
  t.is(job.state, 'failed');
  t.regex(job.error ?? '', /no space left/);
  const ms = await writeThrough(t, served, dir);
  t.true(ms < 2000, `a write after the failure took ${ms.toFixed(0)} ms`);
  // A second backup of the same export is accepted (the failed one let go of it).
  const again = await cli(['backup', 'data', '--to', path.join(dir, 'again.img'), '--control', served.control]);
  t.is(again.status, 0, again.stderr);
  await sleep(0);
});

// A stopped daemon must let go of its devices even when some handle would keep Node's event loop
// alive. The forgotten handle is a stand-in (an interval preloaded into the daemon with --require):
// a real leak cannot be produced on purpose.
testIf({})('livesnap stop ends the daemon process even with a forgotten timer in it', async (t) => {
  const dir = scratchDir(t, 'daemon-exit-');
  const control = path.join(dir, 'control.sock');
  const leak = path.join(dir, 'leak.js');
  fs.writeFileSync(leak, 'setInterval(() => {}, 1000);\n');
  const d = spawn(process.execPath, ['--require', leak, BIN, 'daemon', '--control', control], { stdio: 'ignore' });
  t.teardown(() => { if (d.exitCode === null && d.signalCode === null) d.kill('SIGKILL'); });
  const exited = new Promise<number | null>((r) => d.once('exit', (code) => r(code)));
  await waitUntil(() => fs.existsSync(control), 10_000, 'the control socket');
  const s = await cli(['stop', '--control', control]);
  t.is(s.status, 0, s.stderr);
  const code = await Promise.race([exited, sleep(8000).then(() => 'still running')]);
  t.is(code, 0, 'the daemon exited by itself, with status 0');
});
