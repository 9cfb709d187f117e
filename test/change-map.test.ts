// The change map and the change-tracking filter on their own, on real files: a mark is on disk once
// the write may go on; the epoch switch puts a write on either side of the instant in the right
// epoch (also one in flight at the switch); a failed backup merges back; region numbers past 2^32;
// a fuzzed header is judged, never crashes.
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../src/device/device';
import { ChangeFilter } from '../src/export/change-filter';
import { Filter } from '../src/export/filter';
import { ChangeMap, GRANULARITY } from '../src/incremental/change-map';
import { DeviceBackend } from '../src/nbd/device-backend';
import type { Bitset } from '../src/util/bitset';
import { DEFAULT_CHANGE_INTENT_IDLE_MS, readConfig } from '../src/config';
import type { UserError } from '../src/util/errors';
import { rng, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const MiB = 1 << 20;
const stamp = async () => ({ fileMtimeNs: null, sample: 'x' });
const blocks = (b: Bitset) => [...b.runs()].map(([s, e]) => `${s}-${e}`).join(',');

/** A write that waits until the test lets it go (a timing control for "in flight at the switch"; not a fault). */
class GatedWrites extends Filter {
  gate: Promise<void> | undefined;
  override async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    if (this.gate) await this.gate;
    return super.write(offset, data, fua);
  }
}

function setup(t: import('ava').ExecutionContext, size = 16 * MiB) {
  const dir = scratchDir(t, 'change-map-');
  const vol = sparseFile(path.join(dir, 'vol.raw'), size);
  const dev = Device.open(vol, { write: true });
  const backend = new DeviceBackend(dev, {});
  t.teardown(() => { backend.dispose(); dev.close(); });
  return { dir, dev, backend };
}

test('a write goes on only once its region is on disk; kill (no clean stop) and reopen: every marked region is there', async (t) => {
  const { dir, backend } = setup(t);
  const map = await ChangeMap.open(dir, 'dev-a', 16 * MiB, stamp, true);
  t.truthy(map.resetBecause, 'a new map says the first backup is full');
  const f = new ChangeFilter(backend, map);
  const data = Buffer.alloc(4096, 7);
  await Promise.all([f.write(0, data, false), f.write(GRANULARITY - 4096, data, false), f.write(5 * MiB + 100 * 4096, data, false), f.write(16 * MiB - 4096, data, false)]);
  const flushes = map.flushes;
  await f.write(4096, data, false); // same region: no flush
  t.is(map.flushes, flushes, 'a second write to a marked region costs no flush');
  t.true(flushes <= 2, `${flushes} flushes for 4 concurrent first writes (batched)`);
  map.closeNow(); // as kill -9 leaves it: no clean stamp
  const again = await ChangeMap.open(dir, 'dev-a', 16 * MiB, stamp, false);
  t.is(again.resetBecause, undefined, 'a map left by a killed daemon is trusted');
  await again.beginEpoch('b1');
  const changed = await again.freezeEpoch(4096, 4096);
  // fullBecause from the first open is still set (no backup completed): everything counts.
  t.is(changed.setCount, 4096);
  await again.commitEpoch();
  await again.beginEpoch('b2');
  t.is((await again.freezeEpoch(4096, 4096)).setCount, 0, 'after a completed backup nothing is left');
  await again.close();
});

test('the epoch switch: writes before it belong to this backup, writes between begin and freeze to both, later ones to the next; the switch waits for writes in flight at it to land (they are inside the instant)', async (t) => {
  const { dir, backend } = setup(t);
  const first = await ChangeMap.open(dir, 'dev-b', 16 * MiB, stamp, true);
  await first.beginEpoch('full'); await first.freezeEpoch(4096, 4096); await first.commitEpoch();
  const gated = new GatedWrites(backend);
  const f = new ChangeFilter(gated, first);
  const d = Buffer.alloc(4096, 1);
  await f.write(1 * MiB, d, false); // before
  let open!: () => void;
  gated.gate = new Promise((r) => (open = r));
  let landed = false;
  const inFlight = f.write(2 * MiB, d, false).then(() => { landed = true; }); // marked, not yet landed
  await new Promise((r) => setTimeout(r, 20));
  gated.gate = undefined;
  let begun = false;
  const begin = f.beginEpoch('b1').then(() => { begun = true; });
  await new Promise((r) => setTimeout(r, 50));
  t.false(begun, 'the switch waits for the write in flight');
  open();
  await begin;
  await inFlight;
  t.true(landed);
  await f.write(3 * MiB, d, false); // inside the window
  const thisOne = await f.freezeEpoch(4096, 4096);
  await f.write(4 * MiB, d, false); // after
  // The daemon saw these whole epochs: the in-memory 4 KiB map says exactly which blocks.
  const at = (mib: number) => `${(mib * MiB) / 4096}-${(mib * MiB) / 4096 + 1}`;
  t.is(blocks(thisOne), [at(1), at(2), at(3)].join(','));
  await first.commitEpoch();
  await f.beginEpoch('b2');
  const next = await f.freezeEpoch(4096, 4096);
  t.is(blocks(next), [at(3), at(4)].join(','), 'the next epoch has the window write and the later one');
  await first.close();
});

test('killed before the fine map was written out: every region under a marked intent (4 MiB) counts as changed, a superset; once written out, exactly the regions written', async (t) => {
  const { dir, backend } = setup(t);
  const map = await ChangeMap.open(dir, 'dev-i', 16 * MiB, stamp, true);
  await map.beginEpoch('full'); await map.freezeEpoch(4096, 4096); await map.commitEpoch();
  const f = new ChangeFilter(backend, map);
  await f.write(5 * MiB, Buffer.alloc(4096, 4), false);
  map.closeNow(); // at once: the intent is on disk, the fine bit maybe not
  await new Promise((r) => setTimeout(r, 100)); // writes the kernel already had finish on the old fd
  const a = await ChangeMap.open(dir, 'dev-i', 16 * MiB, stamp, false);
  await a.beginEpoch('b');
  const got = await a.freezeEpoch(4096, 4096);
  // The whole 4 MiB intent region, unless the once-a-second write-out came in between (then exactly the region).
  t.true([`${(4 * MiB) / 4096}-${(8 * MiB) / 4096}`, `${(5 * MiB) / 4096}-${(5 * MiB) / 4096 + 16}`].includes(blocks(got)), blocks(got));
  await a.commitEpoch();
  const g = new ChangeFilter(backend, a);
  await g.write(9 * MiB, Buffer.alloc(4096, 5), false);
  await new Promise((r) => setTimeout(r, 2500)); // the fine map is written out, the intent cleared
  await a.settle(); // (and no write-out still in flight when it stops)
  a.closeNow();
  const b = await ChangeMap.open(dir, 'dev-i', 16 * MiB, stamp, false);
  await b.beginEpoch('c');
  t.is(blocks(await b.freezeEpoch(4096, 4096)), `${(9 * MiB) / 4096}-${(9 * MiB) / 4096 + 16}`, 'exactly the region written');
  await b.close();
});

test('a failed backup merges its epoch back, also across a restart', async (t) => {
  const { dir, backend } = setup(t);
  const map = await ChangeMap.open(dir, 'dev-c', 16 * MiB, stamp, true);
  await map.beginEpoch('full'); await map.freezeEpoch(4096, 4096); await map.commitEpoch();
  const f = new ChangeFilter(backend, map);
  const d = Buffer.alloc(4096, 2);
  await f.write(0, d, false);
  await f.beginEpoch('x');
  await f.freezeEpoch(4096, 4096);
  await f.write(8 * MiB, d, false);
  await map.abandonEpoch();
  await f.beginEpoch('y');
  t.is((await f.freezeEpoch(4096, 4096)).setCount, 2, 'the two 4 KiB blocks written (the in-memory map, merged back too)');
  // Dies with 'y' pending: the next open merges it back (fine map written out first: exact).
  await f.write(12 * MiB, d, false);
  await map.settle();
  map.closeNow();
  const again = await ChangeMap.open(dir, 'dev-c', 16 * MiB, stamp, false);
  t.is(again.pending, null);
  await again.beginEpoch('z');
  t.is((await again.freezeEpoch(4096, 4096)).setCount, 3 * GRANULARITY / 4096, 'after a restart: the 64 KiB regions on disk');
  await again.close();
});

test('the 4 KiB in-memory map narrows what is sent only while the daemon saw the whole epoch, and only inside marked regions', async (t) => {
  const { dir, backend } = setup(t);
  const map = await ChangeMap.open(dir, 'dev-s', 16 * MiB, stamp, true);
  const f = new ChangeFilter(backend, map);
  await f.write(MiB, Buffer.alloc(4096, 1), false); // before any epoch this daemon began: 64 KiB
  await f.beginEpoch('full'); await f.freezeEpoch(4096, 4096); await map.commitEpoch();
  await f.write(2 * MiB + 512, Buffer.alloc(1024, 2), false); // a partial block: its whole block
  await f.write(3 * MiB - 4096, Buffer.alloc(8192, 3), false); // across a region boundary: two blocks
  await f.beginEpoch('b');
  t.is(blocks(await f.freezeEpoch(4096, 4096)), `${(2 * MiB) / 4096}-${(2 * MiB) / 4096 + 1},${(3 * MiB) / 4096 - 1}-${(3 * MiB) / 4096 + 1}`);
  await map.close();
});

test('regions on both sides of 2^32 (a 256 TiB+ volume) are marked, kept and read back', async (t) => {
  const dir = scratchDir(t, 'change-map-big-');
  const regions = 2 ** 32 + 64;
  const size = regions * GRANULARITY;
  const map = await ChangeMap.open(dir, 'dev-big', size, stamp, true);
  await map.beginEpoch('full'); await map.freezeEpoch(GRANULARITY, regions); await map.commitEpoch();
  for (const r of [2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1, regions - 1]) { const p = map.mark(r * GRANULARITY, 4096); if (p) await p; }
  await map.settle();
  map.closeNow();
  const again = await ChangeMap.open(dir, 'dev-big', size, stamp, false);
  await again.beginEpoch('b');
  const got = await again.freezeEpoch(GRANULARITY, regions);
  t.deepEqual([...got.runs()], [[2 ** 32 - 1, 2 ** 32 + 2], [regions - 1, regions]]);
  await again.commitEpoch();
  // A trim of many regions at once (whole bytes and pages, not bit by bit), across 2^32.
  const p = again.mark((2 ** 32 - 1000) * GRANULARITY + 512, 70_000 * GRANULARITY);
  if (p) await p;
  await again.settle();
  again.closeNow();
  await new Promise((r) => setTimeout(r, 100));
  const third = await ChangeMap.open(dir, 'dev-big', size, stamp, false);
  await third.beginEpoch('c');
  t.deepEqual([...(await third.freezeEpoch(GRANULARITY, regions)).runs()], [[2 ** 32 - 1000, Math.min(regions, 2 ** 32 - 1000 + 70_001)]]);
  await third.close();
  t.is(ChangeMap.bytesPerTiB(), 4 * MiB + 32 * 1024, 'two slots of 2 MiB per TiB and 32 KiB of intents (QEMU: 4 MiB per 2 TiB for one bitmap)');
});

test('fuzzed change maps are judged (trusted, or reset with a reason), never crash and never trusted when the header is broken', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const { dir, backend } = setup(t);
  const map = await ChangeMap.open(dir, 'dev-f', 16 * MiB, stamp, true);
  await map.beginEpoch('full'); await map.freezeEpoch(4096, 4096); await map.commitEpoch();
  const f = new ChangeFilter(backend, map);
  await f.write(MiB, Buffer.alloc(4096, 3), false);
  await map.close(stamp);
  const file = path.join(dir, 'changes.map');
  const good = fs.readFileSync(file);
  let reset = 0;
  for (let round = 0; round < 60; round++) {
    const b = Buffer.from(good);
    const n = 1 + Math.floor(r() * 8);
    for (let i = 0; i < n; i++) b[Math.floor(r() * 8192)] = Math.floor(r() * 256);
    const cut = r() < 0.2 ? Math.floor(r() * b.length) : b.length;
    fs.writeFileSync(file, b.subarray(0, cut));
    const m = await ChangeMap.open(dir, 'dev-f', 16 * MiB, stamp, false);
    if (m.resetBecause) reset++;
    else {
      // Trusted: it must still say what the good one says.
      await m.beginEpoch('b');
      t.is(blocks(await m.freezeEpoch(4096, 4096)), `${MiB / 4096}-${MiB / 4096 + 16}`, `round ${round}: a trusted map reads as the original`);
      await m.abandonEpoch();
    }
    m.closeNow();
  }
  t.log(`seed ${seed}: ${reset} of 60 damaged maps reset`);
  t.true(reset > 0);
});

// Serial: its timing (a 1.5 s lifetime) must not share the thread pool with the other tests' syncs.
test.serial('a write under an intent already on disk waits for no write-out, also while one for another region is queued; the timer clears an intent only once its region was idle for the intent lifetime', async (t) => {
  const { dir, backend } = setup(t);
  const map = await ChangeMap.open(dir, 'dev-i', 16 * MiB, stamp, true, 1500);
  const f = new ChangeFilter(backend, map);
  const data = Buffer.alloc(4096, 3);
  await f.write(0, data, false); // the intent of the first 4 MiB, on disk
  const other = map.mark(8 * MiB, 4096); // a new intent in the same intent page: a write-out queued
  t.truthy(other, 'a new intent waits for its write-out');
  t.is(map.mark(4096, 4096), undefined, 'a write under the intent on disk goes on at once');
  await other;
  // The timer's write-out (idle) keeps intents written less than the lifetime (1.5 s here) ago.
  await map.settle('idle');
  t.is(map.mark(8192, 4096), undefined, 'the intent written just now is kept');
  await map.settle('idle');
  await sleep(150);
  await map.settle('idle');
  t.is(map.mark(16384, 4096), undefined, 'written 150 ms ago: still kept');
  // Written at 150 ms: idle long enough only at a write-out begun 1.5 s after one begun after it.
  await sleep(1600);
  await map.settle('idle');
  await sleep(1600);
  await map.settle('idle');
  const again = map.mark(12288, 4096);
  t.truthy(again, 'idle for longer than the lifetime, the intent was cleared: the next write marks it anew');
  await again;
  await map.close();
});

test('the intent lifetime is read from LIVESNAP_CHANGE_INTENT_IDLE_MS once, 30 s by default; a bad value is refused with what to do', (t) => {
  t.is(readConfig({}).changeIntentIdleMs, DEFAULT_CHANGE_INTENT_IDLE_MS);
  t.is(DEFAULT_CHANGE_INTENT_IDLE_MS, 30_000);
  t.is(readConfig({ LIVESNAP_CHANGE_INTENT_IDLE_MS: '1000' }).changeIntentIdleMs, 1000);
  const e = t.throws(() => readConfig({ LIVESNAP_CHANGE_INTENT_IDLE_MS: '2s' }));
  t.regex(e.message, /LIVESNAP_CHANGE_INTENT_IDLE_MS=2s: expected a whole number of at least 0/);
  t.regex((e as UserError).hint ?? '', /unset LIVESNAP_CHANGE_INTENT_IDLE_MS/);
});
