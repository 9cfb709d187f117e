#!/usr/bin/env node
// The appliance link's TLS-PSK throughput (bench/appliance calls it): a host sends MIB MiB of
// `orig` frames of 64 blocks (256 KiB) to an appliance end in another process over loopback, which
// acknowledges each; prints {"mbps":..., "hostCpuSPerGiB":..., "applianceCpuSPerGiB":...}.
//   node bench/appliance-link.js [MIB]     (build first: npx tsc -p .)
'use strict';
const { fork } = require('node:child_process');
const path = require('node:path');
const D = path.join(__dirname, '..', 'dist', 'src');
const { connectAppliance, listenForHosts } = require(path.join(D, 'appliance', 'link'));
const { parsePskFile } = require(path.join(D, 'nbd', 'tls-psk'));
const keys = parsePskFile(`bench:${'ab'.repeat(32)}\n`, 'bench key');
const PAYLOAD = 64 * 4096;

if (process.argv[2] === '--appliance') {
  const cpu0 = process.cpuUsage();
  listenForHosts({ host: '127.0.0.1', port: 0 }, keys, (link) => {
    link.onMessage((m) => {
      if (m.t === 'orig') link.send({ t: 'ack', id: m.id });
      if (m.t === 'cancel') { const c = process.cpuUsage(cpu0); process.send({ cpuS: (c.user + c.system) / 1e6 }); link.close(); }
    });
  }, () => {}).then((srv) => process.send({ port: srv.address().port }));
} else {
  const mib = Number(process.argv[2] || 2048);
  const child = fork(__filename, ['--appliance']);
  child.once('message', async ({ port }) => {
    const link = await connectAppliance({ host: '127.0.0.1', port }, keys, 10000);
    const payload = Buffer.alloc(PAYLOAD, 7);
    const n = Math.ceil((mib * 2 ** 20) / PAYLOAD);
    let acked = 0, sent = 0;
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    await new Promise((resolve) => {
      link.onMessage((m) => { if (m.t === 'ack') { acked = m.id; pump(); if (acked === n) resolve(); } });
      // At most 32 frames (8 MiB) unacknowledged, as the host's remote container allows.
      const pump = () => { while (sent < n && sent - acked < 32) { sent++; link.send({ t: 'orig', id: sent, first: sent * 64, count: 64 }, payload); } };
      pump();
    });
    const s = (performance.now() - t0) / 1000;
    const c = process.cpuUsage(cpu0);
    link.send({ t: 'cancel', reason: 'done' });
    child.once('message', ({ cpuS }) => {
      const gib = (n * PAYLOAD) / 2 ** 30;
      process.stdout.write(JSON.stringify({ bytes: n * PAYLOAD, seconds: s, mbps: (n * PAYLOAD) / s / 1e6, hostCpuSPerGiB: (c.user + c.system) / 1e6 / gib, applianceCpuSPerGiB: cpuS / gib }) + '\n');
      child.kill();
      process.exit(0);
    });
  });
}
