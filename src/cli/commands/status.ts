import { Command, Option } from 'clipanion';
import { resolveControlPath } from '../../control/protocol';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';
import { controlOption } from './serve';

interface JobInfo { id: string; export: string; to: string; state: string; bytesDone: number; bytesTotal: number; badBlocks: number; containerUsedBytes: number | null; containerCapacityBytes: number | null; writesWaiting: number; worstWriteDelayMs: number; writerPriority?: string; error: string | null; kind?: string; view?: string; uri?: string; livedMs?: number; bytesRead?: number }
interface ExportInfo { name: string; device: string; size: number; cache?: string; socket: string; tcp: string | null; tls?: string | null; connections: number; requests: number; bytesWritten: number; job: JobInfo | null; leftovers?: Array<{ job: string; pid: number; started: string; to: string; cleaned: string[] }> }

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
    const exports = res.exports as ExportInfo[];
    const jobs = res.jobs as JobInfo[];
    const out: string[] = [`daemon pid ${res.pid}, control ${res.control}, I/O ${res.io ?? "?"}`];
    if (!exports.length) out.push('no exports');
    for (const e of exports) {
      for (const l of e.leftovers ?? []) out.push(`  found at serve: what a daemon that died left of backup ${l.job} (pid ${l.pid}, started ${l.started}, to ${l.to}): ${l.cleaned.join('; ') || 'nothing'}`);
      out.push(`export ${e.name}: ${e.device} (${formatBytes(e.size)}, cache ${e.cache ?? 'none'}), ${e.socket}${e.tcp ? `, tcp ${e.tcp} (${e.tls === 'psk' ? 'TLS-PSK' : 'NO TLS'})` : ''}, ${e.connections} client(s), ${formatBytes(e.bytesWritten)} written`);
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
