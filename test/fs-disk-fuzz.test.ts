// Hostile tables and metadata: the sectors the whole-disk reader reads from small real disks (GPT
// and MBR, with FAT, ext4, swap, btrfs, NTFS, an LVM PV) are held in memory and damaged, first in
// named ways (bad CRCs, entries past the end, overlapping partitions, EBR chains that loop or leave
// their extended partition, LVM labels, headers and metadata text that lie, a ring buffer that
// wraps), then by random byte flips, half of them with the CRCs repaired so the deeper checks are
// reached. readUsedBlockMap must return a consistent map, and fall back loudly (a note naming what
// was wrong) where a table cannot be trusted: never throw, never hang. The LVM text parser is
// fuzzed on its own.
import test, { type ExecutionContext } from 'ava';
import { ArchiveError } from '../src/archive/errors';
import { validateManifest } from '../src/archive/manifest';
import { readUsedBlockMap } from '../src/fs/detect';
import type { LayoutNode } from '../src/fs/layout';
import { crc32, crc32Update, LVM_INITIAL_CRC } from '../src/fs/crc32';
import { parseVg } from '../src/fs/lvm';
import { LvmShapeError, LvmTextError, parseLvmText } from '../src/fs/lvm-text';
import type { UsedBlockMap } from '../src/fs/used-map';
import { crc32c } from '../src/fs/xfs-btree';
import { makeDisk, type BuiltDisk, type DiskSpec } from './helpers/disks';
import { capture, MemReader } from './helpers/mem-reader';
import { serialIf } from './helpers/skip';
import { rng, scratchDir, seedFromEnv } from './helpers/system';

const MiB = 1 << 20;
const S = 512;
const needs = serialIf({ root: true, commands: ['sfdisk', 'losetup', 'mount', 'mkfs.ext4', 'mkfs.btrfs', 'mkfs.ntfs', 'ntfs-3g', 'mkfs.vfat', 'mcopy', 'mkswap', 'pvcreate'] });

async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const to = new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new Error(`readUsedBlockMap did not finish in ${ms} ms (hang)`)), ms); });
  try { return await Promise.race([p, to]); } finally { clearTimeout(timer); }
}

function consistent(t: ExecutionContext, m: UsedBlockMap, size: number, what: string): void {
  const ok = m.totalBlocks === Math.ceil(size / m.blockSize) && m.bitmap.size === m.totalBlocks && m.usedBlocks === m.bitmap.count() && !!m.layout
    && (!m.allBlocks || m.usedBlocks === m.totalBlocks);
  if (!ok) t.fail(`${what}: inconsistent map (${m.filesystem}, ${m.usedBlocks}/${m.totalBlocks} of ${m.blockSize})`);
}

const allNotes = (m: UsedBlockMap) => m.notes.join('\n');
function nodes(root: LayoutNode, pred: (n: LayoutNode) => boolean): LayoutNode[] {
  const out: LayoutNode[] = [];
  const walk = (n: LayoutNode) => { if (pred(n)) out.push(n); n.children.forEach(walk); };
  walk(root);
  return out;
}

// --- GPT repairs: the CRCs recomputed after an edit, so the checks behind them are reached.
function gptHeaderAt(mem: MemReader, lba: number): Buffer { return mem.bytes(lba * S, S); }
function fixGpt(mem: MemReader, lba: number): MemReader {
  const h = gptHeaderAt(mem, lba);
  const arrLba = Number(h.readBigUInt64LE(72) % 1000000n);
  const n = Math.min(h.readUInt32LE(80), 1024), size = Math.min(h.readUInt32LE(84), 1024);
  const arr = mem.bytes(arrLba * S, n * size);
  h.writeUInt32LE(crc32(arr), 88);
  h.writeUInt32LE(0, 16);
  h.writeUInt32LE(crc32(h, 0, Math.min(Math.max(h.readUInt32LE(12), 92), S)), 16);
  return mem.withBytes(lba * S, h);
}
function editGptEntries(mem: MemReader, lbaOfHeader: number, edit: (arr: Buffer) => void): MemReader {
  const h = gptHeaderAt(mem, lbaOfHeader);
  const arrLba = Number(h.readBigUInt64LE(72));
  const arr = mem.bytes(arrLba * S, h.readUInt32LE(80) * h.readUInt32LE(84));
  edit(arr);
  return fixGpt(mem.withBytes(arrLba * S, arr), lbaOfHeader);
}

// --- LVM repairs.
interface PvAt { offset: number }
function fixLvmLabel(mem: MemReader, pv: PvAt): MemReader {
  const l = mem.bytes(pv.offset + S, S);
  l.writeUInt32LE(crc32Update(LVM_INITIAL_CRC, l, 20, S), 16);
  return mem.withBytes(pv.offset + S, l);
}
function mdaOf(mem: MemReader, pv: PvAt): { at: number; size: number; textOff: number; textLen: number } {
  const l = mem.bytes(pv.offset + S, S);
  const mdaAt = pv.offset + Number(l.readBigUInt64LE(32 + 40 + 32));
  const h = mem.bytes(mdaAt, S);
  return { at: mdaAt, size: Number(h.readBigUInt64LE(32)), textOff: Number(h.readBigUInt64LE(40)), textLen: Number(h.readBigUInt64LE(48)) };
}
function fixMda(mem: MemReader, pv: PvAt, text?: Buffer): MemReader {
  const m = mdaOf(mem, pv);
  if (!Number.isSafeInteger(m.at) || m.at > mem.size || m.textLen > 4 * MiB || m.textOff > m.size) return mem;
  const h = mem.bytes(m.at, S);
  const body = text ?? mem.bytes(m.at + m.textOff, m.textLen);
  h.writeBigUInt64LE(BigInt(body.length), 48);
  h.writeUInt32LE(crc32Update(LVM_INITIAL_CRC, body), 56);
  h.writeUInt32LE(crc32Update(LVM_INITIAL_CRC, h, 4, S), 0);
  let out = mem.withBytes(m.at, h);
  if (text) out = out.withBytes(m.at + m.textOff, text);
  return out;
}
const mdaText = (mem: MemReader, pv: PvAt) => { const m = mdaOf(mem, pv); return mem.bytes(m.at + m.textOff, m.textLen).toString('latin1'); };


let gptDisk: { disk: BuiltDisk; mem: MemReader; base: UsedBlockMap } | undefined;
let lvmDisk: { disk: BuiltDisk; mem: MemReader; base: UsedBlockMap } | undefined;
let mbrDisk: { disk: BuiltDisk; mem: MemReader; base: UsedBlockMap } | undefined;

async function built(t: ExecutionContext, kind: 'gpt' | 'lvm' | 'mbr') {
  const seed = 4242;
  const dir = scratchDir(t, 'livesnap-fuzz-');
  const spec: DiskSpec = kind === 'gpt'
    ? { label: 'gpt', sizeMiB: 200, seed, parts: [{ fs: 'fat', sizeMiB: 16, dataMiB: 1 }, { fs: 'ext4', sizeMiB: 16, dataMiB: 2 }, { fs: 'swap', sizeMiB: 8 }, { fs: 'btrfs', sizeMiB: 120, dataMiB: 2 }, { fs: 'ntfs', sizeMiB: 8, dataMiB: 1 }] }
    : kind === 'lvm'
      ? { label: 'gpt', sizeMiB: 64, seed, parts: [{ fs: 'lvm', sizeMiB: 48 }], lvs: [{ name: 'a', fs: 'ext4', sizeMiB: 16, dataMiB: 2 }, { name: 'b', fs: 'ext4', sizeMiB: 8, dataMiB: 1 }] }
      : { label: 'dos', primaries: 2, sizeMiB: 64, seed, parts: [{ fs: 'ext4', sizeMiB: 12, dataMiB: 1 }, { fs: 'swap', sizeMiB: 4 }, { fs: 'ext4', sizeMiB: 8, dataMiB: 1 }, { fs: 'swap', sizeMiB: 4 }, { fs: 'raw', sizeMiB: 4, dataMiB: 1 }] };
  const disk = makeDisk(t, dir, spec);
  const mem = await capture(disk.file, (r) => readUsedBlockMap(r));
  const base = await readUsedBlockMap(mem);
  t.false(base.allBlocks, allNotes(base));
  return { disk, mem, base };
}

needs('GPT: damaged primary (header CRC, entry CRC) uses the backup and says so; both damaged, entries past the end or overlapping: the whole disk, loudly', async (t) => {
  gptDisk ??= await built(t, 'gpt');
  const { mem, base, disk } = gptDisk;
  const lastLba = disk.size / S - 1;
  // Primary header CRC.
  const h = gptHeaderAt(mem, 1); h[20] ^= 0x55;
  let m = await readUsedBlockMap(mem.withBytes(S, h));
  t.false(m.allBlocks);
  t.regex(allNotes(m), /primary GPT is damaged \(primary header CRC32 mismatch.*backup GPT at the end of the disk is used/);
  t.is(m.usedBlocks, base.usedBlocks);
  // Primary entry array CRC.
  const arr = mem.bytes(2 * S, S); arr[40] ^= 1;
  m = await readUsedBlockMap(mem.withBytes(2 * S, arr));
  t.regex(allNotes(m), /primary entry array CRC32 mismatch/);
  t.false(m.allBlocks);
  // Both headers broken.
  const hb = gptHeaderAt(mem, lastLba); hb[20] ^= 0x55;
  m = await readUsedBlockMap(mem.withBytes(S, h).withBytes(lastLba * S, hb));
  t.true(m.allBlocks);
  t.regex(allNotes(m), /GPT partition table cannot be trusted \(primary GPT: primary header CRC32 mismatch.*backup GPT at the last LBA: backup header CRC32 mismatch.*the whole disk is copied/);
  consistent(t, m, disk.size, 'both broken');
  // An entry past the usable area, in both copies, CRCs valid.
  const past = (a: Buffer) => a.writeBigUInt64LE(BigInt(lastLba + 100), 128 + 40);
  let bad = editGptEntries(editGptEntries(mem, 1, past), lastLba, past);
  m = await readUsedBlockMap(bad);
  t.true(m.allBlocks);
  t.regex(allNotes(m), /entry 2 \(LBA \d+\.\.\d+\) lies outside the usable area/);
  // Overlapping entries (2 reaches into 3), in both copies.
  const overlap = (a: Buffer) => a.writeBigUInt64LE(a.readBigUInt64LE(256 + 32) + 8n, 128 + 40);
  bad = editGptEntries(editGptEntries(mem, 1, overlap), lastLba, overlap);
  m = await readUsedBlockMap(bad);
  t.true(m.allBlocks);
  t.regex(allNotes(m), /entries 2 and 3 overlap/);
  // A header that claims a huge entry array.
  const huge = gptHeaderAt(mem, 1); huge.writeUInt32LE(0x7fffffff, 80);
  m = await readUsedBlockMap(fixGpt(mem.withBytes(S, huge), 1));
  t.regex(allNotes(m), /entry array \(2147483647 x 128 bytes\) is impossible/);
  // An unknown partition type's contents: named, and copied whole.
  const unknown = (a: Buffer) => { a.fill(0x77, 128, 128 + 16); };
  const dr = editGptEntries(editGptEntries(mem, 1, unknown), lastLba, unknown);
  m = await readUsedBlockMap(dr);
  const p2 = m.layout!.children.find((n) => n.name.startsWith('partition 2'))!;
  t.regex(p2.name, /unknown type 77777777-7777-7777-7777-777777777777/);
  t.is(p2.content, 'ext4', 'the type only names it: the contents decide');
});

needs('MBR: overlapping primaries, a partition past the end, EBR chains that loop or leave the extended partition: the whole disk, loudly', async (t) => {
  mbrDisk ??= await built(t, 'mbr');
  const { mem, disk } = mbrDisk;
  const s0 = mem.bytes(0, S);
  const ent = (i: number) => 446 + 16 * i;
  const sectors = disk.size / S;
  const check = async (name: string, edited: MemReader, re: RegExp) => {
    const m = await readUsedBlockMap(edited);
    t.true(m.allBlocks, name);
    t.regex(allNotes(m), re, name);
    consistent(t, m, disk.size, name);
  };
  let b = Buffer.from(s0); b.writeUInt32LE(b.readUInt32LE(ent(0) + 12) + 4096, ent(0) + 12);
  await check('overlap', mem.withBytes(0, b), /MBR partition table cannot be trusted \(partitions 1 and 2 overlap/);
  b = Buffer.from(s0); b.writeUInt32LE(sectors, ent(1) + 12);
  await check('past the end', mem.withBytes(0, b), /partition 2 \(sectors \d+\.\.\d+\) runs past the end of the disk/);
  // The extended partition and its chain.
  const extStart = s0.readUInt32LE(ent(2) + 8);
  const ebrs: number[] = [extStart];
  for (;;) {
    const e = mem.bytes(ebrs[ebrs.length - 1]! * S, S);
    const next = e.readUInt32LE(446 + 16 + 8);
    if (e[446 + 16 + 4] === 0) break;
    ebrs.push(extStart + next);
  }
  t.is(ebrs.length, 3, 'three logical partitions, three EBRs');
  const last = mem.bytes(ebrs[2]! * S, S);
  const loop = Buffer.from(last); loop[446 + 16 + 4] = 0x05; loop.writeUInt32LE(ebrs[1]! - extStart, 446 + 16 + 8); loop.writeUInt32LE(2048, 446 + 16 + 12);
  await check('loop', mem.withBytes(ebrs[2]! * S, loop), new RegExp(`EBR chain loops back to sector ${ebrs[1]}`));
  const self = Buffer.from(mem.bytes(ebrs[1]! * S, S)); self.writeUInt32LE(ebrs[1]! - extStart, 446 + 16 + 8);
  await check('self loop', mem.withBytes(ebrs[1]! * S, self), /loops back/);
  const out = Buffer.from(last); out[446 + 16 + 4] = 0x05; out.writeUInt32LE(sectors, 446 + 16 + 8); out.writeUInt32LE(2048, 446 + 16 + 12);
  await check('link outside', mem.withBytes(ebrs[2]! * S, out), /links to sector \d+, outside the extended partition/);
  const long = Buffer.from(last); long.writeUInt32LE(s0.readUInt32LE(ent(2) + 12), 446 + 12);
  await check('logical past extended', mem.withBytes(ebrs[2]! * S, long), /logical partition 7 .* runs past the end of the extended partition/);
  const nosig = Buffer.from(last); nosig[511] = 0;
  await check('EBR without signature', mem.withBytes(ebrs[2]! * S, nosig), /EBR at sector \d+ has no signature/);
  // An unknown type (0xda) with data: copied whole, named.
  const m = await readUsedBlockMap(mem);
  const raw = m.layout!.children.find((n) => n.name.includes('Non-FS data'))!;
  t.is(raw.content, 'unknown');
  t.true(raw.allBlocks);
  t.is(raw.usedBytes, raw.size);
  t.regex(raw.notes.join('\n'), /contents unknown, copied whole/);
});

needs('LVM: bad label, header and text CRCs, garbage and lying metadata copy the whole PV and say why; a wrapped ring buffer reads as before', async (t) => {
  lvmDisk ??= await built(t, 'lvm');
  const { mem, base, disk } = lvmDisk;
  const pv = { offset: disk.parts[0]!.offset };
  const pvSize = disk.parts[0]!.size;
  const pvNode = (m: UsedBlockMap) => nodes(m.layout!, (n) => n.kind === 'partition')[0]!;
  const wholePv = async (name: string, edited: MemReader, re: RegExp) => {
    const m = await readUsedBlockMap(edited);
    consistent(t, m, disk.size, name);
    const n = pvNode(m);
    t.true(n.allBlocks, name);
    t.is(n.usedBytes, pvSize, `${name}: the whole PV is copied`);
    t.regex(allNotes(m), re, name);
  };
  t.is(nodes(base.layout!, (n) => n.kind === 'lvm-lv' && n.content === 'ext4').length, 2);
  // Label CRC.
  const l = mem.bytes(pv.offset + S, S); l[40] ^= 1;
  await wholePv('label', mem.withBytes(pv.offset + S, l), /label CRC mismatch/);
  // A label pointing a metadata area past the PV, CRC valid.
  const l2 = mem.bytes(pv.offset + S, S); l2.writeBigUInt64LE(BigInt(pvSize * 2), 32 + 40 + 32);
  await wholePv('area past the end', fixLvmLabel(mem.withBytes(pv.offset + S, l2), pv), /lies past the end of the PV/);
  // mda header CRC, text CRC.
  const md = mdaOf(mem, pv);
  const h = mem.bytes(md.at, S); h[30] ^= 1;
  await wholePv('mda header', mem.withBytes(md.at, h), /header CRC mismatch.*whole PV is copied/s);
  const txt = mem.bytes(md.at + md.textOff, md.textLen); txt[10] ^= 1;
  await wholePv('text CRC', mem.withBytes(md.at + md.textOff, txt), /metadata text CRC mismatch/);
  // Garbage text with a valid CRC.
  const garbage = Buffer.from('vg { id = "x" seqno = [ unterminated '.padEnd(md.textLen, '{'), 'latin1');
  await wholePv('garbage', fixMda(mem, pv, garbage), /metadata area at byte 4096: line 1:/);
  // Metadata that gives the same extent to both LVs.
  const text = mdaText(mem, pv);
  const lying = text.replace(/(b \{[\s\S]*?stripes = \[\s*"pv0", )(\d+)/, '$10');
  t.not(lying, text);
  await wholePv('overlap', fixMda(mem, pv, Buffer.from(lying, 'latin1')), /extent 0 of pv0 is given to both LV a and LV b/);
  // An LV past the PV's extents.
  const past = text.replace(/(b \{[\s\S]*?stripes = \[\s*"pv0", )(\d+)/, '$1999');
  await wholePv('past', fixMda(mem, pv, Buffer.from(past, 'latin1')), /are past its \d+ extents/);
  // An unknown segment type: that LV copied whole and named; the other still read.
  const thin = text.replace(/(a \{[\s\S]*?type = )"striped"/, '$1"thin-pool"');
  let m = await readUsedBlockMap(fixMda(mem, pv, Buffer.from(thin, 'latin1')));
  const lvA = nodes(m.layout!, (n) => n.kind === 'lvm-lv' && n.name.endsWith('/a'))[0]!;
  t.is(lvA.content, 'thin-pool');
  t.true(lvA.allBlocks);
  t.regex(lvA.notes.join('\n'), /segment type thin-pool is not linear or striped: its \d+ extents on this device are copied whole/);
  t.is(nodes(m.layout!, (n) => n.kind === 'lvm-lv' && n.name.endsWith('/b'))[0]!.content, 'ext4');
  // The same metadata wrapped around the end of the ring buffer: the same map.
  const body = Buffer.from(text, 'latin1');
  const first = 100;
  const wrapOff = md.size - first;
  const hw = mem.bytes(md.at, S);
  hw.writeBigUInt64LE(BigInt(wrapOff), 40);
  hw.writeBigUInt64LE(BigInt(body.length), 48);
  hw.writeUInt32LE(crc32Update(LVM_INITIAL_CRC, body), 56);
  hw.writeUInt32LE(crc32Update(LVM_INITIAL_CRC, hw, 4, S), 0);
  const wrapped = mem.withBytes(md.at, hw).withBytes(md.at + wrapOff, body.subarray(0, first)).withBytes(md.at + S, body.subarray(first));
  m = await readUsedBlockMap(wrapped);
  t.false(pvNode(m).allBlocks, allNotes(m));
  t.is(m.usedBlocks, base.usedBlocks, 'a wrapped copy reads the same');
});

needs('random damage to every sector read (GPT, MBR, LVM disks; half with CRCs repaired): a consistent map, no exception, no hang', async (t) => {
  const seed = seedFromEnv(t);
  gptDisk ??= await built(t, 'gpt');
  mbrDisk ??= await built(t, 'mbr');
  lvmDisk ??= await built(t, 'lvm');
  const r = rng(seed);
  let fallbacks = 0, runs = 0;
  for (const [name, d, iterations] of [['gpt', gptDisk, 150], ['mbr', mbrDisk, 80], ['lvm', lvmDisk, 120]] as const) {
    const keys = [...d.mem.sectors.keys()];
    const lastLba = d.disk.size / S - 1;
    for (let i = 0; i < iterations; i++) {
      let mem = d.mem;
      const flips = 1 + Math.floor(r() * 4);
      for (let f = 0; f < flips; f++) {
        // Mostly the tables and the first sectors of every volume, sometimes anywhere.
        const s = r() < 0.6 ? keys[Math.floor(r() * Math.min(keys.length, 64))]! : keys[Math.floor(r() * keys.length)]!;
        const b = Buffer.from(mem.sectors.get(s)!);
        const at = Math.floor(r() * S);
        b[at] = r() < 0.3 ? 0xff : b[at]! ^ (1 << Math.floor(r() * 8));
        mem = mem.withBytes(s * S, b);
      }
      if (r() < 0.5) {
        if (name !== 'mbr') { mem = fixGpt(mem, 1); mem = fixGpt(mem, lastLba); }
        if (name === 'lvm') { const pv = { offset: d.disk.parts[0]!.offset }; mem = fixLvmLabel(mem, pv); try { mem = fixMda(mem, pv); } catch { /* the header itself is garbage */ } }
        // btrfs tree blocks and superblock: checksums repaired (crc32c over bytes 32..).
        for (const p of d.disk.parts.filter((x) => x.fs === 'btrfs')) {
          const sb = mem.bytes(p.offset + 0x10000, 4096);
          sb.writeUInt32LE(crc32c(sb.subarray(32)), 0);
          mem = mem.withBytes(p.offset + 0x10000, sb);
        }
      }
      let m: UsedBlockMap;
      try {
        m = await withTimeout(readUsedBlockMap(mem), 20_000);
      } catch (e) {
        t.fail(`${name} iteration ${i}: ${(e as Error).stack}`);
        return;
      }
      consistent(t, m, d.disk.size, `${name} iteration ${i}`);
      runs++;
      if (m.allBlocks || nodes(m.layout!, (n) => n.allBlocks).length) fallbacks++;
      if (nodes(m.layout!, (n) => n.allBlocks && n.notes.length === 0 && n.children.length === 0).length) t.fail(`${name} iteration ${i}: something copied whole without a note`);
    }
  }
  t.log(`${runs} damaged disks read, ${fallbacks} with a part copied whole (each with its reason)`);
  t.pass();
});

test('LVM metadata text parser: random edits of real metadata parse or fail with LvmTextError / LvmShapeError, never anything else', (t) => {
  const seed = seedFromEnv(t);
  const r = rng(seed);
  const real = `# Generated by LVM2 version 2.03.16(2)
contents = "Text Format Volume Group"
version = 1
description = "Write from lvcreate -n a vg."
creation_host = "vm"	# Linux vm 6.18
creation_time = 1796220288
vg {
id = "AzVz5y-3l88-13f0-CU7E-f4kw-APAt-lxFh3v"
seqno = 5
format = "lvm2"
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192
max_lv = 0
max_pv = 0
metadata_copies = 0
physical_volumes {
pv0 {
id = "K2TJwB-fkgs-aHPm-C0ez-VbNh-hBaM-yiA2SS"
device = "/dev/loop0"
status = ["ALLOCATABLE"]
flags = []
dev_size = 409600
pe_start = 2048
pe_count = 49
}
pv1 {
id = "K2TJwB-fkgs-aHPm-C0ez-VbNh-hBaM-yiA2ST"
device = "/dev/loop1"
status = ["ALLOCATABLE"]
dev_size = 409600
pe_start = 2048
pe_count = 49
}
}
logical_volumes {
a {
id = "amHpbP-HmAS-PZ0e-SZns-1wQx-nxMp-aOGnzm"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
segment_count = 2
segment1 {
start_extent = 0
extent_count = 10
type = "striped"
stripe_count = 1
stripes = [
"pv0", 0
]
}
segment2 {
start_extent = 10
extent_count = 8
type = "striped"
stripe_count = 2
stripe_size = 128
stripes = [
"pv0", 10,
"pv1", 0
]
}
}
pool {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 {
start_extent = 0
extent_count = 4
type = "thin-pool"
metadata = "pool_tmeta"
pool = "pool_tdata"
chunk_size = 128
discards = "passdown"
}
}
}
}
`;
  const vg = parseVg(parseLvmText(real));
  t.is(vg.lvs.length, 2);
  t.is(vg.seqno, 5);
  const tokens = ['{', '}', '[', ']', '=', ',', '"', '\\', '#', '\n', '-', '99999999999999999999', '1.5', 'x', '\0', ' '];
  let ok = 0, text = 0, shape = 0;
  for (let i = 0; i < 3000; i++) {
    let s = real;
    const edits = 1 + Math.floor(r() * 4);
    for (let e = 0; e < edits; e++) {
      const at = Math.floor(r() * s.length);
      const k = r();
      if (k < 0.3) s = s.slice(0, at) + s.slice(at + 1 + Math.floor(r() * 8));
      else if (k < 0.7) s = s.slice(0, at) + tokens[Math.floor(r() * tokens.length)] + s.slice(at);
      else if (k < 0.85) s = s.slice(0, at);
      else s = s.slice(0, at) + String(Math.floor(r() * 1e6)) + s.slice(at + 1);
    }
    try {
      parseVg(parseLvmText(s));
      ok++;
    } catch (e) {
      if (e instanceof LvmTextError) text++;
      else if (e instanceof LvmShapeError) shape++;
      else return t.fail(`iteration ${i}: ${(e as Error).stack}\n${s.slice(0, 300)}`);
    }
  }
  // Deep nesting and long lists are bounded, not a stack overflow.
  t.throws(() => parseLvmText('a '.repeat(1) + '{ b '.repeat(10000)), { instanceOf: LvmTextError });
  t.throws(() => parseLvmText(`x = ${'['.repeat(10000)}`), { instanceOf: LvmTextError });
  t.throws(() => parseLvmText('x = 1\nx = 2'), { instanceOf: LvmTextError, message: /line 2: "x" is given twice/ });
  t.log(`3000 edited copies: ${ok} parsed, ${text} refused by the parser, ${shape} by the shape checks`);
  t.true(text > 100 && shape > 100);
});

test('manifest: an archive without a layout (written before it existed) still validates; a malformed layout is refused by name', (t) => {
  const old: Record<string, unknown> = {
    format: 'livesnap-archive', formatVersion: 1, toolVersion: '0.1.0', source: '/dev/sdb1', filesystem: 'ext4', snapshotTime: '2026-12-01T00:00:00.000Z',
    volumeSize: 1 << 30, blockSize: 4096, totalBlocks: 262144, usedBlocks: 1000, storedBytes: 4096000, sparseRegions: 3,
    sparseMapXxh128: '0'.repeat(32), checksum: 'xxh3-128', chunkSize: 1 << 20, recordSize: 10240, compression: 'none', notes: [],
  };
  t.notThrows(() => validateManifest(old, 0));
  const good = { kind: 'device', name: 'disk', content: 'gpt', size: 1 << 30, usedBytes: 4096, allBlocks: false, notes: [], children: [
    { kind: 'partition', name: 'partition 1', content: 'ext4', offset: 1 << 20, size: 1 << 29, usedBytes: 4096, allBlocks: false, notes: ['x'], children: [] },
  ] };
  t.notThrows(() => validateManifest({ ...old, layout: good }, 0));
  const bad = { ...good, children: [{ ...good.children[0], kind: 'floppy' }] };
  t.throws(() => validateManifest({ ...old, layout: bad }, 512), { instanceOf: ArchiveError, message: /manifest.json at archive offset 512 is invalid: bad "layout" \(unknown kind "floppy"\)/ });
  t.throws(() => validateManifest({ ...old, layout: { ...good, size: -1 } }, 0), { instanceOf: ArchiveError, message: /bad size/ });
});
