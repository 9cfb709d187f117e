// The replica (issue 18, item 4): it only moves between consistent states. A child process applies
// a full A, a delta A -> B (with zeroed blocks) and a full C to a replica and is SIGKILLed at seeded
// I/O steps (LIVESNAP_TEST_KILL_AT); after "livesnap replica recover" the replica must be exactly the
// state before or after the interrupted step's phase, on every byte. Also: refusals (wrong parent,
// untrusted metadata) and a fuzz of the journal parser and of recovery from damaged journals.
import test, { type ExecutionContext } from 'ava';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { JournalDamagedError, recoverReplica, ReplicaSink, replicaHolding, replicaHolds, replicaStatus } from '../src/incremental/replica';
import { bufferSource, readJournal } from '../src/incremental/replica-journal';
import { replicaFiles } from '../src/incremental/replica-state';
import { UserError } from '../src/util/errors';
import { lastJson, livesnap } from './helpers/cli';
import { feedPhase, type Phase, replicaScenario, VOLUME_SIZE } from './helpers/replica-volumes';
import { testIf } from './helpers/skip';
import { loopDevice, rng, scratchDir, seedFromEnv, sparseFile } from './helpers/system';

const CHILD = path.join(__dirname, 'helpers', 'replica-child.js');
/** Small apply batches: many crash points inside the apply. */
const APPLY_BATCH = 64 << 10;
const RECORD_ALL = { LIVESNAP_TEST_KILL_AT: 'replica:999999999999' };

interface ChildRun { status: number | null; signal: NodeJS.Signals | null; stderr: string; steps?: string[]; starts?: Record<string, number> }

function child(replica: string, seed: number, phases: string, env: Record<string, string> = {}): ChildRun {
  const r = spawnSync(process.execPath, [CHILD, replica, String(seed), phases, String(APPLY_BATCH)], { encoding: 'utf8', env: { ...process.env, ...env } });
  const out: ChildRun = { status: r.status, signal: r.signal, stderr: r.stderr };
  if (r.status === 0) Object.assign(out, JSON.parse(r.stdout.trim()) as object);
  return out;
}

/** The whole replica equals `want` (names the first differing block otherwise). */
function sameBytes(t: ExecutionContext, file: string, want: Buffer, what: string): boolean {
  const got = fs.readFileSync(file);
  if (got.equals(want)) return true;
  let i = 0;
  while (i < Math.min(got.length, want.length) && got[i] === want[i]) i++;
  t.fail(`${what}: ${file} differs from the expected image at byte ${i} (block ${Math.floor(i / 4096)}; ${got.length} vs ${want.length} bytes)`);
  return false;
}

/** Waits `ms` (the file's mtime must move past livesnap's own last write: coarse clock ticks). */
function spinFor(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function matches(file: string, want: Buffer): boolean {
  return fs.readFileSync(file).equals(want);
}

function status(replica: string): Record<string, unknown> {
  const r = livesnap(['replica', 'status', replica, '--json']);
  if (r.status !== 0) throw new Error(`replica status failed: ${r.stderr}`);
  return lastJson(r.stdout);
}

/** Distinct seeded picks from `pool` (all of it when it is smaller). */
function pick(r: () => number, pool: number[], n: number): number[] {
  const p = pool.slice();
  for (let i = p.length - 1; i > 0; i--) { const j = Math.floor(r() * (i + 1)); [p[i], p[j]] = [p[j]!, p[i]!]; }
  return p.slice(0, n).sort((a, b) => a - b);
}

/** The step numbers (1-based, as the knob counts) of phase `name`, and its commit step. */
function phaseSteps(dry: ChildRun, name: string, next?: string): { steps: number[]; commit: number } {
  const from = dry.starts![name]!, to = next ? dry.starts![next]! : dry.steps!.length;
  const steps: number[] = [];
  for (let i = from; i < to; i++) steps.push(i + 1);
  const commit = dry.steps!.indexOf('commit', from) + 1;
  return { steps, commit };
}

/**
 * Kills the child at step `n`, recovers with the CLI and checks the replica is exactly `before`
 * (killed up to the commit step) or `after` (killed past it), with status saying so.
 */
function killAndRecover(t: ExecutionContext, dir: string, seed: number, phases: string, n: number, commit: number, before: Phase | null, after: Phase, label: string, device?: string): void {
  const replica = device ?? path.join(dir, 'replica.img');
  const run = child(replica, seed, phases, { LIVESNAP_TEST_KILL_AT: `replica:${n}` });
  t.is(run.signal, 'SIGKILL', `${label}: the child was to be killed at step ${n} (${run.stderr})`);
  const pre = livesnap(['replica', 'status', replica, '--json']);
  t.is(pre.status, 0, `${label}: status after the kill: ${pre.stderr}`);
  const rec = livesnap(['replica', 'recover', replica, '--json']);
  t.is(rec.status, 0, `${label}: recover: ${rec.stderr}`);
  const want = n <= commit ? before : after;
  const s = status(replica);
  if (want === null) {
    t.is(s.state, 'empty', `${label}: a first full killed before its commit leaves no snapshot`);
    t.is(s.snapshotId, null);
    t.false(fs.existsSync(replica), `${label}: and no replica file`);
  } else {
    t.is(s.state, 'consistent', label);
    t.is(s.snapshotId, want.info.backup!.id, `${label}: killed at step ${n} (commit is step ${commit})`);
    sameBytes(t, replica, want.image, `${label}, killed at step ${n}`);
  }
  const files = replicaFiles(replica);
  t.false(fs.existsSync(files.journal), `${label}: the journal is gone after recovery`);
  t.false(fs.existsSync(files.partial), `${label}: no staged full is left`);
}

test('an uninterrupted full, delta and full give A, B and C exactly', async (t) => {
  const seed = seedFromEnv(t);
  const sc = replicaScenario(seed);
  const dir = scratchDir(t, 'livesnap-replica-');
  const replica = path.join(dir, 'replica.img');
  for (const [phases, want] of [['A', sc.A], ['B', sc.B], ['C', sc.C]] as const) {
    const run = child(replica, seed, phases);
    t.is(run.status, 0, run.stderr);
    sameBytes(t, replica, want.image, `after ${phases}`);
    const s = status(replica);
    t.like(s, { state: 'consistent', snapshotId: want.info.backup!.id, instant: want.info.snapshotTime.toISOString(), volumeSize: VOLUME_SIZE });
  }
  // The free blocks of the last full are holes, not written zeros.
  t.true(fs.statSync(replica).blocks * 512 < VOLUME_SIZE, 'the replica file is sparse');
  t.deepEqual(fs.readdirSync(dir).sort(), ['replica.img', 'replica.img.livesnap-lock', 'replica.img.livesnap-replica.json']);
});

test('a delta killed at 20 seeded points leaves A or B exactly, B once committed', async (t) => {
  const seed = seedFromEnv(t);
  const sc = replicaScenario(seed);
  const dry = child(path.join(scratchDir(t, 'livesnap-replica-'), 'replica.img'), seed, 'A,B', RECORD_ALL);
  t.is(dry.status, 0, dry.stderr);
  const { steps, commit } = phaseSteps(dry, 'B');
  t.log(`delta: ${steps.length} steps, commit at ${commit}: ${dry.steps!.slice(steps[0]! - 1).join(' ')}`);
  t.true(steps.length >= 20 && commit > steps[0]!);
  // Always the edges (first step, the commit, right after it, the last), then seeded ones.
  const must = [steps[0]!, commit, commit + 1, steps[steps.length - 1]!];
  const kills = [...new Set([...must, ...pick(rng(seed), steps.filter((s) => !must.includes(s)), 20 - must.length)])].sort((a, b) => a - b);
  t.is(kills.length, 20);
  for (const n of kills) {
    killAndRecover(t, scratchDir(t, 'livesnap-replica-'), seed, 'A,B', n, commit, sc.A, sc.B, `delta step ${n} (${dry.steps![n - 1]})`);
  }
});

test('a full onto a replica that holds a snapshot, killed, leaves B or C exactly', async (t) => {
  const seed = seedFromEnv(t);
  const sc = replicaScenario(seed);
  const dry = child(path.join(scratchDir(t, 'livesnap-replica-'), 'replica.img'), seed, 'A,B,C', RECORD_ALL);
  t.is(dry.status, 0, dry.stderr);
  const { steps, commit } = phaseSteps(dry, 'C');
  const kills = [...new Set([steps[0]!, commit - 1, commit, commit + 1, ...pick(rng(seed + 1), steps, 6), steps[steps.length - 1]!])];
  for (const n of kills) killAndRecover(t, scratchDir(t, 'livesnap-replica-'), seed, 'A,B,C', n, commit, sc.B, sc.C, `full-over step ${n} (${dry.steps![n - 1]})`);
});

test('a first full killed leaves an empty replica or A', async (t) => {
  const seed = seedFromEnv(t);
  const sc = replicaScenario(seed);
  const dry = child(path.join(scratchDir(t, 'livesnap-replica-'), 'replica.img'), seed, 'A', RECORD_ALL);
  const { steps, commit } = phaseSteps(dry, 'A');
  for (const n of [...new Set([1, commit, commit + 1, ...pick(rng(seed + 2), steps, 3), steps.length])]) {
    killAndRecover(t, scratchDir(t, 'livesnap-replica-'), seed, 'A', n, commit, null, sc.A, `first full step ${n} (${dry.steps![n - 1]})`);
  }
});

test('a recovery killed at any of its steps is recovered by the next one', async (t) => {
  const seed = seedFromEnv(t);
  const sc = replicaScenario(seed);
  const dry = child(path.join(scratchDir(t, 'livesnap-replica-'), 'replica.img'), seed, 'A,B', RECORD_ALL);
  const { commit } = phaseSteps(dry, 'B');
  // Every step of the recovery in turn (the CLI applies in 8 MiB batches: a few steps), until one
  // recovery runs to its end without reaching the step.
  let k = 1;
  for (;; k++) {
    const replica = path.join(scratchDir(t, 'livesnap-replica-'), 'replica.img');
    t.is(child(replica, seed, 'A,B', { LIVESNAP_TEST_KILL_AT: `replica:${commit + 1}` }).signal, 'SIGKILL');
    const first = livesnap(['replica', 'recover', replica], { LIVESNAP_TEST_KILL_AT: `replica:${k}` });
    if (first.signal !== 'SIGKILL') t.is(first.status, 0, first.stderr);
    const again = livesnap(['replica', 'recover', replica, '--json']);
    t.is(again.status, 0, again.stderr);
    t.like(status(replica), { state: 'consistent', snapshotId: 'snap-B' });
    sameBytes(t, replica, sc.B.image, `recovery killed at its step ${k}`);
    if (first.signal !== 'SIGKILL' || k > 40) break;
  }
  // zero, apply, sync-replica, metadata, drop-journal at least.
  t.true(k > 5, `the recovery was killed at each of its ${k - 1} steps`);
});

test('a delta over another snapshot than the replica holds is refused, and nothing changes', async (t) => {
  const seed = seedFromEnv(t);
  const sc = replicaScenario(seed);
  const replica = path.join(scratchDir(t, 'livesnap-replica-'), 'replica.img');
  await feedPhase(new ReplicaSink(replica), sc.A, seed);
  t.is(await replicaHolds(replica), 'snap-A');
  const wrong = { ...sc.B.info.backup!, parent: 'snap-X' };
  const e = await t.throwsAsync(feedPhase(new ReplicaSink(replica), sc.B, seed, undefined, { backup: wrong }), { instanceOf: UserError });
  t.regex(e!.message, /holds snapshot snap-A, and this incremental backup \(snap-B\) applies over snapshot snap-X/);
  t.regex((e as UserError).hint ?? '', /run a full backup to it/);
  sameBytes(t, replica, sc.A.image, 'after the refused delta');
  t.false(fs.existsSync(replicaFiles(replica).journal));
  t.like(await replicaStatus(replica), { state: 'consistent', snapshotId: 'snap-A' });
  // An empty replica refuses a delta as well; a volume of another size too.
  const fresh = path.join(path.dirname(replica), 'fresh.img');
  await t.throwsAsync(feedPhase(new ReplicaSink(fresh), sc.B, seed), { message: /holds no snapshot, and this incremental backup \(snap-B\) applies over snapshot snap-A/ });
  t.false(fs.existsSync(fresh));
  await t.throwsAsync(feedPhase(new ReplicaSink(replica), sc.B, seed, undefined, { size: VOLUME_SIZE * 2, totalBlocks: sc.B.used.size }), { message: /holds a volume of 6291456 bytes, and the volume is 12582912 bytes now/ });
  // A full onto a file that is not a replica is refused (it is someone's file).
  const other = sparseFile(path.join(path.dirname(replica), 'other.img'), 4096);
  await t.throwsAsync(feedPhase(new ReplicaSink(other), sc.A, seed), { message: /exists and is not a livesnap replica/ });
  t.is(fs.statSync(other).size, 4096);
});

test('untrusted metadata is refused with a clear message, and a full mends it', async (t) => {
  const seed = seedFromEnv(t);
  const sc = replicaScenario(seed);
  const dir = scratchDir(t, 'livesnap-replica-');
  const replica = path.join(dir, 'replica.img');
  const files = replicaFiles(replica);
  await feedPhase(new ReplicaSink(replica), sc.A, seed);
  const good = fs.readFileSync(files.meta, 'utf8');
  const damage: Array<[string, () => void, RegExp]> = [
    ['torn', () => fs.writeFileSync(files.meta, good.slice(0, 77)), /not JSON \(torn or overwritten\)/],
    ['edited', () => fs.writeFileSync(files.meta, good.replace('snap-A', 'snap-B')), /checksum mismatch/],
    ['another file', () => { fs.copyFileSync(replica, `${replica}.new`); fs.renameSync(`${replica}.new`, replica); }, /names another file/],
    ['written by someone else', () => { spinFor(20); const fd = fs.openSync(replica, 'r+'); fs.writeSync(fd, Buffer.from('x'), 0, 1, 4096); fs.closeSync(fd); }, /was modified \(or resized\) since livesnap last wrote it/],
  ];
  for (const [what, spoil, why] of damage) {
    await feedPhase(new ReplicaSink(replica), sc.A, seed);
    spoil();
    for (const cmd of ['status', 'recover']) {
      const r = livesnap(['replica', cmd, replica]);
      t.is(r.status, 1, `${what}: replica ${cmd} must fail`);
      t.true(r.stderr.includes(`the replica's metadata ${files.meta} cannot be trusted`), `${what}: ${r.stderr}`);
      t.regex(r.stderr, why, what);
      t.regex(r.stderr, /hint: run a full backup to it/, what);
    }
    await t.throwsAsync(feedPhase(new ReplicaSink(replica), sc.B, seed), { instanceOf: UserError, message: why }, what);
    const h = await replicaHolding(replica);
    t.is(h.snapshotId, null, `${what}: nothing usable is held, so the next backup is full`);
    t.regex(h.untrusted ?? '', why);
  }
  // A full rewrites it; then the delta applies again.
  await feedPhase(new ReplicaSink(replica), sc.A, seed);
  await feedPhase(new ReplicaSink(replica), sc.B, seed);
  t.like(await replicaStatus(replica), { state: 'consistent', snapshotId: 'snap-B' });
  sameBytes(t, replica, sc.B.image, 'after the mending full and the delta');
});

test('journal fuzz: flipped bytes and truncations give a clean error or "uncommitted", never an apply', async (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const sc = replicaScenario(seed);
  const replica = path.join(scratchDir(t, 'livesnap-replica-'), 'replica.img');
  const files = replicaFiles(replica);
  // A committed journal whose apply has not begun: the delta killed right after its commit record.
  const dry = child(path.join(scratchDir(t, 'livesnap-replica-'), 'replica.img'), seed, 'A,B', RECORD_ALL);
  const { commit } = phaseSteps(dry, 'B');
  t.is(child(replica, seed, 'A,B', { LIVESNAP_TEST_KILL_AT: `replica:${commit + 2}` }).signal, 'SIGKILL');
  t.is(dry.steps![commit], 'sync-commit');
  const journal = fs.readFileSync(files.journal);
  const whole = await readJournal(bufferSource(journal), 'j');
  t.is(whole.state, 'committed');
  if (whole.state === 'committed') t.is(whole.entries.filter((e) => e.type === 'data').reduce((n, e) => n + e.length, 0), sc.B.used.count() * 4096);
  const mutate = (): Buffer => {
    let m = Buffer.from(journal);
    const kind = r();
    if (kind < 0.6 || kind >= 0.85) {
      // Anywhere, and often in the commit record (the last 128 bytes) and the header and zero records.
      for (let k = 1 + Math.floor(r() * 3); k > 0; k--) {
        const where = r();
        const at = where < 0.3 ? m.length - 1 - Math.floor(r() * 128) : where < 0.5 ? Math.floor(r() * 4096) : Math.floor(r() * m.length);
        m[at] = m[at]! ^ (1 + Math.floor(r() * 255));
      }
    }
    if (kind >= 0.6) m = m.subarray(0, Math.floor(r() * m.length));
    return m;
  };
  const outcomes = { uncommitted: 0, damaged: 0 };
  for (let i = 0; i < 2000; i++) {
    const m = mutate();
    if (m.equals(journal)) continue;
    try {
      const res = await readJournal(bufferSource(m), 'j');
      if (res.state === 'committed') { t.fail(`mutation ${i} was read as committed`); break; }
      outcomes.uncommitted++;
    } catch (e) {
      if (!(e instanceof JournalDamagedError)) { t.fail(`mutation ${i}: ${(e as Error).stack}`); break; }
      outcomes.damaged++;
    }
  }
  t.log(`parser: ${outcomes.uncommitted} uncommitted, ${outcomes.damaged} damaged`);
  t.true(outcomes.uncommitted > 100 && outcomes.damaged > 100);
  // Recovery from damaged journals on disk: the replica stays A, byte for byte.
  for (let i = 0; i < 40; i++) {
    fs.writeFileSync(files.journal, mutate());
    try {
      const res = await recoverReplica(replica);
      t.is(res.action, 'dropped-uncommitted');
      t.false(fs.existsSync(files.journal));
    } catch (e) {
      t.true(e instanceof JournalDamagedError, (e as Error).message);
      t.regex((e as Error).message, /is committed but damaged at byte \d+/);
      t.true((e as Error).message.includes(files.journal));
    }
    if (!matches(replica, sc.A.image)) { sameBytes(t, replica, sc.A.image, `recovery of mutation ${i}`); break; }
  }
  // The intact journal rolls forward.
  fs.writeFileSync(files.journal, journal);
  t.deepEqual(await recoverReplica(replica), { action: 'rolled-forward', snapshotId: 'snap-B' });
  sameBytes(t, replica, sc.B.image, 'after the intact journal');
});

testIf({ root: true, commands: ['losetup'] })('a replica on a block device: kills during the delta and a journaled full', async (t) => {
  const seed = seedFromEnv(t);
  const sc = replicaScenario(seed);
  const dir = scratchDir(t, 'livesnap-replica-');
  const dev = loopDevice(t, sparseFile(path.join(dir, 'disk.img'), VOLUME_SIZE));
  const readDev = () => { const fd = fs.openSync(dev, 'r'); try { const b = Buffer.alloc(VOLUME_SIZE); fs.readSync(fd, b, 0, VOLUME_SIZE, 0); return b; } finally { fs.closeSync(fd); } };
  // Every run starts from a device that holds nothing (its first full is then written in place).
  const reset = () => { const f = replicaFiles(dev); for (const p of [f.meta, f.journal, f.lock]) fs.rmSync(p, { force: true }); };
  t.teardown(reset);
  const dry = child(dev, seed, 'A,B,C', RECORD_ALL);
  t.is(dry.status, 0, dry.stderr);
  t.true(readDev().equals(sc.C.image), 'the uninterrupted run gives C');
  t.true(replicaFiles(dev).meta.includes(`${path.sep}replicas${path.sep}`), 'the state of a device replica is under the state root');
  const b = phaseSteps(dry, 'B', 'C'), c = phaseSteps(dry, 'C');
  const cases: Array<[number, number, Phase, Phase]> = [
    ...[...new Set([b.commit, b.commit + 1, ...pick(rng(seed + 4), b.steps, 3)])].map((n): [number, number, Phase, Phase] => [n, b.commit, sc.A, sc.B]),
    ...[...new Set([c.commit, c.commit + 1, ...pick(rng(seed + 5), c.steps, 3)])].map((n): [number, number, Phase, Phase] => [n, c.commit, sc.B, sc.C]),
  ];
  for (const [n, cm, before, after] of cases) {
    reset();
    const run = child(dev, seed, n > b.steps[b.steps.length - 1]! ? 'A,B,C' : 'A,B', { LIVESNAP_TEST_KILL_AT: `replica:${n}` });
    t.is(run.signal, 'SIGKILL', `step ${n}: ${run.stderr}`);
    const rec = livesnap(['replica', 'recover', dev, '--json']);
    t.is(rec.status, 0, rec.stderr);
    const want = n <= cm ? before : after;
    t.like(status(dev), { state: 'consistent', snapshotId: want.info.backup!.id }, `device, killed at step ${n} (${dry.steps![n - 1]})`);
    t.true(readDev().equals(want.image), `device, killed at step ${n} (${dry.steps![n - 1]}): the device is exactly ${want.name}`);
  }
});
