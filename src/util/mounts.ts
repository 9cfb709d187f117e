// What is mounted where, from /proc/self/mountinfo (the kernel's own view, with device numbers).
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface MountEntry {
  major: number;
  minor: number;
  mountPoint: string;
  source: string;
  fsType: string;
  readOnly: boolean;
}

function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

export function readMounts(): MountEntry[] {
  const text = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const [left, right] = line.split(' - ');
    if (!left || !right) continue;
    const f = left.split(' ');
    const [maj, min] = f[2]!.split(':').map(Number);
    const r = right.split(' ');
    const opts = `${f[5]},${r[2] ?? ''}`.split(',');
    out.push({ major: maj!, minor: min!, mountPoint: unescape(f[4]!), fsType: r[0]!, source: unescape(r[1] ?? ''), readOnly: opts.includes('ro') });
  }
  return out;
}

export function mountsOfDevice(major: number, minor: number): MountEntry[] {
  return readMounts().filter((m) => m.major === major && m.minor === minor);
}

/** The mount entry whose mount point is exactly `dir` (after resolving links), if any. */
export function mountAt(dir: string): MountEntry | undefined {
  let real: string;
  try { real = fs.realpathSync(dir); } catch { return undefined; }
  const all = readMounts().filter((m) => m.mountPoint === real);
  return all[all.length - 1]; // the top of a stack of mounts is the one in effect
}

/** Loop devices whose backing file is `file` (so an image file "in use" can be recognised). */
export function loopDevicesBacking(file: string): string[] {
  let real: string;
  try { real = fs.realpathSync(file); } catch { return []; }
  const out: string[] = [];
  let names: string[] = [];
  try { names = fs.readdirSync('/sys/block').filter((n) => n.startsWith('loop')); } catch { return []; }
  for (const n of names) {
    try {
      const b = fs.readFileSync(path.join('/sys/block', n, 'loop/backing_file'), 'utf8').trim();
      if (b === real) out.push(`/dev/${n}`);
    } catch { /* not attached */ }
  }
  return out;
}
