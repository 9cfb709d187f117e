#!/usr/bin/env node
// A raw NBD client for bench/nbd-datapath: N pipelined WRITEs of SIZE bytes on one connection (all
// sent at once), then the time until the last reply. Any server: livesnap or nbdkit.
// usage: node bench/nbd-pipeline.js (SOCKET | HOST:PORT) EXPORT [N=65536] [SIZE=1024]
'use strict';
const net = require('node:net');

const [target, name = 'disk', nArg = '65536', sizeArg = '1024'] = process.argv.slice(2);
if (!target) { console.error('usage: nbd-pipeline.js (SOCKET | HOST:PORT) EXPORT [N] [SIZE]'); process.exit(2); }
const N = Number(nArg), SIZE = Number(sizeArg);
const m = /^(.*):(\d+)$/.exec(target);
const sock = m ? net.connect(Number(m[2]), m[1]) : net.connect(target);
sock.setNoDelay(true);

let buf = Buffer.alloc(0);
let phase = 'greeting';
let replies = 0, errors = 0, started = 0n;
const option = (opt, data) => { const h = Buffer.alloc(16); h.write('IHAVEOPT', 0, 'latin1'); h.writeUInt32BE(opt, 8); h.writeUInt32BE(data.length, 12); return Buffer.concat([h, data]); };

function requests() {
  const rec = 28 + SIZE;
  const b = Buffer.alloc(N * rec);
  for (let i = 0; i < N; i++) {
    const at = i * rec;
    b.writeUInt32BE(0x25609513, at); b.writeUInt16BE(0, at + 4); b.writeUInt16BE(1, at + 6);
    b.writeUInt32BE(0, at + 8); b.writeUInt32BE(i, at + 12);
    const off = i * SIZE;
    b.writeUInt32BE(Math.floor(off / 2 ** 32), at + 16); b.writeUInt32BE(off % 2 ** 32, at + 20); b.writeUInt32BE(SIZE, at + 24);
    b.fill(i % 251, at + 28, at + rec);
  }
  return b;
}
const payload = requests();

sock.on('data', (d) => {
  buf = buf.length ? Buffer.concat([buf, d]) : d;
  for (;;) {
    if (phase === 'greeting') {
      if (buf.length < 18) return;
      buf = buf.subarray(18);
      const n = Buffer.from(name);
      const go = Buffer.alloc(6 + n.length); go.writeUInt32BE(n.length, 0); n.copy(go, 4);
      sock.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), option(7, go)]));
      phase = 'go';
    } else if (phase === 'go') {
      if (buf.length < 20) return;
      const type = buf.readUInt32BE(12), len = buf.readUInt32BE(16);
      if (buf.length < 20 + len) return;
      buf = buf.subarray(20 + len);
      if (type & 0x80000000) { console.error(`GO refused: 0x${type.toString(16)}`); process.exit(1); }
      if (type === 1) {
        phase = 'tx';
        started = process.hrtime.bigint();
        sock.write(payload);
      }
    } else {
      const whole = buf.length - (buf.length % 16);
      for (let at = 0; at < whole; at += 16) { replies++; if (buf.readUInt32BE(at + 4) !== 0) errors++; }
      buf = buf.subarray(whole);
      if (replies >= N) {
        const secs = Number(process.hrtime.bigint() - started) / 1e9;
        console.log(JSON.stringify({ seconds: secs, writesPerSec: Math.round(N / secs), errors }));
        const disc = Buffer.alloc(28); disc.writeUInt32BE(0x25609513, 0); disc.writeUInt16BE(2, 6);
        sock.end(disc);
        return;
      }
      return;
    }
  }
});
sock.on('error', (e) => { console.error(e.message); process.exit(1); });
sock.on('close', () => { if (replies < N) { console.error(`closed after ${replies}/${N} replies`); process.exit(1); } });
setTimeout(() => { console.error(`timeout: ${replies}/${N} replies after 300 s`); process.exit(1); }, 300000).unref();
