// A whole Bacula site for tests, all on 127.0.0.1 on free ports, all in one scratch directory:
// bacula-dir with its own sqlite3 catalog (made by the Debian package's make_sqlite3_tables),
// bacula-sd with a File device, bacula-fd with the bpipe plugin, and a bconsole.conf. The three
// daemons run in the foreground (-f -c CONF) as children of the test; nothing in /etc/bacula, the
// machine's Bacula services or their ports is used or touched.
//
// Each job is a bpipe FileSet: the file daemon runs `livesnap backup DEVICE --to -` and stores its
// standard output as the one file /livesnap/NAME.tar (livesnap's stderr goes to the job log); a
// restore feeds that file to `mkdir -p %w && livesnap restore - --to %w/NAME.img`, where bpipe
// replaces %w with the restore's "where". bpipe runs both commands with /bin/sh -c and itself
// creates nothing under "where": the writer command decides where the data goes.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { BIN } from './cli';

/** Commands a test needs for a site (testIf's `commands`). */
export const BACULA_COMMANDS = ['bacula-dir', 'bacula-sd', 'bacula-fd', 'bconsole', 'sqlite3'];
/** Where Debian's bacula-fd puts bpipe-fd.so. */
export const PLUGIN_DIR = '/usr/lib/bacula';
/** The catalog schema script of bacula-director-sqlite3 (it cds to /var/lib/bacula: rewritten). */
export const MAKE_TABLES = '/usr/share/bacula-director/make_sqlite3_tables';

export interface BpipeJob {
  /** Names the backup Job ("backup-NAME"), its FileSet ("fs-NAME"), the catalog file
   *  /livesnap/NAME.tar and the restored image WHERE/NAME.img. */
  name: string;
  /** What livesnap backs up: `livesnap backup DEVICE --to -`. */
  device: string;
  /** More `livesnap backup` arguments. */
  backupArgs?: string[];
  /** A director-side RunScript run after the job (RunsWhen = After, RunsOnFailure = yes): a
   *  command with Bacula's codes (%i JobId, %E non-fatal errors, %b bytes, %e exit status ...). */
  after?: string;
  /** A client-side RunScript run before the job with FailJobOnError (e.g. `livesnap backup ... --check`). */
  before?: string;
}

export interface JobResult {
  jobId: number;
  /** The catalog's JobStatus letter (T, E, f, A, ...). */
  status: string;
  /** JobBytes and JobFiles from the catalog. */
  bytes: number;
  files: number;
  /** JobErrors from the catalog (the report's "Non-fatal FD errors" of a backup). */
  errors: number;
  /** The report's last line, e.g. "Backup OK -- with warnings". */
  termination: string;
  /** Every message of this job (from the director's append file), in order. */
  log: string;
}

const DIR_NAME = 'lstest-dir', FD_NAME = 'lstest-fd', SD_NAME = 'lstest-sd';

async function freePorts(n: number): Promise<number[]> {
  const servers: net.Server[] = [];
  try {
    for (let i = 0; i < n; i++) {
      const s = net.createServer();
      await new Promise<void>((resolve, reject) => { s.once('error', reject); s.listen(0, '127.0.0.1', resolve); });
      servers.push(s);
    }
    return servers.map((s) => (s.address() as net.AddressInfo).port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect({ host: '127.0.0.1', port });
    c.once('connect', () => { c.destroy(); resolve(true); });
    c.once('error', () => resolve(false));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** bpipe splits its plugin string at ':' and runs the commands without a shell. */
function bpipeWord(s: string, what: string): string {
  if (/[:"\s]/.test(s)) throw new Error(`${what} "${s}" cannot go into a bpipe plugin string (no ':', quotes or spaces)`);
  return s;
}

/** The FileSet line of a job (also what the README shows, with "livesnap" for `node BIN`). */
export function bpipePlugin(job: BpipeJob, livesnap = `${bpipeWord(process.execPath, 'node')} ${bpipeWord(BIN, 'livesnap')}`): string {
  const name = bpipeWord(job.name, 'job name');
  const backup = ['backup', bpipeWord(job.device, 'device'), ...(job.backupArgs ?? []).map((a) => bpipeWord(a, 'argument')), '--to', '-'];
  return `bpipe:/livesnap/${name}.tar:${livesnap} ${backup.join(' ')}:mkdir -p %w && ${livesnap} restore - --to %w/${name}.img`;
}

export class BaculaSite {
  readonly workDir: string;
  readonly log: string;
  private readonly conf: { dir: string; sd: string; fd: string; console: string };
  private children: Array<{ name: string; child: ChildProcess; exited: Promise<void>; error?: Error }> = [];
  private ports: { dir: number; fd: number; sd: number } = { dir: 0, fd: 0, sd: 0 };

  constructor(readonly dir: string, readonly jobs: BpipeJob[]) {
    this.workDir = path.join(dir, 'working');
    this.log = path.join(dir, 'jobs.log');
    this.conf = { dir: path.join(dir, 'bacula-dir.conf'), sd: path.join(dir, 'bacula-sd.conf'), fd: path.join(dir, 'bacula-fd.conf'), console: path.join(dir, 'bconsole.conf') };
  }

  /** Writes the configuration and the catalog, starts the three daemons and waits until they listen. */
  async start(): Promise<void> {
    if (!fs.existsSync(path.join(PLUGIN_DIR, 'bpipe-fd.so'))) throw new Error(`no ${PLUGIN_DIR}/bpipe-fd.so (Debian's bacula-fd has it)`);
    const [dir, fd, sd] = await freePorts(3);
    this.ports = { dir: dir!, fd: fd!, sd: sd! };
    for (const d of ['working', 'run', 'storage', 'restores']) fs.mkdirSync(path.join(this.dir, d), { recursive: true });
    this.makeCatalog();
    this.writeConfig();
    for (const [name, conf] of [['bacula-sd', this.conf.sd], ['bacula-fd', this.conf.fd], ['bacula-dir', this.conf.dir]] as const) {
      const t = spawnSync(name, ['-t', '-c', conf], { encoding: 'utf8' });
      if (t.status !== 0) throw new Error(`${name} -t -c ${conf}: ${t.stdout}${t.stderr}`);
    }
    this.spawnDaemon('bacula-sd', this.conf.sd, this.ports.sd);
    this.spawnDaemon('bacula-fd', this.conf.fd, this.ports.fd);
    await this.waitListening('bacula-sd', this.ports.sd);
    await this.waitListening('bacula-fd', this.ports.fd);
    this.spawnDaemon('bacula-dir', this.conf.dir, this.ports.dir);
    await this.waitListening('bacula-dir', this.ports.dir);
  }

  /** Stops the daemons this site started, each with its process group (so a livesnap still running
   *  under bpipe-fd goes too): SIGTERM, SIGKILL after 10 s; waits for them. */
  async stop(): Promise<void> {
    const all = this.children.reverse();
    this.children = [];
    await Promise.all(all.map(async ({ child, exited, error }) => {
      if (error || child.pid === undefined) return;
      if (child.exitCode !== null || child.signalCode !== null) return;
      // The group is signalled while its leader still lives, so its id cannot belong to anyone else.
      const group = (signal: NodeJS.Signals) => { try { process.kill(-child.pid!, signal); } catch { child.kill(signal); } };
      group('SIGTERM');
      const done = await Promise.race([exited.then(() => true), sleep(10_000).then(() => false)]);
      if (!done) { group('SIGKILL'); await exited; }
    }));
  }

  /** Runs bconsole with `commands` on its standard input; returns what it printed. */
  bconsole(commands: string): string {
    const r = spawnSync('bconsole', ['-c', this.conf.console], { input: commands.endsWith('\n') ? commands : commands + '\n', encoding: 'utf8', timeout: 60_000 });
    if (r.status !== 0) throw new Error(`bconsole exited ${r.status ?? r.signal}: ${r.stdout}${r.stderr}`);
    return r.stdout;
  }

  /** Runs a Job resource unattended and waits for its end. */
  async runJob(name: string, timeoutMs = 240_000): Promise<JobResult> {
    const out = this.bconsole(`run job=${name} yes`);
    return this.waitJob(queuedId(out), timeoutMs);
  }

  /** Restores every file of backup job `jobId` with the given "where" (bpipe: %w of the writer). */
  async restore(jobId: number, where: string, timeoutMs = 240_000): Promise<JobResult> {
    bpipeWord(where, 'where');
    const out = this.bconsole(`restore jobid=${jobId} where=${where} all done yes`);
    return this.waitJob(queuedId(out), timeoutMs);
  }

  /** Polls the catalog until the job has ended, then collects its record and its messages. */
  async waitJob(jobId: number, timeoutMs = 240_000): Promise<JobResult> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const rec = this.jobRecord(jobId);
      // Ended: an EndTime and a final JobStatus (T, E, e, f, A; W exists in later Bacula versions).
      if (rec.EndTime && /^[TEefAW]$/.test(rec.JobStatus ?? '')) {
        // The catalog has its end before the job's After RunScripts run: `wait jobid=N` returns once
        // the job is gone from the director (quick by now).
        this.bconsole(`wait jobid=${jobId}`);
        // The report is the job's last message: wait for it in the log so the result is whole.
        let log = this.jobLog(jobId);
        for (let i = 0; i < 50 && !/Termination:/.test(log); i++) { await sleep(100); log = this.jobLog(jobId); }
        return {
          jobId,
          status: rec.JobStatus!,
          bytes: Number(rec.JobBytes),
          files: Number(rec.JobFiles),
          errors: Number(rec.JobErrors),
          termination: /^\s*Termination:\s+(.*)$/m.exec(log)?.[1]?.trim() ?? '',
          log,
        };
      }
      if (Date.now() > end) {
        this.bconsole(`cancel jobid=${jobId} yes`);
        throw new Error(`Bacula job ${jobId} did not end in ${timeoutMs} ms (status ${rec.JobStatus}); log:\n${this.jobLog(jobId)}`);
      }
      await sleep(500);
    }
  }

  /** The catalog's record of a job (`llist jobid=N`), field by field. */
  jobRecord(jobId: number): Record<string, string> {
    const out = this.bconsole(`llist jobid=${jobId}`);
    const rec: Record<string, string> = {};
    for (const m of out.matchAll(/^\s*([A-Za-z]+): ?(.*)$/gm)) rec[m[1]!] = m[2]!.trim();
    return rec;
  }

  /** The messages of one job from the director's append file ("DD-Mon HH:MM daemon JobId N: ..."). */
  jobLog(jobId: number): string {
    let text = '';
    try { text = fs.readFileSync(this.log, 'utf8'); } catch { return ''; }
    const head = /^\d{2}-[A-Za-z]{3}(?:-\d{2,4})? \d{2}:\d{2}(?::\d{2})? \S+ JobId (\d+): /;
    const keep: string[] = [];
    let mine = false;
    for (const line of text.split('\n')) {
      const m = head.exec(line);
      if (m) mine = Number(m[1]) === jobId;
      if (mine) keep.push(line);
    }
    return keep.join('\n');
  }

  private spawnDaemon(name: string, conf: string, port: number): void {
    const out = fs.openSync(path.join(this.dir, `${name}.out`), 'a');
    // stdio to a file, not a pipe: a daemon must never block on output nobody reads.
    // Its own process group: at stop, what it started (a livesnap that bpipe-fd runs) goes with it.
    const child = spawn(name, ['-f', '-c', conf], { stdio: ['ignore', out, out], detached: true });
    fs.closeSync(out);
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    const entry = { name: `${name}:${port}`, child, exited, error: undefined as Error | undefined };
    child.once('error', (e) => { entry.error = e; });
    this.children.push(entry);
  }

  private async waitListening(name: string, port: number): Promise<void> {
    const entry = this.children.find((c) => c.name === `${name}:${port}`)!;
    const end = Date.now() + 15_000;
    while (!(await canConnect(port))) {
      const output = () => { try { return fs.readFileSync(path.join(this.dir, `${name}.out`), 'utf8'); } catch { return ''; } };
      if (entry.error) throw new Error(`${name} did not start: ${entry.error.message}`);
      if (entry.child.exitCode !== null || entry.child.signalCode !== null) throw new Error(`${name} exited at start: ${output()}`);
      if (Date.now() > end) throw new Error(`${name} does not listen on 127.0.0.1:${port} after 15 s: ${output()}`);
      await sleep(100);
    }
  }

  private makeCatalog(): void {
    const script = fs.readFileSync(MAKE_TABLES, 'utf8');
    if (!/^cd \/var\/lib\/bacula$/m.test(script) || !script.includes('XXX_DBNAME_XXX')) throw new Error(`${MAKE_TABLES} no longer has the lines this helper rewrites`);
    const ours = path.join(this.dir, 'make_sqlite3_tables');
    fs.writeFileSync(ours, script.replace(/^cd \/var\/lib\/bacula$/m, `cd '${this.workDir}'`).replace(/XXX_DBNAME_XXX/g, 'bacula'));
    const r = spawnSync('sh', [ours], { encoding: 'utf8' });
    if (r.status !== 0 || !fs.existsSync(path.join(this.workDir, 'bacula.db'))) throw new Error(`catalog not made: ${r.stdout}${r.stderr}`);
  }

  private writeConfig(): void {
    const d = this.dir, w = this.workDir, run = path.join(d, 'run');
    const q = (s: string) => { if (s.includes('"')) throw new Error(`no quotes in Bacula configuration values: ${s}`); return `"${s}"`; };
    const queryFile = path.join(d, 'query.sql');
    fs.writeFileSync(queryFile, '');
    const jobs = this.jobs.map((j) => `
FileSet {
  Name = "fs-${j.name}"
  Include {
    Plugin = ${q(bpipePlugin(j))}
  }
}
Job {
  Name = "backup-${j.name}"
  Type = Backup
  Level = Full
  Client = ${FD_NAME}
  FileSet = "fs-${j.name}"
  Storage = File
  Pool = Default
  Messages = Standard${j.before ? `
  RunScript {
    RunsWhen = Before
    RunsOnClient = yes
    FailJobOnError = yes
    Command = ${q(j.before)}
  }` : ''}${j.after ? `
  RunScript {
    RunsWhen = After
    RunsOnClient = no
    RunsOnFailure = yes
    Command = ${q(j.after)}
  }` : ''}
}`).join('\n');
    fs.writeFileSync(this.conf.dir, `# generated by test/helpers/bacula.ts
Director {
  Name = ${DIR_NAME}
  DIRport = ${this.ports.dir}
  DirAddress = 127.0.0.1
  QueryFile = ${q(queryFile)}
  WorkingDirectory = ${q(w)}
  PidDirectory = ${q(run)}
  Maximum Concurrent Jobs = 1
  Password = "dir-secret"
  Messages = Daemon
}
Catalog {
  Name = Catalog
  dbname = "bacula"; dbuser = ""; dbpassword = ""
}
Messages {
  Name = Daemon
  append = ${q(path.join(d, 'daemon.log'))} = all, !skipped
}
Messages {
  Name = Standard
  append = ${q(this.log)} = all, !skipped
  catalog = all, !skipped, !saved
}
Storage {
  Name = File
  Address = 127.0.0.1
  SDPort = ${this.ports.sd}
  Password = "sd-secret"
  Device = FileStorage
  Media Type = File
}
Pool {
  Name = Default
  Pool Type = Backup
  Label Format = "Vol-"
  AutoPrune = no
  Recycle = no
}
Client {
  Name = ${FD_NAME}
  Address = 127.0.0.1
  FDPort = ${this.ports.fd}
  Catalog = Catalog
  Password = "fd-secret"
  AutoPrune = no
}
Job {
  Name = "restore"
  Type = Restore
  Client = ${FD_NAME}
  FileSet = "fs-${this.jobs[0]?.name ?? 'none'}"
  Storage = File
  Pool = Default
  Messages = Standard
  Where = ${q(path.join(d, 'restores'))}
}
${jobs}
`);
    fs.writeFileSync(this.conf.sd, `# generated by test/helpers/bacula.ts
Storage {
  Name = ${SD_NAME}
  SDPort = ${this.ports.sd}
  SDAddress = 127.0.0.1
  WorkingDirectory = ${q(w)}
  PidDirectory = ${q(run)}
  Maximum Concurrent Jobs = 5
}
Director {
  Name = ${DIR_NAME}
  Password = "sd-secret"
}
Device {
  Name = FileStorage
  Media Type = File
  Archive Device = ${q(path.join(d, 'storage'))}
  LabelMedia = yes
  Random Access = yes
  AutomaticMount = yes
  RemovableMedia = no
  AlwaysOpen = no
}
Messages {
  Name = Standard
  director = ${DIR_NAME} = all
}
`);
    fs.writeFileSync(this.conf.fd, `# generated by test/helpers/bacula.ts
FileDaemon {
  Name = ${FD_NAME}
  FDport = ${this.ports.fd}
  FDAddress = 127.0.0.1
  WorkingDirectory = ${q(w)}
  PidDirectory = ${q(run)}
  Plugin Directory = ${q(PLUGIN_DIR)}
  Maximum Concurrent Jobs = 5
}
Director {
  Name = ${DIR_NAME}
  Password = "fd-secret"
}
Messages {
  Name = Standard
  director = ${DIR_NAME} = all, !skipped, !restored
}
`);
    fs.writeFileSync(this.conf.console, `# generated by test/helpers/bacula.ts
Director {
  Name = ${DIR_NAME}
  DIRport = ${this.ports.dir}
  Address = 127.0.0.1
  Password = "dir-secret"
}
`);
  }
}

function queuedId(out: string): number {
  const m = /Job queued\. JobId=(\d+)/.exec(out);
  if (!m) throw new Error(`bconsole queued no job:\n${out}`);
  return Number(m[1]);
}

/** A started site in `dir` whose daemons are stopped at teardown (also when the test fails). */
export async function baculaSite(t: ExecutionContext, dir: string, jobs: BpipeJob[]): Promise<BaculaSite> {
  const site = new BaculaSite(dir, jobs);
  t.teardown(() => site.stop());
  await site.start();
  return site;
}
