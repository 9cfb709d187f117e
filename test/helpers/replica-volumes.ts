// Seeded volumes for the replica tests: a full image A, a delta that turns A into B (new data,
// blocks freed and zeroed, blocks newly used), and an unrelated full image C. Shared by the test
// and by the child process it kills (replica-child.ts), so both compute the very same bytes.
import { giveAligned, takeAligned } from '../../src/device/memory';
import type { BackupIdentity, BackupSink, VolumeInfo } from '../../src/sink/sink';
import { Bitset } from '../../src/util/bitset';
import { rng } from './system';

export const VOLUME_SIZE = 6 << 20;
export const BLOCK = 4096;
const BLOCKS = VOLUME_SIZE / BLOCK;

export interface Phase {
  name: 'A' | 'B' | 'C';
  info: VolumeInfo;
  /** The blocks this backup sends. */
  used: Bitset;
  /** The whole replica after the phase: what must be on disk, byte for byte. */
  image: Buffer;
}

function fill(image: Buffer, block: number, r: () => number): void {
  for (let o = block * BLOCK; o < (block + 1) * BLOCK; o += 4) image.writeUInt32LE(Math.floor(r() * 0x100000000), o);
}

function info(name: string, used: Bitset, backup: BackupIdentity, minute: number): VolumeInfo {
  return {
    source: '/dev/synthetic', size: VOLUME_SIZE, blockSize: BLOCK, totalBlocks: BLOCKS, usedBlocks: used.count(),
    filesystem: 'ext4', snapshotTime: new Date(Date.UTC(2024, 4, 1, 12, minute)), notes: [], toolVersion: 'test', backup,
  };
}

function randomUsed(r: () => number, fraction: number): Bitset {
  const used = new Bitset(BLOCKS);
  for (let b = Math.floor(r() * 8); b < BLOCKS;) {
    const run = 1 + Math.floor(r() * 40);
    if (r() < fraction) used.setRange(b, Math.min(BLOCKS, b + run));
    b += run;
  }
  return used;
}

const identity = (id: string, parent: string | null, kind: 'full' | 'incremental', zeroed?: Bitset): BackupIdentity =>
  ({ id, parent, kind, granularity: 64 << 10, excludedBytes: 0, ...(zeroed ? { zeroed } : {}) });

export function replicaScenario(seed: number): Record<'A' | 'B' | 'C', Phase> {
  const r = rng(seed);
  // A: about half the blocks used, in runs.
  const usedA = randomUsed(r, 0.55);
  const imageA = Buffer.alloc(VOLUME_SIZE);
  for (const [s, e] of usedA.runs()) for (let b = s; b < e; b++) fill(imageA, b, r);
  // B: regions changed since A; a changed block is rewritten (used in B) or freed (zeros in B).
  const changed = new Bitset(BLOCKS);
  for (let b = Math.floor(r() * 16); b < BLOCKS; b += 1 + Math.floor(r() * 60)) changed.setRange(b, Math.min(BLOCKS, b + 1 + Math.floor(r() * 12)));
  changed.set(BLOCKS - 1); // the last block too
  const sendB = new Bitset(BLOCKS);
  const zeroed = new Bitset(BLOCKS);
  const imageB = Buffer.from(imageA);
  for (const [s, e] of changed.runs()) {
    for (let b = s; b < e; b++) {
      if (r() < 0.3) { zeroed.set(b); imageB.fill(0, b * BLOCK, (b + 1) * BLOCK); } else { sendB.set(b); fill(imageB, b, r); }
    }
  }
  // C: an unrelated full image.
  const usedC = randomUsed(r, 0.4);
  const imageC = Buffer.alloc(VOLUME_SIZE);
  for (const [s, e] of usedC.runs()) for (let b = s; b < e; b++) fill(imageC, b, r);
  return {
    A: { name: 'A', info: info('A', usedA, identity('snap-A', null, 'full'), 0), used: usedA, image: imageA },
    B: { name: 'B', info: info('B', sendB, identity('snap-B', 'snap-A', 'incremental', zeroed), 10), used: sendB, image: imageB },
    C: { name: 'C', info: info('C', usedC, identity('snap-C', null, 'full'), 20), used: usedC, image: imageC },
  };
}

/**
 * Sends a phase to a sink as the copy engine does: ascending batches of up to `batchBytes` of
 * aligned memory, runs cut at seeded block boundaries. Aborts the sink when anything fails.
 */
export async function feedPhase(sink: BackupSink, p: Phase, seed: number, batchBytes = 128 << 10, override?: Partial<VolumeInfo>): Promise<void> {
  const r = rng(seed ^ 0x51ed);
  const buffer = takeAligned(batchBytes);
  const view = Buffer.from(buffer);
  let segs: number[] = [];
  let at = 0;
  try {
    await sink.begin({ ...p.info, ...override }, p.used);
    const flush = async () => {
      if (segs.length) await sink.write({ buffer, segments: Float64Array.from(segs) });
      segs = [];
      at = 0;
    };
    for (const [s, e] of p.used.runs()) {
      for (let b = s; b < e;) {
        let n = Math.min(e - b, (batchBytes - at) / BLOCK);
        if (r() < 0.3) n = Math.max(1, Math.floor(r() * n));
        p.image.copy(view, at, b * BLOCK, (b + n) * BLOCK);
        segs.push(b * BLOCK, n * BLOCK, at);
        at += n * BLOCK;
        b += n;
        if (at === batchBytes || r() < 0.1) await flush();
      }
    }
    await flush();
    await sink.finish({ badBlocks: [] });
  } catch (e) {
    await sink.abort(e as Error);
    throw e;
  } finally {
    giveAligned(buffer);
  }
}
