#!/usr/bin/env node
// Serves one file or device over NBD with livesnap's server (for bench/nbd-datapath).
// usage: node bench/nbd-serve.js FILE SOCKET [NAME] [none|writeback] [--tcp PORT] [--tls-psk FILE]
// (the cache mode, as `livesnap serve --cache`: O_DIRECT, or through the page cache; --tcp also
// listens on 127.0.0.1:PORT, with --tls-psk requiring TLS there, as `serve --listen --tls-psk`)
'use strict';
const path = require('node:path');
const dist = path.resolve(__dirname, '../dist/src');
const { Device } = require(path.join(dist, 'device/device.js'));
const { DeviceBackend } = require(path.join(dist, 'nbd/device-backend.js'));
const { createNbdServer } = require(path.join(dist, 'nbd/server.js'));
const { loadPskFile } = require(path.join(dist, 'nbd/tls-psk.js'));

async function main() {
  const args = process.argv.slice(2);
  const flag = (f) => { const i = args.indexOf(f); if (i < 0) return undefined; const v = args[i + 1]; args.splice(i, 2); return v; };
  const tcpPort = flag('--tcp');
  const tlsPsk = flag('--tls-psk');
  const [file, socket, name = 'disk', cache = 'none'] = args;
  if (!file || !socket) { console.error('usage: nbd-serve.js FILE SOCKET [NAME]'); process.exit(2); }
  const dev = Device.open(file, { write: true, direct: cache !== 'writeback' });
  const server = createNbdServer({ log: (lvl, msg) => { if (lvl !== 'debug' && process.env.NBD_SERVE_VERBOSE) console.error(msg); } });
  const backend = new DeviceBackend(dev);
  server.addExport(name, backend);
  await server.listenUnix(socket);
  if (tcpPort !== undefined) await server.listenTcp('127.0.0.1', Number(tcpPort), { tls: tlsPsk ? loadPskFile(tlsPsk) : undefined });
  const stop = async () => {
    await server.close();
    if (process.env.NBD_SERVE_VERBOSE) console.error(JSON.stringify({ server: server.stats(), backend: backend.stats() }));
    dev.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  console.log('ready');
}
main().catch((e) => { console.error(e.message); process.exit(1); });
