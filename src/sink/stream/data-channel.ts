// The far end of the daemon's data channel (an online backup to "--to -"): the archive arrives on a
// socket in whatever pieces the socket gives, and goes to standard output in whole records again
// (a tape or a pipe reader must see the record size the archive was written with).
import * as fs from 'node:fs';
import type { Socket } from 'node:net';
import { outputError } from './record-writer';

/** Copies `sock` to file descriptor `fd` in `recordSize` writes (the last one may be short). */
export async function relayRecords(sock: Socket, fd: number, recordSize: number, where = 'standard output'): Promise<void> {
  let pending: Buffer = Buffer.alloc(0);
  const writeAll = (b: Buffer) => {
    let off = 0;
    while (off < b.length) {
      try {
        off += fs.writeSync(fd, b, off, b.length - off);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') continue;
        sock.destroy();
        throw outputError(e, where);
      }
    }
  };
  for await (const chunk of sock) {
    pending = pending.length ? Buffer.concat([pending, chunk as Buffer]) : (chunk as Buffer);
    const whole = pending.length - (pending.length % recordSize);
    if (whole > 0) {
      for (let o = 0; o < whole; o += recordSize) writeAll(pending.subarray(o, o + recordSize));
      pending = pending.subarray(whole);
    }
  }
  if (pending.length) writeAll(pending);
}
