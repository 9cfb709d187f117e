// The durable hold log (--hold-log PATH[:SIZE], like a ZFS SLOG on another device): a held change is
// appended here and acknowledged once it is on stable storage, so writers run at the log's speed
// while nothing touches the source device. Appends are grouped: while one group is being written
// (O_DSYNC), the next collects, and every change of a group is acknowledged after its sync.
// The log is self-describing:
//   header (4096 bytes)  "LSNP-HOLD-LOG-1\n", u32 JSON length, u32 crc32(JSON), JSON {device, size, created}
//   records              u32 magic, u8 kind, u8 flags, u16 0, u64 seq (1, 2, 3, ...), u64 offset,
//                        u32 length, u32 crc32(payload), u32 epoch (the header's: a record of an older
//                        use of the same log is never taken), u32 crc32(bytes 0..35), then the payload
// A record is complete when both checksums hold and its seq follows the previous one; recovery stops
// at the first that is not (a torn tail: never acknowledged). The export's state directory holds
// "hold-log.json" naming the log while it may hold changes the device lacks; `serve` finds it and
// replays every complete record in order before serving.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import type { NbdBackend } from '../nbd/backend';
import { syncDir, writeFileDurably } from '../util/durable-file';
import { UserError } from '../util/errors';
import { parseSize } from '../util/size';

const MAGIC = Buffer.from('LSNP-HOLD-LOG-1\n', 'latin1');
const HEADER = 4096;
const REC = 40;
const REC_MAGIC = 0x52484c53;
const KINDS = { write: 1, trim: 2, zeroes: 3 } as const;
export type LoggedKind = keyof typeof KINDS;
const REF = 'hold-log.json';
/** --hold-log default size when none is given. */
export const DEFAULT_HOLD_LOG_BYTES = 1 << 30;

export interface HoldLogSpec { path: string; size: number }

/** What names the device in a log's header: its file (dev:ino) or block device (major:minor). */
export function holdLogDevice(identity: { files: ReadonlyArray<string>; devices: ReadonlyArray<string> }, devicePath: string, size: number): { path: string; key: string; size: number } {
  return { path: devicePath, key: identity.files[0] ?? identity.devices[0] ?? devicePath, size };
}

/** "PATH[:SIZE]" of --hold-log. */
export function parseHoldLog(text: string): HoldLogSpec {
  const m = /^(.*?)(?::(\d+(?:\.\d+)?[KMGT]?i?B?))?$/i.exec(text);
  const p = m?.[1] ?? '';
  if (!p) throw new UserError(`--hold-log ${text}: give a file path, optionally :SIZE`, 'e.g. --hold-log /ssd/data.holdlog:4G');
  const size = m?.[2] !== undefined ? parseSize(m[2], '--hold-log') : DEFAULT_HOLD_LOG_BYTES;
  if (size < HEADER + 64 * 1024) throw new UserError(`--hold-log ${text}: at least 64K of room is needed`, 'e.g. --hold-log /ssd/data.holdlog:1G');
  return { path: path.resolve(p), size };
}

interface Pending { start: number; buf: Buffer[]; bytes: number; waiters: Array<{ resolve: (pos: number | undefined) => void; pos: number }> }

export interface HoldLogStats { records: number; bytes: number; capacity: number; syncs: number; full: boolean }

export class HoldLog {
  /** Durable up to here. */
  private tail = HEADER;
  /** Appended (in a group being written, or collecting) up to here. */
  private reserved = HEADER;
  private seq = 0;
  private next: Pending = { start: HEADER, buf: [], bytes: 0, waiters: [] };
  private writing: Promise<void> | undefined;
  private broken = false;
  private full = false;
  private syncs = 0;

  private constructor(private readonly fh: fs.promises.FileHandle, readonly spec: HoldLogSpec, private readonly refFile: string, private readonly epoch: number) {}

  /** Creates (or empties) the log, writes its header durably, and names it in the state directory. */
  static async create(spec: HoldLogSpec, stateDir: string, device: { path: string; key: string; size: number }): Promise<HoldLog> {
    // O_DSYNC: a group is durable when its writev returns, one trip to the thread pool instead of
    // two (writev, then fdatasync): under a backup's load each trip costs a thread wake-up.
    const fh = await fs.promises.open(spec.path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_DSYNC, 0o600).catch((e: NodeJS.ErrnoException) => {
      throw new UserError(`--hold-log ${spec.path}: ${e.message}`, 'give a file on another fast device (an SSD), in a directory that exists');
    });
    try {
      const epoch = (Math.random() * 0xffffffff) >>> 0;
      const json = Buffer.from(JSON.stringify({ device: device.path, key: device.key, size: device.size, epoch, created: new Date().toISOString() }));
      const h = Buffer.alloc(HEADER);
      MAGIC.copy(h, 0);
      h.writeUInt32LE(json.length, 16);
      h.writeUInt32LE(zlib.crc32(json), 20);
      json.copy(h, 24);
      await fh.truncate(0).catch(() => { /* a block device: records of an older use carry another epoch */ });
      await fh.write(h, 0, HEADER, 0);
      await fh.datasync();
      const ref = path.join(stateDir, REF);
      await writeRef(ref, { log: spec.path, device: device.path, key: device.key });
      return new HoldLog(fh, spec, ref, epoch);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  /**
   * Appends one change; resolves once it is durable with the payload's position in the log, or with
   * undefined when the log has no room or failed (the change is then held in memory: never failed).
   */
  append(kind: LoggedKind, offset: number, length: number, data: Buffer | undefined, fua: boolean, noHole: boolean): Promise<number | undefined> {
    const payload = kind === 'write' ? length : 0;
    if (this.broken || this.full) return Promise.resolve(undefined);
    if (this.reserved + REC + payload > this.spec.size) {
      this.full = true;
      return Promise.resolve(undefined);
    }
    const h = Buffer.alloc(REC);
    h.writeUInt32LE(REC_MAGIC, 0);
    h.writeUInt8(KINDS[kind], 4);
    h.writeUInt8((fua ? 1 : 0) | (noHole ? 2 : 0), 5);
    h.writeBigUInt64LE(BigInt(++this.seq), 8);
    h.writeBigUInt64LE(BigInt(offset), 16);
    h.writeUInt32LE(length, 24);
    h.writeUInt32LE(data && payload ? zlib.crc32(data) : 0, 28);
    h.writeUInt32LE(this.epoch, 32);
    h.writeUInt32LE(zlib.crc32(h.subarray(0, 36)), 36);
    const pos = this.reserved + REC;
    this.reserved += REC + payload;
    this.next.buf.push(h);
    if (data && payload) this.next.buf.push(data);
    this.next.bytes += REC + payload;
    const p = new Promise<number | undefined>((resolve) => this.next.waiters.push({ resolve, pos }));
    this.writing ??= this.flushLoop();
    return p;
  }

  private async flushLoop(): Promise<void> {
    while (this.next.waiters.length) {
      const g = this.next;
      this.next = { start: this.reserved, buf: [], bytes: 0, waiters: [] };
      try {
        let at = g.start;
        // writev takes at most IOV_MAX buffers at once.
        for (let i = 0; i < g.buf.length; i += 512) {
          const part = g.buf.slice(i, i + 512);
          const { bytesWritten } = await this.fh.writev(part, at);
          const want = part.reduce((s, b) => s + b.length, 0);
          if (bytesWritten !== want) throw new Error(`short write to the hold log (${bytesWritten} of ${want})`);
          at += want;
        }
        this.syncs++;
        this.tail = at;
        for (const w of g.waiters) w.resolve(w.pos);
      } catch {
        // Nothing after a failed group may be trusted: the rest stays in memory.
        this.broken = true;
        for (const w of g.waiters) w.resolve(undefined);
        for (const w of this.next.waiters) w.resolve(undefined);
        this.next = { start: this.reserved, buf: [], bytes: 0, waiters: [] };
      }
    }
    this.writing = undefined;
  }

  /** A logged payload back (a read of a held block, or the replay). */
  async read(pos: number, length: number): Promise<Buffer> {
    const b = Buffer.allocUnsafe(length);
    const { bytesRead } = await this.fh.read(b, 0, length, pos);
    if (bytesRead !== length) throw new Error(`short read of the hold log at ${pos}`);
    return b;
  }

  stats(): HoldLogStats {
    return { records: this.seq, bytes: this.tail - HEADER, capacity: this.spec.size - HEADER, syncs: this.syncs, full: this.full };
  }

  /** Every logged change is on the device (flushed): the log is emptied and no longer named. */
  async retire(): Promise<void> {
    await this.writing;
    await fs.promises.rm(this.refFile, { force: true });
    await syncDir(path.dirname(this.refFile));
    // The reference is gone, so this is tidiness only: an empty file, or a blank header on a device.
    await this.fh.truncate(0).catch(() => this.fh.write(Buffer.alloc(HEADER), 0, HEADER, 0)).catch(() => {});
    await this.fh.close();
  }

  /** Closes without retiring (the daemon stops with changes only in the log: the next serve replays them). */
  async close(): Promise<void> {
    await this.writing;
    await this.fh.close();
  }
}

function writeRef(file: string, body: Record<string, unknown>): Promise<void> {
  return writeFileDurably(file, JSON.stringify({ format: 'livesnap-hold-log-ref', version: 1, ...body }) + '\n');
}

export interface ReplayReport { log: string; records: number; bytes: number; tornBytes: number }

/**
 * At serve: if the state directory names a hold log, replays every complete record in order onto
 * `backend`, flushes, and retires the log. undefined: there was none. A log of another device is refused.
 */
export async function replayPendingHoldLog(stateDir: string, device: { path: string; key: string; size: number }, backend: NbdBackend): Promise<ReplayReport | undefined> {
  const ref = path.join(stateDir, REF);
  let body: { log?: string; key?: string };
  try { body = JSON.parse(await fs.promises.readFile(ref, 'utf8')) as typeof body; } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new UserError(`${ref} cannot be read: ${(e as Error).message}`, 'it names a hold log with writes the device may lack; restore it, or remove it to discard them');
  }
  const logPath = String(body.log);
  const fh = await fs.promises.open(logPath, 'r').catch((e: Error) => {
    throw new UserError(`${ref} names the hold log ${logPath}, which cannot be opened (${e.message}): it may hold acknowledged writes the device lacks`, 'make the log available at that path and serve again, or remove the reference file to discard those writes');
  });
  try {
    const st = await fh.stat();
    // A block device's stat says 0 bytes: short reads mark its end instead.
    const end = st.isFile() ? st.size : Number.MAX_SAFE_INTEGER;
    const h = Buffer.alloc(HEADER);
    const { bytesRead: hb } = await fh.read(h, 0, HEADER, 0);
    if (!h.subarray(0, MAGIC.length).equals(MAGIC)) {
      // Created but its header never made it, or emptied by a retire that did not finish: nothing to replay.
      if (hb === 0 || h.every((x) => x === 0)) { await fh.close(); await fs.promises.rm(ref, { force: true }); return { log: logPath, records: 0, bytes: 0, tornBytes: 0 }; }
      throw new UserError(`${logPath} is not a livesnap hold log`, `check the path in ${ref}`);
    }
    const jl = h.readUInt32LE(16);
    const json = h.subarray(24, 24 + jl);
    if (jl > HEADER - 24 || zlib.crc32(json) !== h.readUInt32LE(20)) throw new UserError(`the header of the hold log ${logPath} is damaged`, 'the writes in it cannot be trusted; remove the reference file to serve without them');
    const hdr = JSON.parse(json.toString()) as { key?: string; size?: number; device?: string; epoch?: number };
    if (hdr.key !== device.key || hdr.size !== device.size) {
      throw new UserError(`the hold log ${logPath} belongs to ${hdr.device} (${hdr.size} bytes), not to ${device.path}`, 'serve that device with this state directory, or give another --state');
    }
    let at = HEADER;
    let records = 0, bytes = 0;
    const rh = Buffer.alloc(REC);
    for (let seq = 1; ; seq++) {
      if (at + REC > end) break;
      const { bytesRead } = await fh.read(rh, 0, REC, at);
      if (bytesRead !== REC) break;
      if (rh.readUInt32LE(0) !== REC_MAGIC || zlib.crc32(rh.subarray(0, 36)) !== rh.readUInt32LE(36) || Number(rh.readBigUInt64LE(8)) !== seq || rh.readUInt32LE(32) !== hdr.epoch) break;
      const kind = rh.readUInt8(4);
      const flags = rh.readUInt8(5);
      const offset = Number(rh.readBigUInt64LE(16));
      const length = rh.readUInt32LE(24);
      const payload = kind === KINDS.write ? length : 0;
      if (at + REC + payload > end || offset + length > device.size) break;
      const fua = (flags & 1) !== 0;
      if (kind === KINDS.write) {
        const d = Buffer.allocUnsafe(length);
        const got = await fh.read(d, 0, length, at + REC);
        if (got.bytesRead !== length || zlib.crc32(d) !== rh.readUInt32LE(28)) break;
        await backend.write(offset, d, fua);
      } else if (kind === KINDS.trim) {
        await backend.trim(offset, length, fua);
      } else if (kind === KINDS.zeroes) {
        await backend.writeZeroes(offset, length, fua, (flags & 2) !== 0);
      } else break;
      records++;
      bytes += payload;
      at += REC + payload;
    }
    await backend.flush();
    await fh.close();
    await fs.promises.rm(ref, { force: true });
    await syncDir(stateDir);
    await fs.promises.truncate(logPath, 0).catch(() => {});
    return { log: logPath, records, bytes, tornBytes: st.isFile() ? Math.max(0, st.size - at) : 0 };
  } catch (e) {
    await fh.close().catch(() => {});
    throw e;
  }
}
