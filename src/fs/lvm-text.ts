// LVM2's metadata text format (what `vgcfgbackup` writes and what lives in a PV's metadata area):
//   vg0 { id = "..." seqno = 3 extent_size = 8192 physical_volumes { pv0 { pe_start = 2048 } }
//         logical_volumes { lv { segment1 { stripes = ["pv0", 0] } } } }
// Sections hold assignments (key = string | integer | [list]) and sections. Keys are kept in Maps
// (never object properties: a key may be any name), integers must be exact, nesting is bounded.

export type LvmValue = string | number | LvmValue[];
export interface LvmSection {
  values: Map<string, LvmValue>;
  sections: Map<string, LvmSection>;
  /** Names in the order they appeared (sections and values). */
  order: string[];
}

export class LvmTextError extends Error {
  constructor(message: string, readonly line: number) {
    super(`line ${line}: ${message}`);
    this.name = 'LvmTextError';
  }
}

const MAX_DEPTH = 32;
const MAX_LIST = 1 << 20;

const isIdent = (c: number) =>
  (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c === 0x5f || c === 0x2e || c === 0x2b || c === 0x2d;

function emptySection(): LvmSection {
  return { values: new Map(), sections: new Map(), order: [] };
}

/** Parses metadata text (stops at the first NUL, as LVM does). Throws LvmTextError. */
export function parseLvmText(input: string): LvmSection {
  const nul = input.indexOf('\0');
  const text = nul >= 0 ? input.slice(0, nul) : input;
  let i = 0;
  let line = 1;
  const n = text.length;

  const skip = () => {
    while (i < n) {
      const c = text.charCodeAt(i);
      if (c === 0x0a) { line++; i++; continue; }
      if (c === 0x20 || c === 0x09 || c === 0x0d) { i++; continue; }
      if (c === 0x23) { // '#': comment to the end of the line
        while (i < n && text.charCodeAt(i) !== 0x0a) i++;
        continue;
      }
      break;
    }
  };
  const fail = (what: string): never => { throw new LvmTextError(what, line); };

  const ident = (): string => {
    const s = i;
    while (i < n && isIdent(text.charCodeAt(i))) i++;
    if (i === s) fail(`expected a name, found ${i < n ? JSON.stringify(text[i]) : 'the end of the text'}`);
    return text.slice(s, i);
  };

  const value = (depth: number): LvmValue => {
    skip();
    if (i >= n) fail('expected a value, found the end of the text');
    const c = text.charCodeAt(i);
    if (c === 0x22) { // string
      i++;
      let out = '';
      for (;;) {
        if (i >= n) fail('unterminated string');
        const d = text.charCodeAt(i);
        if (d === 0x22) { i++; break; }
        if (d === 0x5c) { // backslash escapes the next character
          if (i + 1 >= n) fail('unterminated string');
          out += text[i + 1];
          i += 2;
          continue;
        }
        if (d === 0x0a) line++;
        out += text[i];
        i++;
      }
      return out;
    }
    if (c === 0x5b) { // list
      if (depth >= MAX_DEPTH) fail('lists nested too deep');
      i++;
      const list: LvmValue[] = [];
      skip();
      if (text.charCodeAt(i) === 0x5d) { i++; return list; }
      for (;;) {
        list.push(value(depth + 1));
        if (list.length > MAX_LIST) fail('list too long');
        skip();
        const d = text.charCodeAt(i);
        if (d === 0x2c) { i++; continue; }
        if (d === 0x5d) { i++; return list; }
        fail(`expected "," or "]" in a list, found ${i < n ? JSON.stringify(text[i]) : 'the end of the text'}`);
      }
    }
    const s = i;
    if (c === 0x2d || c === 0x2b) i++;
    while (i < n && /[0-9.]/.test(text[i]!)) i++;
    const num = text.slice(s, i);
    if (!/^[-+]?[0-9]+(\.[0-9]+)?$/.test(num)) fail(`expected a value, found ${JSON.stringify(text.slice(s, s + 12))}`);
    const v = Number(num);
    if (!num.includes('.') && !Number.isSafeInteger(v)) fail(`integer ${num} is too large to be exact`);
    return v;
  };

  const body = (sec: LvmSection, depth: number, closing: boolean): void => {
    for (;;) {
      skip();
      if (i >= n) {
        if (closing) fail('section not closed ("}" missing)');
        return;
      }
      if (text.charCodeAt(i) === 0x7d) {
        if (!closing) fail('"}" without a section to close');
        i++;
        return;
      }
      const name = ident();
      skip();
      const c = text.charCodeAt(i);
      if (c === 0x3d) {
        i++;
        const v = value(depth);
        if (sec.values.has(name) || sec.sections.has(name)) fail(`"${name}" is given twice`);
        sec.values.set(name, v);
        sec.order.push(name);
      } else if (c === 0x7b) {
        if (depth >= MAX_DEPTH) fail('sections nested too deep');
        i++;
        const child = emptySection();
        body(child, depth + 1, true);
        if (sec.values.has(name) || sec.sections.has(name)) fail(`"${name}" is given twice`);
        sec.sections.set(name, child);
        sec.order.push(name);
      } else {
        fail(`expected "=" or "{" after "${name}", found ${i < n ? JSON.stringify(text[i]) : 'the end of the text'}`);
      }
    }
  };

  const root = emptySection();
  body(root, 0, false);
  return root;
}

// Typed access for the readers: each throws LvmTextError-like messages naming the path.
export class LvmShapeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'LvmShapeError';
  }
}

export function getSection(s: LvmSection, key: string, where: string): LvmSection {
  const v = s.sections.get(key);
  if (!v) throw new LvmShapeError(`${where}: section "${key}" is missing`);
  return v;
}

export function getInt(s: LvmSection, key: string, where: string, opts: { min?: number; optional?: number } = {}): number {
  const v = s.values.get(key);
  if (v === undefined && opts.optional !== undefined) return opts.optional;
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw new LvmShapeError(`${where}: "${key}" is ${v === undefined ? 'missing' : 'not an integer'}`);
  if (v < (opts.min ?? 0)) throw new LvmShapeError(`${where}: "${key}" = ${v} is below ${opts.min ?? 0}`);
  return v;
}

export function getString(s: LvmSection, key: string, where: string, optional = false): string {
  const v = s.values.get(key);
  if (v === undefined && optional) return '';
  if (typeof v !== 'string') throw new LvmShapeError(`${where}: "${key}" is ${v === undefined ? 'missing' : 'not a string'}`);
  return v;
}

export function getStringList(s: LvmSection, key: string, where: string): string[] {
  const v = s.values.get(key);
  if (v === undefined) return [];
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw new LvmShapeError(`${where}: "${key}" is not a list of strings`);
  return v as string[];
}
