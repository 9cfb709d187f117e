// Restore and verify of a raw image: the image is the volume at the snapshot instant, so its own
// used-block map (read from the image exactly as the backup read it from the device) names the
// blocks the backup stored.
import { Device } from '../device/device';
import type { UsedBlockMap } from '../fs/used-map';
import { CompareSink } from '../sink/compare-sink';
import { ImageSink } from '../sink/image-sink';
import type { BackupSink } from '../sink/sink';
import { OfflineMethod } from '../snapshot/method';
import { runBackupJob } from './backup-job';

export interface ImageJobOptions {
  image: string;
  signal?: AbortSignal;
  onMap?: (map: UsedBlockMap) => void;
  onProgress?: (done: number, total: number) => void;
}

export interface ImageJobResult {
  map: UsedBlockMap;
  bytes: number;
  durationMs: number;
}

async function imageToSink(opts: ImageJobOptions, sink: BackupSink): Promise<ImageJobResult> {
  const img = Device.open(opts.image, { write: false });
  try {
    const r = await runBackupJob({
      method: new OfflineMethod(img),
      sink,
      source: opts.image,
      volumeSize: img.size,
      onError: 'abort',
      signal: opts.signal,
      batchBytes: 8 << 20,
      onMap: (m) => opts.onMap?.(m),
      onProgress: (p) => opts.onProgress?.(p.bytesDone, p.bytesTotal),
    });
    return { map: r.map, bytes: r.copy.bytes, durationMs: r.durationMs };
  } finally {
    img.close();
  }
}

export function restoreImage(opts: ImageJobOptions & { target: string; force?: boolean }): Promise<ImageJobResult> {
  return imageToSink(opts, new ImageSink(opts.target, { force: opts.force }));
}

export async function verifyImage(opts: ImageJobOptions & { against: string }): Promise<ImageJobResult & { differingBlocks: number; firstDifferingBlock?: number }> {
  const sink = new CompareSink(opts.against);
  const r = await imageToSink(opts, sink);
  return { ...r, differingBlocks: sink.differingBlocks, firstDifferingBlock: sink.firstDifferingBlock };
}
