// --writer-priority auto: the copier's pace while clients write, steered by what the clients get.
//
// The aim is the one a user states: clients keep at least half the write rate they had before the
// backup, and within that the backup goes as fast as it can. One disk cannot tell a client that
// writes as fast as it is let (its rate is whatever the backup leaves it) from one that writes at a
// steady rate and falls behind; two signals can:
//  - the clients' rate in the second before arming (the baseline), when no backup was armed then.
//    While the clients get less than TARGET of it the copier steps down; above UP_AT it steps up.
//  - think time: the part of each window the clients leave the export idle between changes. A
//    client with think time is not held back by the backup, so the copier steps up; one with none
//    may be, so without a baseline (clients that start writing during the backup) it steps down.
// One step per window, along a ladder from one 32 KiB read at a time (the `high` preset; one of
// 16 KiB measured no better for clients: SETTINGS=16K:1 bench/online-frontier) to the full-speed
// batches (`low`).

import * as fs from 'node:fs';
import { config } from '../config';
import type { BusyPace } from './writer-priority';
import type { WriteActivity } from '../export/write-activity';

const KiB = 1024;
export const AUTO_LADDER: readonly BusyPace[] = [
  { batchBytes: 32 * KiB, depth: 1 },
  { batchBytes: 64 * KiB, depth: 1 },
  { batchBytes: 128 * KiB, depth: 1 },
  { batchBytes: 256 * KiB, depth: 2 },
  { batchBytes: 512 * KiB, depth: 2 },
  { batchBytes: 1024 * KiB, depth: 2 },
  { batchBytes: 2048 * KiB, depth: 4 },
  { batchBytes: 4096 * KiB, depth: 4 },
];
/** Where a backup starts while clients write: near the bottom, so no client is hurt before we know. */
const START_LEVEL = 0;
export const WINDOW_MS = 200;
/** Share of the baseline rate kept for the clients, and the share above which the copier may speed up. */
export const TARGET = 0.5;
export const UP_AT = 0.62;
/** Think time (share of a window) that lets the copier speed up, and below which it slows down. */
export const THINK_UP = 0.35;
export const THINK_DOWN = 0.25;
/** A baseline under this many changes a second is noise (a trickle of metadata writes). */
const MIN_BASELINE = 50;
/** LIVESNAP_AUTO_TRACE=FILE (the daemon's environment): one line per decision appended to FILE, to see why. */
const trace = (line: string) => { try { fs.appendFileSync(config().autoTrace!, line); } catch { /* a measuring aid only */ } };

export interface AutoPaceStats {
  /** Changes a second before arming, or null (no clean second before the backup). */
  baselineIops: number | null;
  /** The ladder level at the end, and how often the copier stepped up and down. */
  level: number;
  stepsUp: number;
  stepsDown: number;
}

export class AutoPace {
  private level = START_LEVEL;
  private readonly baseline: number | undefined;
  private windowStart: number;
  private completedAt: number;
  private thinkAt: number;
  private stepsUp = 0;
  private stepsDown = 0;

  constructor(private readonly activity: WriteActivity, now: number = performance.now()) {
    const b = activity.baselineRate(now);
    this.baseline = b !== undefined && b >= MIN_BASELINE ? b : undefined;
    if (config().autoTrace) trace(`auto: start, baseline ${this.baseline === undefined ? 'none' : this.baseline.toFixed(0)} changes/s\n`);
    this.windowStart = now;
    this.completedAt = activity.completed;
    this.thinkAt = activity.thinkMs(now);
  }

  /** The pace for the copier's next batch while clients write. */
  pace(now: number = performance.now()): BusyPace {
    if (now - this.windowStart >= WINDOW_MS) this.decide(now);
    return AUTO_LADDER[this.level]!;
  }

  get stats(): AutoPaceStats {
    return { baselineIops: this.baseline === undefined ? null : Math.round(this.baseline), level: this.level, stepsUp: this.stepsUp, stepsDown: this.stepsDown };
  }

  private decide(now: number): void {
    const span = now - this.windowStart;
    const rate = (this.activity.completed - this.completedAt) / (span / 1000);
    const think = this.activity.thinkMs(now);
    const thinkShare = (think - this.thinkAt) / span;
    this.windowStart = now;
    this.completedAt = this.activity.completed;
    this.thinkAt = think;
    const step = autoStep(rate, thinkShare, this.baseline);
    if (config().autoTrace) trace(`auto: ${span.toFixed(0)} ms: ${rate.toFixed(0)} changes/s, think ${thinkShare.toFixed(2)}, level ${this.level}, step ${step}\n`);
    const next = Math.min(AUTO_LADDER.length - 1, Math.max(0, this.level + step));
    if (next > this.level) this.stepsUp++;
    else if (next < this.level) this.stepsDown++;
    this.level = next;
  }
}

/** The decision, written once: +1 faster, -1 slower, 0 hold. */
export function autoStep(rate: number, thinkShare: number, baseline: number | undefined): -1 | 0 | 1 {
  if (thinkShare >= THINK_UP) return 1;
  if (baseline !== undefined) {
    if (rate < TARGET * baseline && thinkShare < THINK_DOWN) return -1;
    if (rate >= UP_AT * baseline) return 1;
    return 0;
  }
  return thinkShare < THINK_DOWN ? -1 : 0;
}
