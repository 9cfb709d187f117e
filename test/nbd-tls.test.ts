// NBD over TCP: TLS 1.3 with a pre-shared key (livesnap keygen, serve --tls-psk) against the real
// gnutls clients (nbdinfo, nbdcopy, qemu-img, qemu-io); clients without TLS or with a wrong key are
// refused with a logged reason while others keep being served; the --listen rules (issue 12 item 12).
import test, { type ExecutionContext } from 'ava';
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { heapBuffer, type NbdBackend } from '../src/nbd/backend';
import * as P from '../src/nbd/protocol';
import { createNbdServer } from '../src/nbd/server';
import { loadPskFile, parsePskFile } from '../src/nbd/tls-psk';
import { parseListen } from '../src/export/listen';
import { livesnap } from './helpers/cli';
import { goData, LIBNBD_DISC, option, RawClient } from './helpers/nbd-raw';
import { cli, lastJsonOf, serveDevice, sleep } from './helpers/online';
import { testIf } from './helpers/skip';
import { scratchDir, sparseFile } from './helpers/system';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
const PY = fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const tlsClients = testIf({ commands: ['nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-io'] }, { serial: true });

function keygen(t: ExecutionContext, file: string, extra: string[] = []): string {
  const r = livesnap(['keygen', file, ...extra]);
  t.is(r.status, 0, r.stderr);
  return r.stdout;
}

test('keygen writes one identity:hexkey line, mode 0600, refuses to overwrite without --force', (t) => {
  const dir = scratchDir(t, 'nbdtls-');
  const file = path.join(dir, 'keys.psk');
  const out = keygen(t, file);
  t.regex(out, /identity livesnap/);
  t.is(fs.statSync(file).mode & 0o777, 0o600);
  const text = fs.readFileSync(file, 'utf8');
  t.regex(text, /^livesnap:[0-9a-f]{64}\n$/);
  t.deepEqual(loadPskFile(file).identities, ['livesnap']);
  const again = livesnap(['keygen', file]);
  t.is(again.status, 1);
  t.regex(again.stderr, /already exists[\s\S]*--force/);
  t.is(fs.readFileSync(file, 'utf8'), text, 'the old key is untouched');
  const forced = livesnap(['keygen', file, '--force', '--identity', 'backup-host', '--json']);
  t.is(forced.status, 0, forced.stderr);
  t.like(lastJsonOf(forced.stdout), { identity: 'backup-host', replaced: true });
  t.regex(fs.readFileSync(file, 'utf8'), /^backup-host:[0-9a-f]{64}\n$/);
  t.is(fs.statSync(file).mode & 0o777, 0o600);
  t.is(fs.readdirSync(dir).length, 1, 'no temporary file left');
  const bad = livesnap(['keygen', path.join(dir, 'x.psk'), '--identity', 'a:b']);
  t.is(bad.status, 1);
  t.regex(bad.stderr, /not a usable PSK identity/);
  t.false(fs.existsSync(path.join(dir, 'x.psk')));
  t.regex(livesnap(['keygen', path.join(dir, 'nodir', 'k.psk')]).stderr, /no such directory/);
});

test('PSK files: what is refused, and why', (t) => {
  t.throws(() => parsePskFile('', 'f'), { message: /no keys/ });
  t.throws(() => parsePskFile('nokey\n', 'f'), { message: /line 1: expected identity:hexkey/ });
  t.throws(() => parsePskFile('a:zz\n', 'f'), { message: /line 1: the key of "a" is not 16 to 64 bytes of hex/ });
  t.throws(() => parsePskFile(`a:${'00'.repeat(16)}\na:${'11'.repeat(16)}\n`, 'f'), { message: /line 2: identity "a" appears twice/ });
  t.deepEqual(parsePskFile(`a:${'00'.repeat(16)}\r\n\nb:${'ab'.repeat(32)}\n`, 'f').identities, ['a', 'b']);
  const dir = scratchDir(t, 'nbdtls-');
  const f = path.join(dir, 'open.psk');
  fs.writeFileSync(f, `a:${'00'.repeat(16)}\n`, { mode: 0o644 });
  fs.chmodSync(f, 0o644);
  t.throws(() => loadPskFile(f), { message: /readable by every user/ });
});

test('--listen: ":PORT" is loopback, bracketed IPv6, and bad values named', (t) => {
  t.deepEqual(parseListen(':10809'), { host: '127.0.0.1', port: 10809 });
  t.deepEqual(parseListen('0.0.0.0:1'), { host: '0.0.0.0', port: 1 });
  t.deepEqual(parseListen('[::1]:0'), { host: '::1', port: 0 });
  t.deepEqual(parseListen('localhost:65535'), { host: 'localhost', port: 65535 });
  for (const bad of ['nonsense', '10809', '127.0.0.1:', '127.0.0.1:65536', '::1:10809', '[::1:10809', 'example.com:10809', '1.2.3.4.5:1', '127.0.0.1:-1', '[nothost]:1']) {
    t.throws(() => parseListen(bad), { message: /--listen/ }, bad);
  }
});

/** A TLS listener on the server object itself, for the raw protocol checks. */
async function tlsServer(t: ExecutionContext, keyFile: string) {
  const mem = Buffer.alloc(4 * MiB);
  const backend: NbdBackend = {
    size: mem.length, minBlockSize: 512, preferredBlockSize: 4096, maxBlockSize: MiB, readOnly: false,
    async read(o, l) { return heapBuffer(Buffer.from(mem.subarray(o, o + l))); },
    async write(o, d) { d.copy(mem, o); },
    async flush() {}, async trim() {}, async writeZeroes(o, l) { mem.fill(0, o, o + l); },
  };
  const logs: string[] = [];
  const server = createNbdServer({ exports: { disk: backend }, log: (l, m) => logs.push(`${l} ${m}`) });
  t.teardown(() => server.close());
  const port = await server.listenTcp('127.0.0.1', 0, { tls: loadPskFile(keyFile) });
  return { server, port, logs, mem };
}

test('FORCEDTLS on the wire: every option but STARTTLS and ABORT gets ERR_TLS_REQD, EXPORT_NAME is hung up on, STARTTLS with data is invalid', async (t) => {
  const dir = scratchDir(t, 'nbdtls-');
  const key = path.join(dir, 'keys.psk');
  keygen(t, key);
  const { port, logs } = await tlsServer(t, key);
  const c = await RawClient.connect({ host: '127.0.0.1', port });
  await c.read(18);
  c.write(Buffer.from([0, 0, 0, 3]));
  for (const opt of [P.NBD_OPT_LIST, P.NBD_OPT_STRUCTURED_REPLY, 999]) {
    c.write(option(opt));
    t.is((await c.optionReply()).type, P.NBD_REP_ERR_TLS_REQD, P.optionName(opt));
  }
  c.write(option(P.NBD_OPT_GO, goData('disk')));
  const go = await c.optionReply();
  t.is(go.type, P.NBD_REP_ERR_TLS_REQD);
  t.regex(go.data.toString(), /STARTTLS/);
  c.write(option(P.NBD_OPT_STARTTLS, Buffer.from('x')));
  t.is((await c.optionReply()).type, P.NBD_REP_ERR_INVALID);
  c.write(option(P.NBD_OPT_ABORT));
  t.is((await c.optionReply()).type, P.NBD_REP_ACK);
  t.true(await c.untilClosed());
  const e = await RawClient.connect({ host: '127.0.0.1', port });
  await e.read(18);
  e.write(Buffer.from([0, 0, 0, 3]));
  e.write(option(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  t.true(await e.untilClosed());
  t.is(e.buffered, 0, 'no export data before TLS');
  t.true(logs.some((l) => /NBD_OPT_GO before NBD_OPT_STARTTLS refused: TLS is required/.test(l)), logs.join('\n'));
  t.true(logs.some((l) => /refused: negotiation: NBD_OPT_EXPORT_NAME without NBD_OPT_STARTTLS/.test(l)));
});

tlsClients('serve --tls-psk: nbdinfo, nbdcopy, qemu-img and qemu-io over TLS; without TLS or with a wrong key refused with a reason; others still served', async (t) => {
  const dir = scratchDir(t, 'nbdtls-');
  const vol = sparseFile(path.join(dir, 'vol.img'), 32 * MiB);
  const keyDir = path.join(dir, 'keys');
  fs.mkdirSync(keyDir, { mode: 0o700 });
  const key = path.join(keyDir, 'keys.psk'); // QEMU's tls-creds-psk wants the name keys.psk
  keygen(t, key);
  const served = await serveDevice(t, dir, vol, 'data', ['--listen', '127.0.0.1:0', '--tls-psk', key]);
  const st = (await served.status()).exports[0] as unknown as { tcp: string; tls: string };
  t.is(st.tls, 'psk');
  const [, port] = /:(\d+)$/.exec(st.tcp)!;
  const uri = `nbds://livesnap@127.0.0.1:${port}/data?tls-psk-file=${key}`;
  // nbdinfo over TLS.
  const info = JSON.parse((await exec('nbdinfo', ['--json', uri])).stdout);
  t.is(info.exports[0]['export-size'], 32 * MiB);
  // nbdcopy writes through TLS; the bytes land in the volume.
  const src = path.join(dir, 'src.bin');
  const data = Buffer.alloc(4 * MiB);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32BE(i, i);
  fs.writeFileSync(src, Buffer.concat([data, Buffer.alloc(28 * MiB)]));
  await exec('nbdcopy', [src, uri]);
  t.true(fs.readFileSync(vol).subarray(0, 4 * MiB).equals(data), 'nbdcopy over TLS wrote every byte');
  // libnbd's nbd_shutdown over TLS with 64 writes in flight: every one completes.
  if (spawnSync(PY, ['-c', 'import nbd'], { stdio: 'ignore' }).status === 0) {
    for (let r = 0; r < 3; r++) {
      const res = JSON.parse((await exec(PY, ['-c', LIBNBD_DISC, uri, String(r)])).stdout) as { ok: number; failed: string[] };
      t.deepEqual(res, { ok: 64, failed: [] }, `TLS round ${r}`);
    }
    fs.writeFileSync(src, Buffer.concat([data, Buffer.alloc(28 * MiB)]));
    await exec('nbdcopy', [src, uri]);
  }
  // QEMU's client: qemu-io writes, qemu-img reads back.
  const qobj = `tls-creds-psk,id=tls0,endpoint=client,dir=${keyDir},username=livesnap`;
  const qopts = `driver=nbd,host=127.0.0.1,port=${port},export=data,tls-creds=tls0`;
  const qio = await exec('qemu-io', ['--object', qobj, '--image-opts', qopts, '-c', 'write -P 0x5c 8M 1M', '-c', 'read -P 0x5c 8M 1M']);
  t.notRegex(qio.stdout + qio.stderr, /failed|error/i);
  t.true(fs.readFileSync(vol).subarray(8 * MiB, 9 * MiB).equals(Buffer.alloc(MiB, 0x5c)));
  const out = path.join(dir, 'qemu-copy.img');
  await exec('qemu-img', ['convert', '--object', qobj, '--image-opts', qopts, '-O', 'raw', out]);
  t.true(fs.readFileSync(out).equals(fs.readFileSync(vol)), 'qemu-img convert over TLS: the same bytes');

  // Refused: a client without TLS, a wrong key, an unknown identity.
  const plain = await exec('nbdinfo', [`nbd://127.0.0.1:${port}/data`]).then(() => 'connected', (e: Error) => e.message);
  t.not(plain, 'connected');
  const wrongDir = path.join(dir, 'wrong');
  fs.mkdirSync(wrongDir, { mode: 0o700 });
  const wrong = path.join(wrongDir, 'keys.psk');
  keygen(t, wrong); // same identity, another key
  const bad = await exec('nbdinfo', [`nbds://livesnap@127.0.0.1:${port}/data?tls-psk-file=${wrong}`]).then(() => 'connected', (e: Error) => e.message);
  t.not(bad, 'connected');
  const other = path.join(wrongDir, 'other.psk');
  keygen(t, other, ['--identity', 'stranger']);
  const unknown = await exec('nbdinfo', [`nbds://stranger@127.0.0.1:${port}/data?tls-psk-file=${other}`]).then(() => 'connected', (e: Error) => e.message);
  t.not(unknown, 'connected');
  const qbad = await exec('qemu-img', ['info', '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${wrongDir},username=livesnap`, '--image-opts', qopts]).then(() => 'connected', (e: Error) => e.message);
  t.not(qbad, 'connected');
  await sleep(200);
  const log = fs.readFileSync(path.join(served.runDir, 'daemon.log'), 'utf8');
  t.log(log.split('\n').filter((l) => /refused|TLS/.test(l)).join('\n'));
  t.regex(log, /NBD_OPT_GO before NBD_OPT_STARTTLS refused: TLS is required/, 'the plaintext client is named in the log');
  t.true((log.match(/refused: TLS handshake failed: wrong key for PSK identity "livesnap"/g) ?? []).length >= 2, `wrong keys are named in the log:\n${log}`);
  t.regex(log, /refused: TLS handshake failed: unknown PSK identity "stranger"/);
  // Still serving, over TLS and on the unix socket.
  t.is(JSON.parse((await exec('nbdinfo', ['--json', uri])).stdout).exports[0]['export-size'], 32 * MiB);
  t.is(JSON.parse((await exec('nbdinfo', ['--json', served.uri])).stdout).exports[0]['export-size'], 32 * MiB);
});

testIf({ commands: ['nbdinfo'] }, { serial: true })('serve --listen: TCP without TLS refused unless --insecure-plaintext (loud), ":PORT" binds loopback, bad values open nothing', async (t) => {
  const dir = scratchDir(t, 'nbdtls-');
  const vol = sparseFile(path.join(dir, 'vol.img'), 8 * MiB);
  const control = path.join(dir, 'ctl', 'control.sock');
  const sock = path.join(dir, 'x.sock');
  // Refused before a daemon is started or anything opened.
  for (const [args, why] of [
    [['--listen', '127.0.0.1:0'], /without TLS: anyone who can reach the port[\s\S]*--tls-psk[\s\S]*--insecure-plaintext/],
    [['--listen', ':0'], /without TLS/],
    [['--listen', 'nonsense', '--insecure-plaintext'], /--listen nonsense: expected HOST:PORT/],
    [['--listen', '127.0.0.1:99999', '--insecure-plaintext'], /out of range/],
    [['--tls-psk', path.join(dir, 'none.psk')], /--tls-psk applies to TCP only/],
    [['--listen', ':0', '--tls-psk', path.join(dir, 'none.psk')], /--tls-psk .*none\.psk: no such file[\s\S]*keygen/],
    [['--listen', ':0', '--tls-psk', path.join(dir, 'none.psk'), '--insecure-plaintext'], /contradict/],
  ] as Array<[string[], RegExp]>) {
    const r = await cli(['serve', vol, '--name', 'v', '--socket', sock, '--control', control, '--state', path.join(dir, 'state'), ...args]);
    t.is(r.status, 1, args.join(' '));
    t.regex(r.stderr, why, args.join(' '));
    t.false(fs.existsSync(sock), `${args.join(' ')}: no export socket`);
    t.false(fs.existsSync(control), `${args.join(' ')}: no daemon started`);
  }
  // --insecure-plaintext with ":PORT": loopback only, and a loud warning on stderr and in the log.
  const served = await serveDevice(t, dir, vol, 'v', ['--listen', ':0', '--insecure-plaintext']);
  const st = (await served.status()).exports[0] as unknown as { tcp: string; tls: string };
  t.regex(st.tcp, /^127\.0\.0\.1:\d+$/);
  t.is(st.tls, 'none');
  t.regex(fs.readFileSync(path.join(served.runDir, 'daemon.log'), 'utf8'), /WARNING: NBD on tcp 127\.0\.0\.1:\d+ WITHOUT TLS/);
  const port = st.tcp.split(':')[1];
  t.is(JSON.parse((await exec('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/v`])).stdout).exports[0]['export-size'], 8 * MiB);
  // The daemon checks too: a control request that skipped the CLI's checks opens nothing.
  const { call } = await import('../src/control/client');
  const vol2 = sparseFile(path.join(dir, 'vol2.img'), 8 * MiB);
  const sock2 = path.join(dir, 'y.sock');
  for (const req of [{ listen: '127.0.0.1:0' }, { listen: 'nonsense', insecurePlaintext: true }]) {
    const e = await t.throwsAsync(call(served.control, { op: 'serve', device: vol2, name: 'w', socket: sock2, ...req }));
    t.regex(e!.message, /without TLS|expected HOST:PORT/);
    t.false(fs.existsSync(sock2));
  }
  t.deepEqual((await served.status()).exports.map((x) => x.name), ['v'], 'no half-made export');
});

test('the warning is printed by the CLI on stderr', async (t) => {
  const dir = scratchDir(t, 'nbdtls-');
  const vol = sparseFile(path.join(dir, 'vol.img'), 8 * MiB);
  const control = path.join(dir, 'run', 'control.sock');
  fs.mkdirSync(path.dirname(control), { mode: 0o700 });
  const r = await cli(['serve', vol, '--name', 'v', '--control', control, '--state', path.join(dir, 'state'), '--listen', ':0', '--insecure-plaintext']);
  t.teardown(async () => { await cli(['stop', '--control', control]); });
  t.is(r.status, 0, r.stderr);
  t.regex(r.stderr, /WARNING: NBD on tcp 127\.0\.0\.1:0 WITHOUT TLS \(--insecure-plaintext\): any user or host/);
  t.regex(r.stdout, /tcp\s+127\.0\.0\.1:\d+ \(NO TLS\)/);
});

test('hostile TLS clients: garbage after STARTTLS, data before the ACK, a wrong key; a good TLS client is served after them', async (t) => {
  const dir = scratchDir(t, 'nbdtls-');
  const key = path.join(dir, 'keys.psk');
  keygen(t, key);
  const { server, port, logs, mem } = await tlsServer(t, key);
  const startTls = async (extra?: Buffer): Promise<RawClient> => {
    const c = await RawClient.connect({ host: '127.0.0.1', port });
    await c.read(18);
    c.write(Buffer.from([0, 0, 0, 3]));
    c.write(extra ? Buffer.concat([option(P.NBD_OPT_STARTTLS), extra]) : option(P.NBD_OPT_STARTTLS));
    return c;
  };
  // Garbage where the ClientHello belongs.
  const g = await startTls();
  t.is((await g.optionReply()).type, P.NBD_REP_ACK);
  g.write(Buffer.alloc(300, 0x41));
  t.true(await g.untilClosed());
  // Bytes sent together with STARTTLS, before its ACK: not TLS, hung up on.
  const d = await startTls(Buffer.from('early bytes'));
  t.true(await d.untilClosed());
  // A TLS client with the wrong key (Node's own TLS client this time).
  const tlsClient = async (psk: Buffer, identity: string) => {
    const c = await startTls();
    t.is((await c.optionReply()).type, P.NBD_REP_ACK);
    c.s.removeAllListeners('data');
    const tlsMod = await import('node:tls');
    const s = tlsMod.connect({ socket: c.s, minVersion: 'TLSv1.3', ciphers: 'TLS_AES_128_GCM_SHA256', checkServerIdentity: () => undefined, pskCallback: () => ({ psk, identity }) });
    return new Promise<RawClient | Error>((resolve) => {
      s.once('secureConnect', () => resolve(new RawClient(s)));
      s.once('error', (e) => resolve(e));
    });
  };
  const wrong = await tlsClient(Buffer.alloc(32, 7), 'livesnap');
  t.true(wrong instanceof Error || await (wrong as RawClient).untilClosed(), 'the wrong key does not get in');
  const good = await tlsClient(loadPskFile(key).key('livesnap')!, 'livesnap');
  if (good instanceof Error) { t.fail(good.message); return; }
  // Inside TLS: STARTTLS again is invalid, then GO and a READ.
  good.write(option(P.NBD_OPT_STARTTLS));
  t.is((await good.optionReply()).type, P.NBD_REP_ERR_INVALID);
  mem.fill(0x77, 0, 4096);
  good.write(option(P.NBD_OPT_GO, goData('disk')));
  for (;;) { const r = await good.optionReply(); if (r.type === P.NBD_REP_ACK) break; t.false(!!(r.type & 0x80000000)); }
  const { encodeRequest } = await import('../src/nbd/transmission');
  good.write(encodeRequest(P.NBD_CMD_READ, 0, 5, 0, 4096));
  t.deepEqual(await good.simpleReply(), { error: 0, cookie: 5 });
  t.true((await good.read(4096)).equals(Buffer.alloc(4096, 0x77)));
  good.write(encodeRequest(P.NBD_CMD_DISC, 0, 6, 0, 0));
  t.true(await good.untilClosed());
  t.true(logs.some((l) => /refused: TLS handshake failed/.test(l)), logs.join('\n'));
  t.true(logs.some((l) => /refused: data after NBD_OPT_STARTTLS before the TLS handshake/.test(l)));
  t.true(logs.some((l) => /wrong key for PSK identity "livesnap"/.test(l)));
  await sleep(100);
  t.is(server.stats().connections, 0);
});
