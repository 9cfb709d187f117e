// Every writer of backup data (raw image, tar archive, stdout, tape, S3, appliance) is a sink
// behind this one interface. Nothing here assumes the target can seek.
import type { Bitset } from '../util/bitset';
import type { LayoutNode } from '../fs/layout';
import type { FileSystemKind } from '../fs/used-map';

export interface VolumeInfo {
  /** Source device or export name, as the user gave it. */
  source: string;
  /** Volume size in bytes. */
  size: number;
  blockSize: number;
  totalBlocks: number;
  usedBlocks: number;
  filesystem: FileSystemKind;
  /** The snapshot instant (for offline and freeze backups: when the copy started). */
  snapshotTime: Date;
  notes: string[];
  toolVersion: string;
  /** What the volume holds (disk -> partitions -> LVs -> file systems), when read. */
  layout?: LayoutNode;
  /** Where this backup stands in a chain (online backups of a served export; see src/incremental). */
  backup?: BackupIdentity;
}

/**
 * A backup's place in its chain. A full backup has no parent and holds every used, wanted block; an
 * incremental one holds only the blocks changed since `parent` (and used and wanted at its instant):
 * applied over the parent's state it gives this instant. `zeroed` are blocks (at the volume's
 * blockSize) that changed since the parent but are free or excluded now: zeros after applying.
 */
export interface BackupIdentity {
  id: string;
  parent: string | null;
  kind: 'full' | 'incremental';
  /** Change-tracking granularity in bytes (64 KiB). */
  granularity: number;
  /** Why this backup is full when an incremental was asked for (first backup, untrusted map, ...). */
  fullBecause?: string;
  zeroed?: Bitset;
  /** Bytes of used blocks left out by the protection map (--exclude, swap). */
  excludedBytes: number;
}

/**
 * One batch of volume data in one buffer: `segments` holds [volumeOffset, length, bufferOffset]
 * triplets, in ascending volume offset order and never overlapping. The buffer is only valid until
 * the sink's write() promise resolves: a sink that keeps data must copy it.
 */
export interface DataBatch {
  buffer: ArrayBuffer;
  segments: Float64Array;
}

export interface FinishInfo {
  /** Blocks (in blockSize units) that could not be read and were written as zeros. */
  badBlocks: number[];
}

export interface BackupSink {
  /** Human-readable name for messages ("image /backup/vol.img"). */
  readonly description: string;
  /**
   * True when batches may arrive in any order (an image file or device written by offset); an online
   * backup then drains its container eagerly. False/absent: ascending order only (a stream).
   */
  readonly randomAccess?: boolean;
  /**
   * Called once before any data. `used` is the final set of blocks that will be written:
   * a sequential format (GNU sparse map) needs it up front.
   */
  begin(volume: VolumeInfo, used: Bitset): Promise<void>;
  /** Data batches arrive in ascending volume offset order (any order if randomAccess). */
  write(batch: DataBatch): Promise<void>;
  /** All data written; make it durable and mark it complete. */
  finish(info: FinishInfo): Promise<void>;
  /** The backup failed or was cancelled: remove or clearly mark the partial output. Never throws. */
  abort(reason: Error): Promise<void>;
}
