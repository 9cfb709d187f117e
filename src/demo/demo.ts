// The built-in demo volume: a file-backed ext4 volume filled with generated files, backed up while
// mounted (frozen), restored elsewhere, verified block by block, checked with e2fsck and by file
// checksums. Everything it makes lives under one directory; loop devices and mounts are undone.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Device } from '../device/device';
import { runBackup, type BackupSummary } from '../jobs/backup';
import { restoreImage, verifyImage } from '../jobs/restore';
import { ImageSink } from '../sink/image-sink';
import { UserError } from '../util/errors';
import { checksumTree } from '../util/checksum-tree';
import { sh, shStatus } from './system';

export interface DemoOptions {
  dir: string;
  sizeBytes: number;
  dataBytes: number;
  seed: number;
  log: (line: string) => void;
  onProgress?: (phase: string, done: number, total: number) => void;
}

export interface DemoResult {
  dir: string;
  volume: string;
  backup: BackupSummary;
  restoreMs: number;
  verify: { differingBlocks: number; comparedBytes: number };
  fsck: 'clean';
  files: number;
  filesMatching: number;
}

export async function runDemo(o: DemoOptions): Promise<DemoResult> {
  if (process.getuid?.() !== 0) {
    throw new UserError('the demo needs root: it attaches a loop device, mounts an ext4 file system and freezes it', 'run it as root, e.g. "sudo livesnap demo"');
  }
  fs.mkdirSync(o.dir, { recursive: true });
  const volume = path.join(o.dir, 'volume.img');
  const backupImg = path.join(o.dir, 'backup.img');
  const restored = path.join(o.dir, 'restored.img');
  const mnt = path.join(o.dir, 'mnt');
  const restoredMnt = path.join(o.dir, 'restored-mnt');
  for (const f of [volume, backupImg, restored]) fs.rmSync(f, { force: true });
  const undo: Array<() => void> = [];
  try {
    o.log(`creating a ${Math.round(o.sizeBytes / 2 ** 20)} MiB ext4 volume in ${volume}`);
    fs.closeSync(fs.openSync(volume, 'w'));
    fs.truncateSync(volume, o.sizeBytes);
    sh('mkfs.ext4', ['-q', '-F', '-L', 'livesnap-demo', volume], 'e2fsprogs');
    const loop = sh('losetup', ['-f', '--show', volume], 'mount').trim();
    undo.push(() => shStatus('losetup', ['-d', loop]));
    fs.mkdirSync(mnt, { recursive: true });
    sh('mount', [loop, mnt], 'mount');
    undo.push(() => { shStatus('fsfreeze', ['-u', mnt]); shStatus('umount', [mnt]); });

    // Generated files: half random (incompressible), half text; a third deleted to fragment free space.
    let written = 0, n = 0;
    const rnd = seeded(o.seed);
    const buf = Buffer.alloc(4 << 20);
    while (written < o.dataBytes) {
      const size = Math.min(o.dataBytes - written, 4096 + Math.floor(rnd() * (3 << 20)));
      const dir = path.join(mnt, `dir${n % 16}`);
      fs.mkdirSync(dir, { recursive: true });
      const chunk = buf.subarray(0, size);
      if (n % 2) crypto.randomFillSync(chunk); else chunk.fill(`file ${n} of the livesnap demo\n`);
      fs.writeFileSync(path.join(dir, `file${n}.dat`), chunk);
      written += size;
      n++;
      o.onProgress?.('filling', written, o.dataBytes);
    }
    for (let i = 0; i < n; i += 3) fs.rmSync(path.join(mnt, `dir${i % 16}`, `file${i}.dat`));
    sh('sync', ['-f', mnt]);
    const before = checksumTree(mnt);
    o.log(`wrote ${n} files (${Math.round(written / 2 ** 20)} MiB), deleted every third; ${before.size} remain`);

    o.log(`backing up ${loop} while mounted at ${mnt} (--method freeze) to ${backupImg}`);
    const src = Device.open(loop);
    let backup: BackupSummary;
    try {
      backup = await runBackup({ source: src, sink: new ImageSink(backupImg), method: 'freeze', mount: mnt, onError: 'abort', onProgress: (d, t) => o.onProgress?.('backup', d, t) });
    } finally {
      src.close();
    }

    o.log(`restoring ${backupImg} into ${restored}`);
    const t0 = performance.now();
    await restoreImage({ image: backupImg, target: restored, onProgress: (d, t) => o.onProgress?.('restore', d, t) });
    const restoreMs = performance.now() - t0;

    // The live volume moves on after the instant (ext4 even rewrites its superblock at unmount), so
    // the restored image is checked against the backup; the backup itself by e2fsck and checksums.
    sh('umount', [mnt]);
    o.log(`verifying ${restored} against ${backupImg}, block by block`);
    const v = await verifyImage({ image: restored, against: backupImg, onProgress: (d, t) => o.onProgress?.('verify', d, t) });
    if (v.differingBlocks) throw new UserError(`verify failed: ${v.differingBlocks} blocks differ (first: ${v.firstDifferingBlock})`);

    const fsck = shStatus('e2fsck', ['-fn', restored]);
    if (fsck.status !== 0) throw new UserError(`e2fsck found problems in the restored image:\n${fsck.out}`);

    const rloop = sh('losetup', ['-f', '--show', '-r', restored]).trim();
    undo.push(() => shStatus('losetup', ['-d', rloop]));
    fs.mkdirSync(restoredMnt, { recursive: true });
    sh('mount', ['-o', 'ro', rloop, restoredMnt]);
    undo.push(() => shStatus('umount', [restoredMnt]));
    const after = checksumTree(restoredMnt);
    let matching = 0;
    for (const [f, h] of before) if (after.get(f) === h) matching++;
    if (matching !== before.size || after.size !== before.size) throw new UserError(`only ${matching} of ${before.size} files have their checksum in the restored volume`);
    return { dir: o.dir, volume, backup, restoreMs, verify: { differingBlocks: v.differingBlocks, comparedBytes: v.bytes }, fsck: 'clean', files: before.size, filesMatching: matching };
  } finally {
    for (const u of undo.reverse()) u();
  }
}

function seeded(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x / 2 ** 32; };
}
