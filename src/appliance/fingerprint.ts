// A volume's fingerprint for the appliance link: the host hashes these blocks at the instant, the
// appliance the same blocks of its LUN; any difference means the LUN is another volume. Both sides
// pick the blocks from the volume's size alone.
import { createHash } from 'node:crypto';

/** Block 0, 1, 2, the last, and spread between: `n` at most. */
export function fingerprintBlocks(totalBlocks: number, n = 16): number[] {
  const out = new Set<number>([0, 1, 2, totalBlocks - 1]);
  for (let i = 1; i < n - 4; i++) out.add(Math.floor((totalBlocks * i) / (n - 4)));
  return [...out].filter((b) => b >= 0 && b < totalBlocks).sort((a, b) => a - b);
}

export function blockHash(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}
