// Fuzzing the appliance link's frame decoder (src/appliance/link-protocol.ts) as the NBD parser is
// fuzzed: valid streams split at every possible point decode to the same messages; random flips,
// truncations, garbage and hostile lengths either decode to well-formed messages or throw
// LinkProtocolError, never another exception, never more memory than the limits allow.
import test from 'ava';
import { APPLIANCE_MESSAGES, encodeFrame, FrameDecoder, HOST_MESSAGES, LINK_MAGIC, LinkProtocolError, MAX_JSON, MAX_PAYLOAD, type HostMessage } from '../src/appliance/link-protocol';
import { rng, seedFromEnv } from './helpers/system';

const hello: HostMessage = { t: 'hello', version: 1, unit: 'data', size: 1 << 30, blockSize: 4096, instant: '2026-12-03T06:00:00.000Z', host: 'h', fingerprint: [[0, 'a'.repeat(64)], [262143, 'b'.repeat(64)]], timeoutMs: 30000 };

function stream(): { bytes: Buffer; count: number } {
  const parts: Buffer[] = [];
  parts.push(...encodeFrame(hello));
  for (let i = 1; i <= 5; i++) parts.push(...encodeFrame({ t: 'orig', id: i, first: 2 ** 32 + i * 3, count: 3 }, Buffer.alloc(3 * 4096, i)));
  parts.push(...encodeFrame({ t: 'ping', at: 123.5 }));
  parts.push(...encodeFrame({ t: 'cancel', reason: 'why' }));
  return { bytes: Buffer.concat(parts), count: 8 };
}

function decodeAll(chunks: Buffer[], schemas = HOST_MESSAGES): Array<{ m: { t: string }; p: Buffer | undefined }> {
  const d = new FrameDecoder<{ t: string }>(schemas, 'the peer');
  const out: Array<{ m: { t: string }; p: Buffer | undefined }> = [];
  for (const c of chunks) d.push(c, (m, p) => out.push({ m, p }));
  return out;
}

test('a valid stream decodes the same whatever its split (every split point for the first 2 KiB, then random splits); block numbers past 2^32 stay exact', (t) => {
  const { bytes, count } = stream();
  const whole = decodeAll([bytes]);
  t.is(whole.length, count);
  t.deepEqual(whole[0]!.m, hello);
  const o = whole[1]!.m as unknown as { first: number };
  t.is(o.first, 2 ** 32 + 3);
  t.true(whole[1]!.p!.equals(Buffer.alloc(3 * 4096, 1)));
  for (let at = 1; at < 2048; at++) {
    const got = decodeAll([bytes.subarray(0, at), bytes.subarray(at)]);
    if (got.length !== count) { t.fail(`split at ${at}: ${got.length} messages`); return; }
  }
  const seed = seedFromEnv(t);
  const r = rng(seed);
  for (let round = 0; round < 200; round++) {
    const chunks: Buffer[] = [];
    let at = 0;
    while (at < bytes.length) { const n = 1 + Math.floor(r() * 5000); chunks.push(bytes.subarray(at, at + n)); at += n; }
    const got = decodeAll(chunks);
    t.deepEqual(got.map((g) => g.m), whole.map((g) => g.m));
    t.true(got.every((g, i) => (g.p === undefined) === (whole[i]!.p === undefined) && (!g.p || g.p.equals(whole[i]!.p!))));
  }
});

test('mutants: random byte flips, truncations and garbage give well-formed messages or LinkProtocolError, nothing else', (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const { bytes } = stream();
  let errors = 0, ok = 0;
  for (let round = 0; round < 3000; round++) {
    const m = Buffer.from(bytes);
    const kind = round % 3;
    if (kind === 0) for (let k = 0; k < 1 + Math.floor(r() * 4); k++) m[Math.floor(r() * Math.min(m.length, 600))] = Math.floor(r() * 256);
    else if (kind === 1) for (let k = 0; k < 8; k++) m[Math.floor(r() * m.length)] = Math.floor(r() * 256);
    const input = kind === 2 ? Buffer.from(Array.from({ length: 64 + Math.floor(r() * 512) }, () => Math.floor(r() * 256))) : m.subarray(0, Math.floor(r() * m.length) + 1);
    try {
      const got = decodeAll([input]);
      for (const g of got) t.true(typeof g.m.t === 'string');
      ok++;
    } catch (e) {
      if (!(e instanceof LinkProtocolError)) { t.fail(`round ${round}: ${(e as Error).name}: ${(e as Error).message}`); return; }
      errors++;
    }
  }
  t.log(`${ok} mutants decoded (a prefix of valid frames), ${errors} refused with LinkProtocolError`);
  t.true(errors > 1000);
});

test('hostile frames are refused with a message naming what is wrong, before any large allocation', (t) => {
  const head = (jl: number, pl: number, magic = LINK_MAGIC, version = 1) => { const h = Buffer.alloc(16); h.writeUInt32LE(magic, 0); h.writeUInt8(version, 4); h.writeUInt32LE(jl, 8); h.writeUInt32LE(pl, 12); return h; };
  const refuse = (b: Buffer, re: RegExp, schemas = HOST_MESSAGES) => {
    const e = t.throws(() => decodeAll([b], schemas), { instanceOf: LinkProtocolError });
    t.regex(e!.message, re);
  };
  refuse(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), /does not speak the livesnap appliance protocol/);
  refuse(head(10, 0, LINK_MAGIC, 9), /version 9 of the appliance protocol/);
  refuse(head(MAX_JSON + 1, 0), /a message of \d+ bytes/);
  refuse(head(10, MAX_PAYLOAD + 1), /a payload of \d+ bytes/);
  refuse(head(0xffffffff, 0xffffffff), /a message of 4294967295 bytes/);
  const msg = (o: unknown, payload?: Buffer) => { const j = Buffer.from(JSON.stringify(o)); return Buffer.concat([head(j.length, payload?.length ?? 0), j, ...(payload ? [payload] : [])]); };
  refuse(msg({ t: 'nope' }), /unknown message "nope"/);
  refuse(msg({ t: '__proto__' }), /unknown message/);
  refuse(msg({ t: 'orig', id: 1, first: -1, count: 1 }, Buffer.alloc(4096)), /malformed "orig" message/);
  refuse(msg({ t: 'orig', id: 1, first: 0, count: 65 }, Buffer.alloc(4096)), /malformed "orig"/);
  refuse(msg({ t: 'orig', id: 1, first: 0, count: 1 }), /"orig" message without a payload/);
  refuse(msg({ t: 'ping', at: 1 }, Buffer.alloc(1)), /"ping" message with a payload/);
  refuse(msg({ t: 'hello', version: 1 }), /malformed "hello"/);
  refuse(msg({ t: 'ack', id: 1 }), /unknown message "ack"/); // an appliance message is not a host's
  refuse(msg({ ...hello, fingerprint: [[0, 'zz']] }), /malformed "hello"/);
  refuse(msg({ t: 'ready', output: 'x', odcBytes: -1 }), /malformed "ready"/, APPLIANCE_MESSAGES);
  refuse(msg({ t: 'reconciled', ranges: [[1, 2, 3]] }), /malformed "reconciled"/, APPLIANCE_MESSAGES);
  // The replica's messages (replica://HOST:PORT/NAME).
  refuse(msg({ t: 'rdata', offset: 0, length: 4096 }), /"rdata" message without a payload/);
  refuse(msg({ t: 'rdata', offset: -512, length: 512 }, Buffer.alloc(512)), /malformed "rdata"/);
  refuse(msg({ t: 'rused', ranges: Array.from({ length: 8193 }, (_, i) => [i, i + 1]) }), /malformed "rused"/);
  refuse(msg({ t: 'rbegin', replica: 'd', size: 1 << 20, blockSize: 4096, id: 'x', parent: null, kind: 'sideways', granularity: 65536, instant: 'now', source: 's', usedBlocks: 1, zeroedBlocks: 0, excludedBytes: 0 }), /malformed "rbegin"/);
  refuse(msg({ t: 'rquery', version: 1, replica: '' }), /malformed "rquery"/);
  refuse(msg({ t: 'rheld', snapshotId: 7 }), /malformed "rheld"/, APPLIANCE_MESSAGES);
  t.deepEqual(decodeAll([msg({ t: 'rdata', offset: 2 ** 33, length: 512 }, Buffer.alloc(512, 9))])[0]!.m, { t: 'rdata', offset: 2 ** 33, length: 512 });
  // Once refused, the decoder stays refused (nothing after a bad frame is trusted).
  const d = new FrameDecoder<{ t: string }>(HOST_MESSAGES, 'the peer');
  t.throws(() => d.push(Buffer.from('garbage!garbage!'), () => {}), { instanceOf: LinkProtocolError });
  t.throws(() => d.push(Buffer.concat(encodeFrame({ t: 'ping', at: 1 })), () => {}), { instanceOf: LinkProtocolError });
});
