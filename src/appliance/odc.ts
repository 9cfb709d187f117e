// The appliance's Original Data Cache and Modified Map (seed 002, claims 1, 2, 13-18). The ODC holds
// originals the hosts sent, in fixed slots, bounded (memory, or a file); the MM of each unit says,
// per block, whether the block was read (reconciled into the output, or not part of the backup) and
// where its original is. Only the first original of a block is kept (claims 4 and 15); a slot whose
// original was read is free again (claim 18). Memory slots are taken first, then the spill file's.
// With no free slot a host's original waits here, so its acknowledgement is delayed and only the
// writer of that block waits (never a failed write).
import * as fs from 'node:fs';
import { SlotAllocator } from '../snapshot/container';
import { Bitset } from '../util/bitset';
import { UserError } from '../util/errors';
import { parseSize } from '../util/size';

/** The one slot size: hosts send originals of 4 KiB blocks. */
export const ODC_SLOT = 4096;

/** Memory slots first; past them, slots in a file (the spill). Either part may be absent, not both. */
export interface OdcSpec { memoryBytes: number; file?: { path: string; bytes: number } }

/** --odc memory:SIZE | file:PATH:SIZE | memory:SIZE+file:PATH:SIZE (memory first, then the file). */
export function parseOdc(text: string): OdcSpec {
  const hint = 'e.g. --odc memory:512M, --odc file:/var/cache/livesnap/odc:8G, or --odc memory:512M+file:/var/cache/livesnap/odc:8G';
  const sizeOf = (s: string) => {
    let n: number;
    try { n = parseSize(s); } catch { throw new UserError(`--odc ${text}: "${s}" is not a size`, hint); }
    if (n < 16 * ODC_SLOT) throw new UserError(`--odc ${text}: each part at least 64K`, hint);
    return Math.floor(n / ODC_SLOT) * ODC_SLOT;
  };
  const m = /^(?:memory:([^+:]+))?(?:(?:^|\+)file:(.+):([^:]+))?$/.exec(text);
  if (!m || (m[1] === undefined && m[2] === undefined)) throw new UserError(`--odc ${text}: expected memory:SIZE, file:PATH:SIZE or memory:SIZE+file:PATH:SIZE`, hint);
  return { memoryBytes: m[1] !== undefined ? sizeOf(m[1]) : 0, ...(m[2] !== undefined ? { file: { path: m[2], bytes: sizeOf(m[3]!) } } : {}) };
}

export class OriginalDataCache {
  readonly capacity: number;
  /** Slots [0, memSlots) are in memory, the rest in the file. */
  private readonly memSlots: number;
  private readonly memory: SlotAllocator;
  private readonly spill: SlotAllocator;
  private readonly mem: Buffer | undefined;
  private readonly fd: number | undefined;
  private readonly one = new Int32Array(1);
  /** Units with originals waiting for room: told once per turn after slots were freed. */
  private readonly roomWaiters = new Set<() => void>();
  private notifyQueued = false;
  private usedNow = 0;
  peak = 0;

  constructor(readonly spec: OdcSpec) {
    this.memSlots = spec.memoryBytes / ODC_SLOT;
    const fileSlots = (spec.file?.bytes ?? 0) / ODC_SLOT;
    this.capacity = this.memSlots + fileSlots;
    this.memory = new SlotAllocator(this.memSlots);
    this.spill = new SlotAllocator(fileSlots);
    // Untouched pages cost nothing until an original lands in them.
    if (this.memSlots) this.mem = Buffer.allocUnsafeSlow(spec.memoryBytes);
    if (spec.file) {
      try {
        this.fd = fs.openSync(spec.file.path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        throw new UserError(`--odc file:${spec.file.path}: ${code === 'EEXIST' ? 'the file exists' : (e as Error).message}`, code === 'EEXIST' ? 'name a new file (the appliance creates it and removes it at exit)' : 'name a file on a writable file system with room for it');
      }
      fs.ftruncateSync(this.fd, spec.file.bytes);
    }
  }

  get description(): string {
    const parts = [];
    if (this.memSlots) parts.push(`memory (${this.spec.memoryBytes} bytes)`);
    if (this.spec.file) parts.push(`${this.memSlots ? 'then ' : ''}file ${this.spec.file.path} (${this.spec.file.bytes} bytes)`);
    return parts.join(', ');
  }

  get used(): number { return this.usedNow; }
  /** Slots in the file now (originals that did not fit in memory). */
  get spilled(): number { return this.spill.used; }

  /** A free slot, memory first, or -1 when the cache is full. */
  take(): number {
    let slot = -1;
    if (this.memory.take(1, this.one) === 1) slot = this.one[0]!;
    else if (this.spill.take(1, this.one) === 1) slot = this.memSlots + this.one[0]!;
    if (slot >= 0 && ++this.usedNow > this.peak) this.peak = this.usedNow;
    return slot;
  }

  free(slot: number): void {
    if (slot < 0) return;
    if (slot < this.memSlots) this.memory.give(slot); else this.spill.give(slot - this.memSlots);
    this.usedNow--;
    if (this.roomWaiters.size && !this.notifyQueued) {
      this.notifyQueued = true;
      queueMicrotask(() => {
        this.notifyQueued = false;
        for (const w of [...this.roomWaiters]) w();
      });
    }
  }

  /** `f` is called after slots were freed, until offRoom(f). */
  onRoom(f: () => void): void { this.roomWaiters.add(f); }
  offRoom(f: () => void): void { this.roomWaiters.delete(f); }

  /** Stores `length` bytes (at most one slot) of `src` from `from` in `slot`. */
  write(slot: number, src: Buffer, from = 0, length = src.length - from): void {
    if (slot < this.memSlots) src.copy(this.mem!, slot * ODC_SLOT, from, from + length);
    else fs.writeSync(this.fd!, src, from, length, (slot - this.memSlots) * ODC_SLOT);
  }

  /** Copies `length` bytes of the original in `slot`, from byte `from` of it, into `into` at `at`. */
  read(slot: number, into: Buffer, at: number, length: number, from = 0): void {
    const o = slot * ODC_SLOT + from;
    if (slot < this.memSlots) this.mem!.copy(into, at, o, o + length);
    else fs.readSync(this.fd!, into, at, length, o - this.memSlots * ODC_SLOT);
  }

  /** Closes and removes the spill file. Never throws. */
  close(): void {
    if (this.fd === undefined) return;
    try { fs.closeSync(this.fd); } catch { /* closing */ }
    try { fs.rmSync(this.spec.file!.path, { force: true }); } catch { /* gone */ }
  }
}

/** One unit's Modified Map. */
export class ModifiedMap {
  /** block → ODC slot of its original. */
  private readonly slotOf = new Map<number, number>();
  /** Blocks read (reconciled into the output) or outside the backup: their originals are not needed. */
  readonly done: Bitset;
  originalsKept = 0;
  originalsUsed = 0;
  /** Originals that arrived for blocks already read or already held (not kept). */
  originalsIgnored = 0;

  constructor(readonly totalBlocks: number, private readonly odc: OriginalDataCache) {
    this.done = new Bitset(totalBlocks);
  }

  /** Slots this unit holds. */
  get held(): number { return this.slotOf.size; }

  slot(block: number): number | undefined { return this.slotOf.get(block); }

  /** True when an original of `block` is wanted (not read yet, none held). */
  wants(block: number): boolean {
    return !this.done.get(block) && !this.slotOf.has(block);
  }

  /** Keeps the original of `block` in `slot` (the caller checked wants()). */
  keep(block: number, slot: number): void {
    this.slotOf.set(block, slot);
    this.originalsKept++;
  }

  /** Blocks [first, end) are read: their originals' slots are free again (claim 18). */
  markDone(first: number, end: number): void {
    if (end <= first) return;
    if (this.slotOf.size) {
      // Whichever is fewer: the blocks of the range, or the originals held (deleting while iterating a Map is safe).
      if (end - first < this.slotOf.size) {
        for (let b = first; b < end; b++) this.drop(b);
      } else {
        for (const b of this.slotOf.keys()) if (b >= first && b < end) this.drop(b);
      }
    }
    this.done.setRange(first, end);
  }

  private drop(b: number): void {
    const s = this.slotOf.get(b);
    if (s === undefined) return;
    this.slotOf.delete(b);
    this.odc.free(s);
  }

  /** Gives every slot back (the unit ended). */
  clear(): void {
    for (const s of this.slotOf.values()) this.odc.free(s);
    this.slotOf.clear();
  }
}
