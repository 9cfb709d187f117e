// A replica over the appliance's authenticated link (replica://HOST:PORT/NAME, issue 18): the
// appliance in a network namespace keeps the replica; the host backs up to it under concurrent
// writers; each run leaves it the volume at that run's instant (full first, then only changes).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { keyFile, startAppliance, twoHosts } from './helpers/appliance';
import { checkSnapshot, cli, lastJsonOf, SelfDescribingWriters, serialIf, servedVolume, startBackup } from './helpers/online';
import { rng, seedFromEnv } from './helpers/system';

const MiB = 1 << 20;
const test = serialIf({ root: true, commands: ['qemu-io', 'ip'] });

test('replica://HOST:PORT/NAME under concurrent writers: full, then incrementals, the remote replica is each instant; a wrong key and an unknown name are refused', async (t) => {
  const seed = seedFromEnv(t);
  const { dir, size, served } = await servedVolume(t, 'replica-remote-', 'rr', 32);
  const ns = twoHosts(t);
  const key = await keyFile(dir);
  const store = path.join(dir, 'store');
  const replica = path.join(dir, 'far.replica');
  const ap = await startAppliance(t, ns, { key, luns: {}, store, args: ['--replica', `data=${replica}`] });
  const to = `replica://${ap.address}/data`;
  const writers = new SelfDescribingWriters(t, path.join(dir, 'src'), served.uri, size, rng(seed), { writers: 2, maxBlocks: 4, region: [2 * MiB, 10 * MiB] });
  writers.start();
  let ids: string[] = [];
  try {
    let after = -Infinity;
    for (let k = 0; k < 3; k++) {
      await writers.acked(40, 30_000, after);
      const b = startBackup(t, [served.name, '--to', to, '--key', key, '--control', served.control]);
      const armed = await b.armed;
      const res = await b.exit;
      after = armed.receivedAt;
      t.is(res.status, 0, `${res.stderr}\n${served.logTail()}\n${ap.log()}`);
      const done = res.lines[res.lines.length - 1]!;
      const c = done.chain as { id: string; kind: string; parent: string | null };
      t.is(c.kind, k === 0 ? 'full' : 'incremental');
      if (k > 0) t.is(c.parent, ids[k - 1]);
      if (k > 0) t.true(Number(done.bytes) <= 8 * MiB, `run ${k} sent ${done.bytes} bytes`);
      ids.push(c.id);
      const check = checkSnapshot(replica, size, writers.records, b.launchedAt, armed.receivedAt);
      t.deepEqual(check.problems, [], `the remote replica is the volume at run ${k}'s instant`);
      const st = lastJsonOf((await cli(['replica', 'status', replica, '--json'])).stdout);
      t.is(st.snapshotId, c.id);
      t.is(st.state, 'consistent');
    }
  } finally {
    await writers.stop();
  }
  const other = await keyFile(dir, 'other.psk');
  const wrong = await cli(['backup', served.name, '--to', to, '--key', other, '--control', served.control]);
  t.is(wrong.status, 1);
  t.regex(wrong.stderr, /refused the TLS handshake/);
  const unknown = await cli(['backup', served.name, '--to', `replica://${ap.address}/nosuch`, '--key', key, '--control', served.control]);
  t.is(unknown.status, 1);
  t.regex(unknown.stderr, /keeps no replica named "nosuch"/);
  const noKey = await cli(['backup', served.name, '--to', to, '--control', served.control]);
  t.is(noKey.status, 1);
  t.regex(noKey.stderr, /needs --key FILE/);
  t.is(lastJsonOf((await cli(['replica', 'status', replica, '--json'])).stdout).snapshotId, ids[2], 'the refused runs left the replica as it was');
  t.false(fs.existsSync(`${replica}.livesnap-journal`));
});
