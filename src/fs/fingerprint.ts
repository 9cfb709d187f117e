// A file system's identity as its own superblock states it: UUID and size. Two devices with the
// same fingerprint hold the same file system (or a block-for-block clone of it). Used to tell whether
// a mount point or a target path lies on a volume livesnap serves, through any stack of devices
// (nbdfuse + loop, /dev/nbdN) that device numbers cannot follow.
import type { BlockReader } from '../device/device';

export async function fsFingerprint(reader: BlockReader): Promise<string | undefined> {
  if (reader.size < 8192) return undefined;
  const [head] = await reader.readMany([{ offset: 0, length: 8192 }]);
  const b = head!;
  // ext2/3/4: magic 0xEF53 at 1024+0x38, UUID at 1024+0x68, block count at 1024+0x4 (+hi at 0x150).
  if (b.readUInt16LE(1024 + 0x38) === 0xef53) {
    const blocks = b.readUInt32LE(1024 + 0x4) + (b.readUInt32LE(1024 + 0x60) & 0x80 ? b.readUInt32LE(1024 + 0x150) * 2 ** 32 : 0); // 32-bit-ok: feature flag test
    return `ext:${b.subarray(1024 + 0x68, 1024 + 0x78).toString('hex')}:${blocks}`;
  }
  // XFS: "XFSB", UUID at 32, dblocks at 8.
  if (b.readUInt32BE(0) === 0x58465342) return `xfs:${b.subarray(32, 48).toString('hex')}:${b.readBigUInt64BE(8)}`;
  // btrfs: the superblock at 64 KiB, magic "_BHRfS_M" at +0x40, fsid at +0x20, total bytes at +0x70.
  if (reader.size >= 0x10000 + 4096) {
    const [sb] = await reader.readMany([{ offset: 0x10000, length: 4096 }]);
    if (sb!.toString('latin1', 0x40, 0x48) === '_BHRfS_M') return `btrfs:${sb!.subarray(0x20, 0x30).toString('hex')}:${sb!.readBigUInt64LE(0x70)}`;
  }
  return undefined;
}
