// --writer-priority auto: the decision (autoStep), what it is fed (WriteActivity: the clients' rate,
// their think time, the baseline from before the backup), and how AutoPace moves along the ladder.
// Pure policy: time is passed in, so each case is exact; the data path under auto is covered by the
// exactness tests (online-exact.test.ts, default priority) and measured by bench/online-frontier.
import test from 'ava';
import { AUTO_LADDER, AutoPace, autoStep, TARGET, THINK_DOWN, THINK_UP, UP_AT, WINDOW_MS } from '../src/snapshot/auto-pace';
import { BASELINE_WINDOW_MS, THINK_GAP_MS, WriteActivity } from '../src/export/write-activity';

test('autoStep: think time speeds up; under the target without think time slows down; between holds', (t) => {
  t.is(autoStep(100, THINK_UP, 1000), 1, 'clients idle a third of the time are not held back');
  t.is(autoStep(100, THINK_UP, undefined), 1);
  t.is(autoStep(TARGET * 1000 - 1, 0, 1000), -1, 'below half the baseline');
  t.is(autoStep(TARGET * 1000 - 1, THINK_DOWN, 1000), 0, 'below the target but with some think time: hold');
  t.is(autoStep(UP_AT * 1000, 0, 1000), 1, 'comfortably above the target');
  t.is(autoStep((TARGET + UP_AT) / 2 * 1000, 0, 1000), 0, 'in the band');
  t.is(autoStep(50_000, 0, undefined), -1, 'no baseline, no think time: the client may be held back');
  t.is(autoStep(50_000, (THINK_DOWN + THINK_UP) / 2, undefined), 0);
});

/** Drives `a` with a client that writes back to back (service ms each, gap ms between) from t0 to t1. */
function client(a: WriteActivity, t0: number, t1: number, serviceMs: number, gapMs: number): number {
  let now = t0;
  while (now < t1) {
    a.enter(now);
    now += serviceMs;
    a.exit(now);
    now += gapMs;
  }
  return now;
}

test('WriteActivity: think time counts only gaps of at least THINK_GAP_MS', (t) => {
  const a = new WriteActivity(0);
  client(a, 0, 100, 0.1, THINK_GAP_MS / 2);
  t.is(a.thinkMs(100), 0, 'a client\'s own turnaround is not think time');
  const b = new WriteActivity(0);
  const end = client(b, 0, 100, 0.5, 0.5);
  t.true(Math.abs(b.thinkMs(end - 0.5) - 50) < 1, `half the time idle: ${b.thinkMs(end - 0.5)} ms of 100`);
  t.true(b.thinkMs(end + 10) > b.thinkMs(end - 0.5) + 9, 'the gap open now counts too');
});

test('WriteActivity: the baseline is the rate of the second before, only without a backup in it', (t) => {
  const a = new WriteActivity(0);
  client(a, 0, 2000, 0.05, 0.05); // 10000 changes a second
  const r = a.baselineRate(2000)!;
  t.true(Math.abs(r - 10000) <= 100, `baseline ${r}`);
  a.setArmed(true, 2000);
  t.is(a.baselineRate(2100), undefined, 'armed');
  a.setArmed(false, 2200);
  client(a, 2200, 2200 + BASELINE_WINDOW_MS - 100, 0.05, 0.05);
  t.is(a.baselineRate(2200 + BASELINE_WINDOW_MS - 50), undefined, 'the last second saw a backup');
  t.truthy(a.baselineRate(2200 + BASELINE_WINDOW_MS + 1), 'a second later it counts');

  const quiet = new WriteActivity(0);
  client(quiet, 5000, 5250, 0.1, 0.9); // a client that started 250 ms ago at 1000/s
  const q = quiet.baselineRate(5300);
  t.true(q !== undefined && Math.abs(q - 1000) <= 20, `a client that just started is not averaged with the quiet part: ${q}`);
  const few = new WriteActivity(0);
  client(few, 5000, 5150, 0.1, 0.9);
  t.is(few.baselineRate(5300), undefined, 'under three active 100 ms buckets: no baseline');
});

/** Runs AutoPace for `windows` windows against a client model; returns the levels seen. */
function steer(baselinePerSec: number | undefined, clientAt: (level: number, window: number) => { serviceMs: number; gapMs: number }, windows: number): number[] {
  const a = new WriteActivity(0);
  let now = 0;
  if (baselinePerSec !== undefined) now = client(a, 0, 1500, 1000 / baselinePerSec / 2, 1000 / baselinePerSec / 2);
  now += 10;
  const pace = new AutoPace(a, now);
  const levels: number[] = [];
  for (let w = 0; w < windows; w++) {
    const level = AUTO_LADDER.indexOf(pace.pace(now));
    levels.push(level);
    const m = clientAt(level, w);
    now = client(a, now, now + WINDOW_MS, m.serviceMs, m.gapMs);
  }
  levels.push(AUTO_LADDER.indexOf(pace.pace(now)));
  return levels;
}

test('AutoPace: a client that writes back to back brings the copier down to the bottom of the ladder', (t) => {
  // First a light client (mostly think time), so the copier climbs; then one that writes back to
  // back, each write slower the higher the level (0.1 ms at the bottom, 0.1 ms more per level).
  const levels = steer(undefined, (l, w) => (w < 6 ? { serviceMs: 0.2, gapMs: 1.8 } : { serviceMs: 0.1 * (l + 1), gapMs: 0.05 }), 30);
  t.true(levels[6]! >= 4, `it climbed while the client had think time: ${levels.join(' ')}`);
  t.is(Math.max(...levels.slice(6 + levels[6]! + 1)), 0, `and came down, one step a window, to stay: ${levels.join(' ')}`);
});

test('AutoPace: a light steady client lets the copier climb to full speed', (t) => {
  // 500 writes a second, each 0.2 ms whatever the level: mostly think time.
  const levels = steer(500, () => ({ serviceMs: 0.2, gapMs: 1.8 }), 12);
  t.is(levels[levels.length - 1], AUTO_LADDER.length - 1, levels.join(' '));
});

test('AutoPace: a steady client that falls behind settles where it keeps about half its baseline', (t) => {
  // Baseline 2000/s. At level l the client gets 2000 / (1 + 0.3 l) a second, with no think time
  // once it falls behind: half its rate is between levels 3 and 4.
  const levels = steer(2000, (l) => ({ serviceMs: (1 + 0.3 * l) * 0.5 - 0.01, gapMs: 0.01 }), 40);
  const tail = levels.slice(-10);
  t.true(tail.every((l) => l >= 2 && l <= 5), tail.join(' '));
});
