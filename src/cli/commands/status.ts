import { Command, Option } from 'clipanion';
import { resolveControlPath } from '../../control/protocol';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';
import { controlOption } from './serve';

interface JobInfo { id: string; export: string; to: string; state: string; bytesDone: number; bytesTotal: number; badBlocks: number; containerUsedBytes: number | null; containerCapacityBytes: number | null; writesWaiting: number; worstWriteDelayMs: number; writerPriority?: string; error: string | null; kind?: string; view?: string; uri?: string; livedMs?: number; bytesRead?: number }
interface ExportInfo { name: string; device: string; size: number; cache?: string; socket: string; tcp: string | null; tls?: string | null; connections: number; requests: number; bytesWritten: number; job: JobInfo | null; leftovers?: Array<{ job: string; pid: number; started: string; to: string; cleaned: string[] }>; changes?: { base: string | null; changedRegions: number; granularity: number; nextBackupFullBecause: string | null } | null }

export class StatusCommand extends LivesnapCommand {
  static override paths = [['status']];
  static override usage = Command.Usage({
    description: 'Show the served exports and their backups',
    details: 'For each export: its device, socket, clients; for each backup job: progress, intermediate container fill, writes waiting now, and the worst write delay so far.',
    examples: [['Show everything', '$0 status'], ['For scripts', '$0 status --json']],
  });
  control = controlOption();

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { call } = require('../../control/client') as typeof import('../../control/client');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const res = await call(resolveControlPath(this.control), { op: 'status' });
    if (this.json) { process.stdout.write(JSON.stringify({ event: 'done', ...res }) + '\n'); return 0; }
    if (res.appliance) { process.stdout.write(applianceLines(res).join('\n') + '\n'); return 0; }
    const exports = res.exports as ExportInfo[];
    const jobs = res.jobs as JobInfo[];
    const out: string[] = [`daemon pid ${res.pid}, control ${res.control}, I/O ${res.io ?? "?"}`];
    if (!exports.length) out.push('no exports');
    for (const e of exports) {
      for (const l of e.leftovers ?? []) out.push(`  found at serve: what a daemon that died left of backup ${l.job} (pid ${l.pid}, started ${l.started}, to ${l.to}): ${l.cleaned.join('; ') || 'nothing'}`);
      out.push(`export ${e.name}: ${e.device} (${formatBytes(e.size)}, cache ${e.cache ?? 'none'}), ${e.socket}${e.tcp ? `, tcp ${e.tcp} (${e.tls === 'psk' ? 'TLS-PSK' : 'NO TLS'})` : ''}, ${e.connections} client(s), ${formatBytes(e.bytesWritten)} written`);
      const c = e.changes;
      if (c) out.push(`  changes since ${c.base ? `backup ${c.base}` : 'no backup yet'}: ${c.changedRegions} regions of ${formatBytes(c.granularity)} (${formatBytes(c.changedRegions * c.granularity)})${c.nextBackupFullBecause ? `; the next backup is full: ${c.nextBackupFullBecause}` : ''}`);
    }
    for (const j of jobs) {
      if (j.kind === 'snapshot') {
        const fill = j.containerCapacityBytes ? `container ${formatBytes(j.containerUsedBytes ?? 0)}/${formatBytes(j.containerCapacityBytes)}` : '';
        out.push(`snapshot ${j.id} of ${j.export}: ${j.state}${j.view ? `, read-only export "${j.view}" (${j.uri})` : ''}, ${((j.livedMs ?? 0) / 1000).toFixed(0)} s old, ${fill}, clients read ${formatBytes(j.bytesRead ?? 0)}, writes waiting ${j.writesWaiting}${j.error ? ` (${j.error})` : ''}`);
        continue;
      }
      const pct = j.bytesTotal ? ((100 * j.bytesDone) / j.bytesTotal).toFixed(1) : '0.0';
      const fill = j.containerCapacityBytes ? `container ${formatBytes(j.containerUsedBytes ?? 0)}/${formatBytes(j.containerCapacityBytes)}` : '';
      out.push(`job ${j.id} -> ${j.to}: ${j.state} ${pct}% ${fill} writes waiting ${j.writesWaiting}, worst write delay ${j.worstWriteDelayMs.toFixed(1)} ms${j.writerPriority && j.writerPriority !== 'auto' ? `, writer priority ${j.writerPriority}` : ''}${j.badBlocks ? `, ${j.badBlocks} bad blocks` : ''}${j.error ? ` (${j.error})` : ''}`);
    }
    process.stdout.write(out.join('\n') + '\n');
    return 0;
  }
}

interface UnitInfo { unit: string; host: string; instant: string; state: string; output: string; bytesDone: number; bytesTotal: number; odcHeldBytes: number; originalsWaiting: number; error?: string }

/** `livesnap status --control` of an appliance (control/appliance-daemon.ts). */
function applianceLines(res: Record<string, unknown>): string[] {
  const odc = res.odc as { description: string; capacityBytes: number; usedBytes: number; peakBytes: number };
  const unit = (u: UnitInfo) => `  ${u.unit} from ${u.host}, instant ${u.instant}: ${u.state}${u.bytesTotal ? ` ${((100 * u.bytesDone) / u.bytesTotal).toFixed(1)}%` : ''} -> ${u.output}; ODC ${formatBytes(u.odcHeldBytes)}${u.originalsWaiting ? `, ${u.originalsWaiting} originals waiting for room` : ''}${u.error ? ` (${u.error})` : ''}`;
  return [
    `appliance pid ${res.pid}, listening on ${res.listen} (TLS-PSK), store ${res.store}`,
    `  LUNs ${Object.entries(res.luns as Record<string, string>).map(([n, p]) => `${n}=${p}`).join(', ')}`,
    `  ODC ${odc.description}: ${formatBytes(odc.usedBytes)} used, peak ${formatBytes(odc.peakBytes)}`,
    ...((res.units as UnitInfo[]).length ? ['units:', ...(res.units as UnitInfo[]).map(unit)] : ['no unit running']),
    ...((res.recent as UnitInfo[]).length ? ['recent:', ...(res.recent as UnitInfo[]).slice(-5).map(unit)] : []),
  ];
}

export class CancelCommand extends LivesnapCommand {
  static override paths = [['cancel']];
  static override usage = Command.Usage({
    description: 'Cancel a running online backup',
    details: 'The snapshot is disarmed at once (waiting writes go on), the container released and the partial target removed. The export keeps serving.',
    examples: [['Cancel by job id or export name', '$0 cancel data-1']],
  });
  job = Option.String({ name: 'job' });
  control = controlOption();

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { call } = require('../../control/client') as typeof import('../../control/client');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const res = await call(resolveControlPath(this.control), { op: 'cancel', job: this.job });
    if (this.json) process.stdout.write(JSON.stringify({ event: 'done', ...res }) + '\n');
    else process.stdout.write(`cancelled ${res.cancelled}\n`);
    return 0;
  }
}
