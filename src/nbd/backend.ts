// What the NBD server calls, and nothing else: one NbdBackend per export. The server validates every
// request (range, size, flags, read-only) before calling, so a backend only ever sees well-formed
// calls with 0 <= offset, 0 < length, offset + length <= size, and length <= maxBlockSize for
// read/write. Calls may overlap in time (several connections, pipelined requests); a backend must
// accept that. Overlapping writes in flight at the same time have no defined order (as in NBD).
// Filters (src/export) stack on this same interface; the server does not know they exist.

import type { AllocationExtent } from './allocation';

/** A buffer lent by the backend; the borrower calls release() exactly once when done with data. */
export interface NbdBuffer {
  readonly data: Buffer;
  release(): void;
}

export interface NbdBackend {
  /** Export size in bytes. */
  readonly size: number;
  /** Smallest I/O the backend handles natively (advertised as NBD_INFO_BLOCK_SIZE minimum). */
  readonly minBlockSize: number;
  /** Preferred I/O size (NBD_INFO_BLOCK_SIZE preferred), e.g. 4096. */
  readonly preferredBlockSize: number;
  /** Largest read/write payload accepted (NBD_INFO_BLOCK_SIZE maximum), e.g. 32 MiB. */
  readonly maxBlockSize: number;
  readonly readOnly: boolean;
  /**
   * True when a flush() makes every completed write durable, whatever connection sent it (one
   * shared fd + fdatasync does). Advertised as NBD_FLAG_CAN_MULTI_CONN. Default true.
   */
  readonly multiConn?: boolean;
  /** Shown by NBD_INFO_DESCRIPTION and `nbdinfo`. */
  readonly description?: string;

  /** Reads [offset, offset+length). The server releases the buffer once the reply is on the wire. */
  read(offset: number, length: number): Promise<NbdBuffer>;
  /**
   * Optional: memory the server receives a WRITE payload into (e.g. an O_DIRECT-aligned pool slot),
   * so write() needs no copy. Synchronous; returns undefined when none is free right now (the server
   * then uses ordinary memory). The server passes `.data` (exactly `length` bytes) to write() and
   * calls release() after write() settles.
   */
  allocPayload?(length: number): NbdBuffer | undefined;
  /** Writes data at offset; with fua, durable before it resolves. Must not keep `data` after it settles. */
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  /** Every write completed before the call is durable when it resolves. */
  flush(): Promise<void>;
  /** A hint: the range is no longer needed (may deallocate; contents then undefined). */
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  /** The range reads back as zeroes; noHole: keep it allocated (do not punch a hole). */
  writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void>;
  /**
   * Optional: the allocation status of [offset, offset+length) (NBD_CMD_BLOCK_STATUS,
   * base:allocation), as consecutive extents starting at `offset`. It may cover less than asked (at
   * least one byte; the client asks again for the rest) and must not claim `zero` for bytes a READ
   * would not return as zeroes. Without it every byte is reported as allocated data.
   */
  extents?(offset: number, length: number): Promise<AllocationExtent[]>;
  /** Optional: counters for `livesnap status`. */
  stats?(): Record<string, number>;
}

/** A failure a backend wants the client to see as a specific NBD error (see protocol.ts NBD_E*). */
export class NbdError extends Error {
  constructor(message: string, readonly nbdErrno: number) {
    super(message);
    this.name = 'NbdError';
  }
}

/** A plain heap buffer wrapped as an NbdBuffer (release does nothing). */
export function heapBuffer(data: Buffer): NbdBuffer {
  return { data, release() {} };
}
