// The export is a chain of filters in front of the device, as nbdkit stacks them: every filter has
// the whole backend interface (read, write with its payload, trim, zeroes, flush, block status) and
// passes each call to the next one unless its one job says otherwise. The NBD server serves the
// head of the chain and knows nothing of what the filters do.
import type { AllocationExtent } from '../nbd/allocation';
import type { NbdBackend, NbdBuffer } from '../nbd/backend';

export class Filter implements NbdBackend {
  constructor(protected readonly next: NbdBackend) {}

  get size(): number { return this.next.size; }
  get minBlockSize(): number { return this.next.minBlockSize; }
  get preferredBlockSize(): number { return this.next.preferredBlockSize; }
  get maxBlockSize(): number { return this.next.maxBlockSize; }
  get readOnly(): boolean { return this.next.readOnly; }
  get multiConn(): boolean | undefined { return this.next.multiConn; }
  get description(): string | undefined { return this.next.description; }

  read(offset: number, length: number): Promise<NbdBuffer> { return this.next.read(offset, length); }
  allocPayload(length: number): NbdBuffer | undefined { return this.next.allocPayload?.(length); }
  write(offset: number, data: Buffer, fua: boolean): Promise<void> { return this.next.write(offset, data, fua); }
  flush(): Promise<void> { return this.next.flush(); }
  trim(offset: number, length: number, fua: boolean): Promise<void> { return this.next.trim(offset, length, fua); }
  writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> { return this.next.writeZeroes(offset, length, fua, noHole); }
  extents(offset: number, length: number): Promise<AllocationExtent[]> {
    return this.next.extents ? this.next.extents(offset, length) : Promise.resolve([{ length, hole: false, zero: false }]);
  }
  stats(): Record<string, number> { return this.next.stats?.() ?? {}; }
}
