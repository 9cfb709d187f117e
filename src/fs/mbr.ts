// The MBR partition table: four primary entries in sector 0, and for an extended partition the chain
// of EBRs (each one logical partition and a link to the next). Every entry is checked against the
// disk's size and against the others; a chain that loops or leaves its extended partition, or
// partitions that overlap, throw: the caller copies the whole disk and says why.
import type { BlockReader } from '../device/device';
import { mbrTypeName, type Partition, type PartitionTable } from './partition-types';
import { CorruptFileSystemError } from './used-map';

const SECTOR = 512;
const ENTRY_OFF = 446;
const MAX_LOGICAL = 256;
const EXTENDED = new Set([0x05, 0x0f, 0x85]);
export const GPT_PROTECTIVE = 0xee;

function corrupt(message: string): CorruptFileSystemError {
  return new CorruptFileSystemError('mbr', message);
}

interface RawEntry {
  status: number;
  type: number;
  start: number;
  sectors: number;
}

function entries(sector: Buffer): RawEntry[] {
  const out: RawEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const o = ENTRY_OFF + 16 * i;
    out.push({ status: sector[o]!, type: sector[o + 4]!, start: sector.readUInt32LE(o + 8), sectors: sector.readUInt32LE(o + 12) });
  }
  return out;
}

const hasSignature = (s: Buffer) => s.length >= SECTOR && s[510] === 0x55 && s[511] === 0xaa;

/** True when sector 0 holds a partition table: the signature, sane status bytes, one used entry. */
export function looksLikeMbr(sector0: Buffer): boolean {
  if (!hasSignature(sector0)) return false;
  const es = entries(sector0);
  if (es.some((e) => e.status !== 0 && e.status !== 0x80)) return false;
  return es.some((e) => e.type !== 0 && e.sectors !== 0);
}

/** True when sector 0 is a GPT's protective (or hybrid) MBR. */
export function isProtectiveMbr(sector0: Buffer): boolean {
  return looksLikeMbr(sector0) && entries(sector0).some((e) => e.type === GPT_PROTECTIVE);
}

export async function readMbr(reader: BlockReader): Promise<PartitionTable> {
  const diskSectors = Math.floor(reader.size / SECTOR);
  if (diskSectors < 2) throw corrupt(`the device (${reader.size} bytes) is too small for a partition table`);
  const s0 = await reader.read(0, SECTOR);
  if (!hasSignature(s0)) throw corrupt('sector 0 has no MBR signature (0x55aa)');
  const notes: string[] = [];
  const tableRanges: Array<[number, number]> = [[0, SECTOR]];
  const primaries: Array<{ number: number; start: number; sectors: number; type: number }> = [];
  let extended: { number: number; start: number; sectors: number } | undefined;
  entries(s0).forEach((e, i) => {
    if (e.status !== 0 && e.status !== 0x80) throw corrupt(`entry ${i + 1} has status byte 0x${e.status.toString(16)} (only 0x00 and 0x80 exist)`);
    if (e.type === 0 || e.sectors === 0) return;
    if (e.start === 0) throw corrupt(`partition ${i + 1} starts at sector 0, on top of the partition table`);
    if (e.start + e.sectors > diskSectors) {
      throw corrupt(`partition ${i + 1} (sectors ${e.start}..${e.start + e.sectors - 1}) runs past the end of the disk (${diskSectors} sectors)`);
    }
    if (EXTENDED.has(e.type)) {
      if (extended) throw corrupt(`partitions ${extended.number} and ${i + 1} are both extended partitions`);
      extended = { number: i + 1, start: e.start, sectors: e.sectors };
    } else if (e.type === GPT_PROTECTIVE) {
      throw corrupt(`partition ${i + 1} is a GPT protective entry but no valid GPT was found`);
    }
    primaries.push({ number: i + 1, start: e.start, sectors: e.sectors, type: e.type });
  });
  const sorted = [...primaries].sort((a, b) => a.start - b.start);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1]!, b = sorted[i]!;
    if (b.start < a.start + a.sectors) throw corrupt(`partitions ${a.number} and ${b.number} overlap (sectors ${b.start}..${Math.min(a.start + a.sectors, b.start + b.sectors) - 1})`);
  }
  const partitions: Partition[] = primaries
    .filter((p) => !EXTENDED.has(p.type))
    .map((p) => ({ number: p.number, offset: p.start * SECTOR, size: p.sectors * SECTOR, typeId: hexType(p.type), typeName: mbrTypeName(p.type) }));

  if (extended) {
    const ext = extended;
    const extEnd = ext.start + ext.sectors;
    const seen = new Set<number>();
    const logicals: Array<{ start: number; sectors: number; ebr: number }> = [];
    let ebr = ext.start;
    let number = 5;
    for (let links = 0; ; links++) {
      if (seen.has(ebr)) throw corrupt(`the extended partition's EBR chain loops back to sector ${ebr}`);
      if (links >= MAX_LOGICAL) throw corrupt(`the EBR chain has more than ${MAX_LOGICAL} links`);
      seen.add(ebr);
      const s = await reader.read(ebr * SECTOR, SECTOR);
      if (!hasSignature(s)) throw corrupt(`the EBR at sector ${ebr} has no signature (0x55aa)`);
      tableRanges.push([ebr * SECTOR, (ebr + 1) * SECTOR]);
      const [data, link] = entries(s);
      if (data!.type !== 0 && data!.sectors !== 0) {
        if (EXTENDED.has(data!.type)) throw corrupt(`the EBR at sector ${ebr} holds an extended partition where a logical one belongs`);
        const start = ebr + data!.start;
        if (data!.start === 0) throw corrupt(`logical partition ${number} starts on its own EBR (sector ${ebr})`);
        if (start + data!.sectors > extEnd) {
          throw corrupt(`logical partition ${number} (sectors ${start}..${start + data!.sectors - 1}) runs past the end of the extended partition (sector ${extEnd - 1})`);
        }
        logicals.push({ start, sectors: data!.sectors, ebr });
        partitions.push({ number, offset: start * SECTOR, size: data!.sectors * SECTOR, typeId: hexType(data!.type), typeName: mbrTypeName(data!.type) });
        number++;
      }
      if (link!.type === 0 || link!.sectors === 0) break;
      if (!EXTENDED.has(link!.type)) throw corrupt(`the EBR at sector ${ebr} links to a type 0x${link!.type.toString(16)} entry, not to the next EBR`);
      const next = ext.start + link!.start;
      if (link!.start === 0 || next >= extEnd) throw corrupt(`the EBR at sector ${ebr} links to sector ${next}, outside the extended partition (sectors ${ext.start}..${extEnd - 1})`);
      ebr = next;
    }
    // Logical partitions must not overlap each other or any EBR.
    const ls = [...logicals].sort((a, b) => a.start - b.start);
    for (let i = 1; i < ls.length; i++) {
      if (ls[i]!.start < ls[i - 1]!.start + ls[i - 1]!.sectors) throw corrupt(`logical partitions at sectors ${ls[i - 1]!.start} and ${ls[i]!.start} overlap`);
    }
    for (const e of seen) {
      const hit = ls.find((l) => e >= l.start && e < l.start + l.sectors);
      if (hit) throw corrupt(`the EBR at sector ${e} lies inside the logical partition at sectors ${hit.start}..${hit.start + hit.sectors - 1}`);
    }
    if (logicals.length === 0) notes.push(`extended partition ${ext.number} holds no logical partitions`);
  }
  partitions.sort((a, b) => a.offset - b.offset);
  return { kind: 'mbr', sectorSize: SECTOR, partitions, tableRanges, notes };
}

function hexType(t: number): string {
  return `0x${t.toString(16).padStart(2, '0')}`;
}
