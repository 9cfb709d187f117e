// Names of partition types (MBR type bytes, GPT type GUIDs) for the output. The type never decides
// how a partition is read (its contents do); it only names what the user sees.

export interface Partition {
  /** The number Linux gives it (sdb3): MBR 1-4 primary, 5+ logical; GPT entry index + 1. */
  number: number;
  /** Byte offset on the disk. */
  offset: number;
  size: number;
  /** "0x83" or the GPT type GUID. */
  typeId: string;
  /** Human name of the type: "Linux swap", "EFI System", "unknown type 0x42". */
  typeName: string;
  /** GPT partition name, when set. */
  label?: string;
}

export interface PartitionTable {
  kind: 'gpt' | 'mbr';
  /** Logical sector size the table is written in (512 or 4096). */
  sectorSize: number;
  /** Data partitions, by offset (MBR extended containers are not listed; their logicals are). */
  partitions: Partition[];
  /** Byte ranges of the tables themselves: MBR, EBRs, GPT headers and entry arrays. */
  tableRanges: Array<[number, number]>;
  notes: string[];
}

const MBR_TYPES: Record<number, string> = {
  0x01: 'FAT12', 0x04: 'FAT16 <32M', 0x06: 'FAT16', 0x07: 'HPFS/NTFS/exFAT', 0x0b: 'W95 FAT32', 0x0c: 'W95 FAT32 (LBA)',
  0x0e: 'W95 FAT16 (LBA)', 0x11: 'Hidden FAT12', 0x14: 'Hidden FAT16 <32M', 0x16: 'Hidden FAT16', 0x17: 'Hidden HPFS/NTFS',
  0x1b: 'Hidden W95 FAT32', 0x1c: 'Hidden W95 FAT32 (LBA)', 0x1e: 'Hidden W95 FAT16 (LBA)', 0x27: 'Hidden NTFS WinRE',
  0x42: 'Windows dynamic disk (LDM)', 0x82: 'Linux swap', 0x83: 'Linux', 0x85: 'Linux extended', 0x8e: 'Linux LVM',
  0xa5: 'FreeBSD', 0xa6: 'OpenBSD', 0xa9: 'NetBSD', 0xaf: 'HFS / HFS+', 0xda: 'Non-FS data', 0xde: 'Dell Utility',
  0xee: 'GPT protective', 0xef: 'EFI (FAT-12/16/32)', 0xfb: 'VMware VMFS', 0xfc: 'VMware VMKCORE', 0xfd: 'Linux raid autodetect',
  0x05: 'Extended', 0x0f: 'W95 Extended (LBA)',
};

export function mbrTypeName(type: number): string {
  return MBR_TYPES[type] ?? `unknown type 0x${type.toString(16).padStart(2, '0')}`;
}

const GPT_TYPES: Record<string, string> = {
  'c12a7328-f81f-11d2-ba4b-00a0c93ec93b': 'EFI System',
  '21686148-6449-6e6f-744e-656564454649': 'BIOS boot',
  '0fc63daf-8483-4772-8e79-3d69d8477de4': 'Linux filesystem',
  '0657fd6d-a4ab-43c4-84e5-0933c84b4f4f': 'Linux swap',
  'e6d6d379-f507-44c2-a23c-238f2a3df928': 'Linux LVM',
  'a19d880f-05fc-4d3b-a006-743f0f84911e': 'Linux RAID',
  '4f68bce3-e8cd-4db1-96e7-fbcaf984b709': 'Linux root (x86-64)',
  '44479540-f297-41b2-9af7-d131d5f0458a': 'Linux root (x86)',
  'b921b045-1df0-41c3-af44-4c6f280d3fae': 'Linux root (ARM64)',
  '933ac7e1-2eb4-4f13-b844-0e14e2aef915': 'Linux home',
  '3b8f8425-20e0-4f3b-907f-1a25a76f98e8': 'Linux server data',
  'bc13c2ff-59e6-4262-a352-b275fd6f7172': 'Linux extended boot',
  'ca7d7ccb-63ed-4c53-861c-1742536059cc': 'Linux LUKS',
  '8da63339-0007-60c0-c436-083ac8230908': 'Linux reserved',
  'ebd0a0a2-b9e5-4433-87c0-68b6b72699c7': 'Microsoft basic data',
  'e3c9e316-0b5c-4db8-817d-f92df00215ae': 'Microsoft reserved',
  'de94bba4-06d1-4d40-a16a-bfd50179d6ac': 'Windows recovery environment',
  '5808c8aa-7e8f-42e0-85d2-e1e90434cfb3': 'Windows LDM metadata',
  'af9b60a0-1431-4f62-bc68-3311714a69ad': 'Windows LDM data',
  '48465300-0000-11aa-aa11-00306543ecac': 'Apple HFS+',
  '7c3457ef-0000-11aa-aa11-00306543ecac': 'Apple APFS',
  '516e7cb4-6ecf-11d6-8ff8-00022d09712b': 'FreeBSD data',
  '516e7cb5-6ecf-11d6-8ff8-00022d09712b': 'FreeBSD swap',
  '6a898cc3-1dd2-11b2-99a6-080020736631': 'ZFS (Solaris /usr)',
  'aa31e02a-400f-11db-9590-000c2911d1b8': 'VMware VMFS',
};

export function gptTypeName(guid: string): string {
  return GPT_TYPES[guid] ?? `unknown type ${guid}`;
}

/** A GPT GUID as text: the first three fields are little-endian on disk. */
export function guidText(b: Buffer, at: number): string {
  const h = (s: number, e: number) => b.subarray(at + s, at + e).toString('hex');
  const le = (s: number, e: number) => Buffer.from(b.subarray(at + s, at + e)).reverse().toString('hex');
  return `${le(0, 4)}-${le(4, 6)}-${le(6, 8)}-${h(8, 10)}-${h(10, 16)}`;
}
