// Durations as people write them: 30s, 2m, 1500ms, 1h (a plain number is seconds).
import { UserError } from './errors';

const UNITS: Record<string, number> = { ms: 1, '': 1000, s: 1000, m: 60_000, min: 60_000, h: 3_600_000 };

/** Milliseconds. */
export function parseDuration(text: string, what = 'duration'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? m[2]!.toLowerCase() : '';
  if (!m || !(unit in UNITS)) throw new UserError(`${what} "${text}" is not a duration`, 'write it like 30s, 2m or 1500ms');
  const ms = Number(m[1]) * UNITS[unit]!;
  if (!(ms > 0)) throw new UserError(`${what} "${text}" must be more than zero`);
  return ms;
}
