// An export's state directory (serve --state DIR): what must outlive the daemon. Every file is
// versioned, checksummed (XXH3-128 of its JSON) and names the device it belongs to; anything that
// does not match is not trusted and is reported. Here: "export.json" (whose directory this is) and
// one record per running backup job ("jobs/<id>.json": its partial target and container file), so
// that what a killed daemon left behind is found, reported and cleaned at the next serve.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { identify } from '../device/identity';
import { sealed, unsealed } from '../device/sealed-json';
import { writeFileDurably } from '../util/durable-file';
import { UserError } from '../util/errors';

const FORMAT = 'livesnap-state';
const VERSION = 1;

export interface JobRecord {
  job: string;
  export: string;
  /** The daemon that ran it: pid and its start time (see SELF). */
  pid: number;
  pidStart?: string;
  started: string;
  to: string;
  /** Files the job creates, with their identity once made: removed if a dead daemon left them. */
  files: Array<{ path: string; what: 'partial target' | 'container file'; dev?: number; ino?: number }>;
}

export interface Leftover extends JobRecord {
  /** What was done about each file. */
  cleaned: string[];
}

function seal(body: Record<string, unknown>): string {
  return JSON.stringify(sealed({ format: FORMAT, version: VERSION, ...body }), null, 1) + '\n';
}

/** The body of a sealed file, or why it cannot be trusted. */
function unseal(text: string): { body: Record<string, unknown> } | { bad: string } {
  let j: Record<string, unknown>;
  try { j = JSON.parse(text) as Record<string, unknown>; } catch { return { bad: 'not JSON (torn or overwritten)' }; }
  if (j.format !== FORMAT) return { bad: `not a livesnap state file (format ${String(j.format)})` };
  if (j.version !== VERSION) return { bad: `version ${String(j.version)}, this livesnap reads ${VERSION}` };
  const rest = unsealed(j);
  if (!rest) return { bad: 'checksum mismatch' };
  return { body: rest };
}

/** The kernel's start time of process `pid` (clock ticks since boot), or undefined if it is gone or a zombie. */
function processStart(pid: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[0] === 'Z' ? undefined : fields[19];
  } catch { return undefined; }
}

/** This daemon, as job records name it: a pid and its start time (a reused pid is another process). */
export const SELF = { pid: process.pid, start: processStart(process.pid) ?? '' };

const alive = (pid: number, start: string | undefined) => {
  const s = processStart(pid);
  return s !== undefined && (start === undefined || s === start);
};

export class StateDir {
  /** The device this directory belonged to before, when it was taken over from one that is gone. */
  adoptedFrom: string | undefined;
  /** export.json was written now: a new directory (or one taken over, or one not trusted). */
  created = false;

  private constructor(readonly dir: string, readonly device: string) {}

  /**
   * Opens (creates, mode 0700) the state directory of the export of `device` (identified by `key`,
   * its inode or device number). A directory that belongs to another device is refused.
   */
  static async open(dir: string, device: string, key: string): Promise<StateDir> {
    try {
      await fs.promises.mkdir(path.join(dir, 'jobs'), { recursive: true, mode: 0o700 });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const why = code === 'EACCES' || code === 'EPERM' ? `no permission${process.getuid?.() !== 0 ? ' (you are not root)' : ''}` : code === 'EROFS' ? 'the file system is read-only' : (e as Error).message;
      throw new UserError(`cannot create the state directory ${dir}: ${why}`, 'give a writable one with --state DIR (or LIVESNAP_STATE_DIR)');
    }
    const file = path.join(dir, 'export.json');
    let adopted: string | undefined;
    const text = await fs.promises.readFile(file, 'utf8').catch(() => undefined);
    if (text !== undefined) {
      const r = unseal(text);
      if ('body' in r && r.body.key !== key) {
        // Another device's directory: refused while that device is still there; adopted (and said
        // so) once it is gone, as when a disk is replaced and served again under its name.
        const owner = String(r.body.device);
        if (await identityKey(owner) === r.body.key) {
          throw new UserError(`the state directory ${dir} belongs to ${owner}, not to ${device}`, 'give this export its own --state DIR');
        }
        await fs.promises.rename(file, `${file}.previous-${Date.now()}`).catch(() => {});
        adopted = owner;
      }
      if ('bad' in r) await fs.promises.rename(file, `${file}.untrusted-${Date.now()}`).catch(() => {});
    }
    if (text === undefined || adopted !== undefined || 'bad' in unseal(text)) await writeFileDurably(file, seal({ kind: 'export', device, key, created: new Date().toISOString() }));
    const sd = new StateDir(dir, device);
    sd.adoptedFrom = adopted;
    sd.created = text === undefined || adopted !== undefined;
    return sd;
  }

  private jobFile(id: string): string {
    return path.join(this.dir, 'jobs', `${id}.json`);
  }

  async recordJob(rec: JobRecord): Promise<void> {
    await writeFileDurably(this.jobFile(rec.job), seal({ kind: 'job', device: this.device, ...rec }));
  }

  async dropJob(id: string): Promise<void> {
    await fs.promises.rm(this.jobFile(id), { force: true });
  }

  /**
   * Jobs of daemons that are gone: their partial targets and container files are removed (only if
   * still the very file the job made: same device and inode), and the records dropped.
   */
  async collectLeftovers(): Promise<Leftover[]> {
    const out: Leftover[] = [];
    const names = await fs.promises.readdir(path.join(this.dir, 'jobs')).catch(() => [] as string[]);
    for (const n of names.filter((x) => x.endsWith('.json'))) {
      const file = path.join(this.dir, 'jobs', n);
      const r = unseal(await fs.promises.readFile(file, 'utf8').catch(() => ''));
      if ('bad' in r) {
        out.push({ job: n.replace(/\.json$/, ''), export: '', pid: 0, started: '', to: '', files: [], cleaned: [`job record not trusted (${r.bad}): left as ${file}.untrusted`] });
        await fs.promises.rename(file, `${file}.untrusted`).catch(() => {});
        continue;
      }
      const rec = r.body as unknown as JobRecord;
      if (rec.pid === process.pid || alive(rec.pid, rec.pidStart)) continue; // a running job of a live daemon
      const cleaned: string[] = [];
      for (const f of rec.files ?? []) {
        const st = await fs.promises.lstat(f.path).catch(() => undefined);
        if (!st) { cleaned.push(`${f.what} ${f.path}: already gone`); continue; }
        // Identified: the very file the job made. Not yet identified (the daemon died before it could
        // say): a regular file made after the job started at the path it reserved.
        const ours = st.isFile() && (f.ino !== undefined ? st.ino === f.ino && st.dev === f.dev : st.ctimeMs >= Date.parse(rec.started) - 1000);
        if (!ours) { cleaned.push(`${f.what} ${f.path}: left alone (not the file the job made)`); continue; }
        await fs.promises.rm(f.path, { force: true });
        cleaned.push(`${f.what} ${f.path}: removed`);
      }
      out.push({ ...rec, cleaned });
      await fs.promises.rm(file, { force: true });
    }
    return out;
  }
}

/** The key a device is recorded under (its file's dev:ino, or its major:minor), if it exists now. */
export async function identityKey(p: string): Promise<string | undefined> {
  const id = await identify(p);
  return id.files[0] ?? id.devices[0];
}
