// "livesnap backup <export>": asks the daemon to back up an export it serves and shows the job's
// events. Ctrl-C (or losing this process) cancels the job unless --detach was given.
import * as path from 'node:path';
import { connectControl, request } from '../control/client';
import type { BackupRequest } from '../control/protocol';
import { relayRecords } from '../sink/stream/data-channel';
import { S3Destination } from '../s3/destination';
import { isS3Url } from '../s3/location';
import type { S3Options } from '../s3/options';
import type { RecordOutput } from '../sink/stream/record-writer';
import { UserError } from '../util/errors';
import { formatBytes, formatRate } from '../util/size';
import type { Reporter } from './reporter';

export async function runOnlineBackupViaDaemon(control: string, req: BackupRequest, r: Reporter, opts: { s3?: S3Options } = {}): Promise<number> {
  // An s3:// target: the daemon streams the archive here (as for --to -) and this command uploads it.
  const s3 = isS3Url(req.to) ? new S3Destination(req.to, opts.s3, { note: (n) => r.info(`note: ${n}`), force: req.force }) : undefined;
  const to = s3 ? s3.where : req.to === '-' || req.to.startsWith('/dev/') || req.to.startsWith('appliance://') || req.to.startsWith('replica://') ? req.to
    : req.to.startsWith('replica:') ? `replica:${path.resolve(req.to.slice('replica:'.length))}` : path.resolve(req.to);
  const c = await request(control, { ...req, to: s3 ? '-' : to, freeze: req.freeze ? path.resolve(req.freeze) : undefined });
  // Closing the connection is how the daemon learns to cancel (the job lives only as long as this CLI).
  let interrupted = false;
  const onSignal = () => { interrupted = true; c.close(); };
  process.once('SIGINT', onSignal);
  let dataDone: Promise<void> = Promise.resolve();
  let dataError: Error | undefined;
  let upload: Promise<RecordOutput> | undefined;
  let resolveSize: (n: number | undefined) => void = () => {};
  const archiveSize = new Promise<number | undefined>((res) => { resolveSize = res; });
  try {
    for await (const m of c.replies) {
      if (m.type === 'event') {
        if (m.event === 'data-channel') {
          if (s3) {
            upload = uploadDataChannel(control, String(m.token), s3, archiveSize);
            dataDone = upload.then(() => {});
          } else {
            dataDone = copyDataChannel(control, String(m.token), req.recordSize ?? 10240);
          }
          // The archive cannot be completed: closing the control connection cancels the job.
          dataDone.catch((e: Error) => { dataError = e; c.close(); });
        } else if (m.event === 'archive-size') {
          resolveSize(typeof m.expectedBytes === 'number' ? m.expectedBytes : undefined);
        } else if (m.event === 'armed') {
          r.event('armed', m);
          r.info(`snapshot armed at ${m.time} (freeze window ${Number(m.freezeMs).toFixed(1)} ms); ${m.output ? `the appliance writes ${m.output}` : `copying ${req.export} to ${to}`}`);
        } else if (m.event === 'progress') {
          r.progress('backup', m.bytesDone as number, m.bytesTotal as number, `${formatBytes(m.bytesDone as number)}/${formatBytes(m.bytesTotal as number)} waiting:${m.writesWaiting}`);
        } else {
          r.event(m.event, m);
        }
      } else if (m.type === 'result') {
        if (m.detached) {
          r.done({ detached: true, job: m.job }, [`backup running in the daemon as job ${m.job}: see "livesnap status", stop it with "livesnap cancel ${m.job}"`]);
          return 0;
        }
        await dataDone;
        if (upload) await (await upload).close();
        const s = m as unknown as Record<string, number> & { badBlocks: number[] };
        if (m.method === 'appliance') {
          r.done({ ...m, type: undefined }, [
            `backup by the appliance complete: ${req.export} -> ${to} (job ${m.job})`,
            `  snapshot      ${m.snapshotTime}, freeze window ${s.freezeMs.toFixed(1)} ms`,
            `  output        ${m.output} on the appliance${m.runStatus !== undefined ? `, exit status ${m.runStatus}` : `, ${formatBytes(s.outputBytes)}`}`,
            `  holds         ${m.filesystem}, ${s.usedBlocks} of ${s.totalBlocks} blocks used, ${formatBytes(s.bytes)}${(m.checksums as { digest: string }).digest ? `; chunk checksums digest ${(m.checksums as { digest: string }).digest}` : ''}`,
            `  writers       worst delay ${s.worstWriteDelayMs.toFixed(1)} ms, ${s.writesDelayed} delayed; ${s.blocksSavedByWriters} originals sent (${formatBytes(s.originalsSentBytes)}), ${s.originalsUsed} used by the appliance`,
          ]);
          return 0;
        }
        r.done({ ...m, type: undefined }, [
          `online backup complete: ${req.export} -> ${to} (job ${m.job})`,
          `  snapshot      ${m.snapshotTime}, freeze window ${s.freezeMs.toFixed(1)} ms`,
          `  file system   ${m.filesystem}, ${s.usedBlocks} of ${s.totalBlocks} blocks used`,
          `  copied        ${formatBytes(s.bytes)} in ${(s.copyMs / 1000).toFixed(2)} s (${formatRate(s.bytes, s.copyMs)})`,
          ...chainLines(m.chain as ChainLine | undefined, s.blockSize),
          ...(m.method === 'hold' ? [holdLine(m.hold as Record<string, number | boolean | string>)] : []),
          `  writers       worst delay ${s.worstWriteDelayMs.toFixed(1)} ms, ${s.writesDelayed} delayed, ${s.blocksSavedByWriters} originals saved to the container (peak ${formatBytes(s.containerPeakBytes)} of ${formatBytes(s.containerCapacityBytes)})`,
          `  bad blocks    ${s.badBlocks.length ? s.badBlocks.slice(0, 20).join(', ') : 'none'}`,
          // eslint-disable-next-line @typescript-eslint/no-require-imports
          ...(require('../fs/layout') as typeof import('../fs/layout')).layoutSummaryLines(m.layout as import('../fs/layout').LayoutNode | undefined),
        ]);
        return 0;
      } else if (m.type === 'error') {
        throw new UserError(m.message, m.hint, m.exitCode ?? 1);
      }
    }
    throw new UserError('the daemon closed the connection before the backup finished', 'see "livesnap status" and the daemon log');
  } catch (e) {
    if (interrupted) throw new UserError('the backup was cancelled (interrupted)', 'the export kept serving; no write was lost', 130);
    // If the data channel failed, this side knows why (the reader went away, a full disk): that is
    // the error, not what the daemon saw of its broken stream, nor the "Premature close" of the
    // control connection closed to cancel the job.
    resolveSize(undefined);
    await dataDone.catch(() => {});
    if (upload) await upload.then((u) => u.destroy(), () => {});
    if (dataError) throw dataError;
    throw e;
  } finally {
    process.off('SIGINT', onSignal);
    c.close();
  }
}

interface ChainLine { id: string; parent: string | null; kind: string; fullBecause?: string; changedBlocks: number; excludedBytes: number; excludedFiles: string[] }

/** The backup's place in its chain, and what the protection map left out. */
function chainLines(c: ChainLine | undefined, blockSize: number): string[] {
  if (!c) return [];
  return [
    `  backup        ${c.kind} ${c.id}${c.parent ? ` (parent ${c.parent}; ${formatBytes(c.changedBlocks * blockSize)} changed since)` : ''}${c.fullBecause ? `: full because ${c.fullBecause}` : ''}`,
    ...(c.excludedBytes || c.excludedFiles.length ? [`  excluded      ${formatBytes(c.excludedBytes)} in ${c.excludedFiles.length} files (${c.excludedFiles.slice(0, 5).join(', ')}${c.excludedFiles.length > 5 ? ', ...' : ''})`] : []),
  ];
}

/** The summary line of --method hold. */
function holdLine(h: Record<string, number | boolean | string>): string {
  const fell = h.fellBack ? `; the hold limit (${formatBytes(Number(h.holdLimitBytes))}) was reached after ${(Number(h.fellBackAfterMs) / 1000).toFixed(1)} s: the rest was copy-before-write` : '';
  return `  hold          ${h.mode}: ${h.heldWrites} writes held (peak ${formatBytes(Number(h.peakHeldBytes))}), longest ${Number(h.maxHoldMs).toFixed(0)} ms, released in ${Number(h.releaseMs).toFixed(0)} ms${fell}`;
}

/**
 * The archive of a "--to -" online backup arrives on a second control connection; it is copied to
 * standard output in whole records (the socket's chunking would otherwise reach a tape or pipe).
 */
async function copyDataChannel(control: string, token: string, recordSize: number): Promise<void> {
  const sock = await connectControl(control);
  sock.write(JSON.stringify({ op: 'data', token }) + '\n');
  await relayRecords(sock, 1, recordSize);
}

/**
 * The data channel of an online backup to s3://: uploaded as it arrives; aborted if it breaks off.
 * Returns the upload still open: it is completed only once the job's result says the archive is whole.
 */
async function uploadDataChannel(control: string, token: string, dest: S3Destination, expectedBytes: Promise<number | undefined>): Promise<RecordOutput> {
  const sock = await connectControl(control);
  sock.write(JSON.stringify({ op: 'data', token }) + '\n');
  // The socket holds the archive (backpressure) until the daemon said how large it will be.
  const out = await dest.open(await expectedBytes);
  let ended = false;
  sock.once('end', () => { ended = true; });
  try {
    for await (const chunk of sock) await out.write(chunk as Buffer);
    // The daemon closes the channel after the archive's last record; a cut (daemon gone) is an error.
    if (!ended) throw new UserError('the archive stream from the daemon broke off', 'see the daemon log');
  } catch (e) {
    await out.destroy();
    throw e;
  }
  return out;
}
