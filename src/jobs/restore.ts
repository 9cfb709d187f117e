// Restore and verify of a raw image: the image is the volume at the snapshot instant, so its own
// used-block map (read from the image exactly as the backup read it from the device) names the
// blocks the backup stored.
import { Device } from '../device/device';
import { copyBlocks } from '../copy/block-copier';
import { readUsedBlockMap } from '../fs/detect';
import type { UsedBlockMap } from '../fs/used-map';
import { CompareSink } from '../sink/compare-sink';
import { ImageSink } from '../sink/image-sink';
import { CompletenessCheck } from '../sink/completeness';
import type { BackupSink } from '../sink/sink';
import { TOOL_VERSION } from './version';

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

async function imageToSink(opts: ImageJobOptions, target: BackupSink): Promise<ImageJobResult> {
  const sink = new CompletenessCheck(target);
  const started = performance.now();
  const img = Device.open(opts.image, { write: false });
  try {
    const map = await readUsedBlockMap(img, opts.image);
    opts.onMap?.(map);
    await sink.begin(
      { source: opts.image, size: img.size, blockSize: map.blockSize, totalBlocks: map.totalBlocks, usedBlocks: map.usedBlocks, filesystem: map.filesystem, snapshotTime: new Date(), notes: map.notes, toolVersion: TOOL_VERSION },
      map.bitmap,
    );
    const r = await copyBlocks({ source: img, blocks: map.bitmap, blockSize: map.blockSize, sink, onError: 'abort', signal: opts.signal, onProgress: (p) => opts.onProgress?.(p.bytesDone, p.bytesTotal) });
    await sink.finish({ badBlocks: [] });
    return { map, bytes: r.bytes, durationMs: performance.now() - started };
  } catch (e) {
    await sink.abort(e as Error);
    throw e;
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
