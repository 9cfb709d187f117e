// Talking to the daemon: send one request, receive its replies line by line.
import * as net from 'node:net';
import { UserError } from '../util/errors';
import type { ControlReply, ControlRequest } from './protocol';

export interface ControlConnection {
  replies: AsyncGenerator<ControlReply>;
  close(): void;
}

export function connectControl(controlPath: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(controlPath);
    s.once('connect', () => { s.off('error', reject); resolve(s); });
    s.once('error', reject);
  });
}

export async function isDaemonRunning(controlPath: string): Promise<boolean> {
  try {
    (await connectControl(controlPath)).destroy();
    return true;
  } catch {
    return false;
  }
}

export async function request(controlPath: string, req: ControlRequest): Promise<ControlConnection> {
  let sock: net.Socket;
  try {
    sock = await connectControl(controlPath);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ECONNREFUSED') {
      throw new UserError(`no livesnap daemon is running (control socket ${controlPath})`, 'start one with "livesnap serve <device>", or give its socket with --control');
    }
    if (code === 'EACCES') throw new UserError(`permission denied on the control socket ${controlPath}`, 'it is owner-only: run as the user who started the daemon (root)');
    throw e;
  }
  sock.write(JSON.stringify(req) + '\n');
  async function* lines(): AsyncGenerator<ControlReply> {
    let buf = '';
    for await (const chunk of sock) {
      buf += (chunk as Buffer).toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) yield JSON.parse(line) as ControlReply;
      }
    }
  }
  return { replies: lines(), close: () => sock.destroy() };
}

/** For requests with one answer: returns the result, throws the daemon's error as a UserError. */
export async function call(controlPath: string, req: ControlRequest): Promise<Record<string, unknown>> {
  const c = await request(controlPath, req);
  try {
    for await (const r of c.replies) {
      if (r.type === 'result') return r;
      if (r.type === 'error') throw new UserError(r.message, r.hint, r.exitCode ?? 1);
    }
    throw new UserError('the daemon closed the connection without an answer', 'see its log (daemon.log next to the control socket)');
  } finally {
    c.close();
  }
}
