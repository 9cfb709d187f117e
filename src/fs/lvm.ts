// LVM2 volume groups on one device: PVs found directly on it or in its partitions, their newest valid
// metadata (highest seqno among the copies whose CRCs check), and for each LV its segments. Linear
// and striped LVs are read through their segment mapping (an LvReader) by the ordinary file-system
// readers; their used blocks are mapped back onto the PVs. Anything else (thin pools, raid, mirror,
// snapshot, cache, an LV on a PV that is not here) keeps every extent it owns, and says so. PV
// extents no LV owns are free; the label, metadata areas and any tail are kept.
import type { BlockReader } from '../device/device';
import type { MapBuilder } from './compose';
import { layoutNode, type LayoutNode } from './layout';
import { corruptLvm, readMetadataTexts, readPvLabel, findLabel, type PvLabel } from './lvm-label';
import {
  getInt, getSection, getString, getStringList, LvmShapeError, LvmTextError, parseLvmText, type LvmSection, type LvmValue,
} from './lvm-text';
import { CorruptFileSystemError, type UsedBlockMap } from './used-map';

const SECTOR = 512;

export async function probeLvm(reader: BlockReader): Promise<boolean> {
  return (await findLabel(reader)) >= 0;
}

export interface PvInput {
  /** Where the PV is, for the user: "partition 3", "the device". */
  where: string;
  reader: BlockReader;
  /** Byte offset of the PV on the device being mapped. */
  offset: number;
}

interface VgPv {
  name: string;
  uuid: string;
  peStart: number;
  peCount: number;
}

interface Area {
  pv: string;
  start: number;
  count: number;
}

interface Segment {
  startExtent: number;
  extentCount: number;
  type: string;
  /** striped only: the stripes, each `extentCount / stripes.length` extents long. */
  stripes: Area[];
  stripeSize: number;
  /** Every PV area the segment owns (for any type). */
  areas: Area[];
}

interface Lv {
  name: string;
  visible: boolean;
  segments: Segment[];
  extents: number;
  /** Names of other LVs this LV's segments refer to (pool, origin, images...). */
  refs: Set<string>;
}

export interface Vg {
  name: string;
  id: string;
  seqno: number;
  extentSize: number;
  pvs: Map<string, VgPv>;
  lvs: Lv[];
}

const stripDashes = (s: string) => s.replace(/-/g, '');

function isPow2(n: number): boolean {
  return n > 0 && Number.isInteger(Math.log2(n));
}

/** Turns parsed metadata into a checked VG; throws LvmShapeError. */
export function parseVg(root: LvmSection): Vg {
  const names = [...root.sections.keys()];
  if (names.length !== 1) throw new LvmShapeError(`metadata holds ${names.length} volume groups (one expected)`);
  const name = names[0]!;
  const vg = root.sections.get(name)!;
  const where = `VG ${name}`;
  const extentSize = getInt(vg, 'extent_size', where, { min: 1 });
  if (!isPow2(extentSize) && extentSize % 128 !== 0) throw new LvmShapeError(`${where}: extent size ${extentSize} sectors is not a power of two or a multiple of 64 KiB`);
  const pvs = new Map<string, VgPv>();
  const pvSec = getSection(vg, 'physical_volumes', where);
  for (const [pvName, s] of pvSec.sections) {
    const w = `${where}, PV ${pvName}`;
    pvs.set(pvName, {
      name: pvName,
      uuid: stripDashes(getString(s, 'id', w)),
      peStart: getInt(s, 'pe_start', w),
      peCount: getInt(s, 'pe_count', w),
    });
  }
  const lvs: Lv[] = [];
  const lvSec = vg.sections.get('logical_volumes');
  for (const [lvName, s] of lvSec?.sections ?? []) {
    const w = `${where}, LV ${lvName}`;
    const status = getStringList(s, 'status', w);
    const count = getInt(s, 'segment_count', w, { min: 1 });
    const segments: Segment[] = [];
    const refs = new Set<string>();
    for (let k = 1; k <= count; k++) {
      const seg = getSection(s, `segment${k}`, w);
      const sw = `${w}, segment ${k}`;
      const type = getString(seg, 'type', sw);
      const startExtent = getInt(seg, 'start_extent', sw);
      const extentCount = getInt(seg, 'extent_count', sw, { min: 1 });
      let stripes: Area[] = [];
      let stripeSize = 0;
      const areas: Area[] = [];
      if (type === 'striped') {
        const n = getInt(seg, 'stripe_count', sw, { min: 1 });
        const list = seg.values.get('stripes');
        if (!Array.isArray(list) || list.length !== 2 * n) throw new LvmShapeError(`${sw}: "stripes" must list ${n} PV and extent pairs`);
        if (extentCount % n !== 0) throw new LvmShapeError(`${sw}: ${extentCount} extents do not split into ${n} stripes`);
        if (n > 1) {
          stripeSize = getInt(seg, 'stripe_size', sw, { min: 1 });
          if (!isPow2(stripeSize) || (extentSize % stripeSize !== 0)) throw new LvmShapeError(`${sw}: stripe size ${stripeSize} sectors does not divide the extent size ${extentSize}`);
        }
        for (let j = 0; j < n; j++) {
          const pv = list[2 * j];
          const start = list[2 * j + 1];
          if (typeof pv !== 'string' || typeof start !== 'number' || !Number.isSafeInteger(start) || start < 0) throw new LvmShapeError(`${sw}: stripe ${j} is not a PV name and a starting extent`);
          stripes.push({ pv, start, count: extentCount / n });
        }
        areas.push(...stripes);
      } else {
        // Any other type: every (PV name, extent) pair in its lists is an area it owns, at most
        // extent_count extents long; every other name it mentions may be an LV it uses.
        const scan = (v: LvmValue) => {
          if (typeof v === 'string') refs.add(v);
          else if (Array.isArray(v)) {
            for (let j = 0; j < v.length; j++) {
              const x = v[j]!;
              const y = v[j + 1];
              if (typeof x === 'string' && pvs.has(x) && typeof y === 'number') {
                if (!Number.isSafeInteger(y) || y < 0) throw new LvmShapeError(`${sw}: area on ${x} starts at extent ${y}`);
                areas.push({ pv: x, start: y, count: extentCount });
                j++;
              } else scan(x);
            }
          }
        };
        for (const v of seg.values.values()) scan(v);
        stripes = [];
      }
      segments.push({ startExtent, extentCount, type, stripes, stripeSize, areas });
    }
    segments.sort((a, b) => a.startExtent - b.startExtent);
    let next = 0;
    for (const sg of segments) {
      if (sg.startExtent !== next) throw new LvmShapeError(`${w}: segments leave a hole or overlap at extent ${next}`);
      next += sg.extentCount;
    }
    lvs.push({ name: lvName, visible: status.includes('VISIBLE'), segments, extents: next, refs });
  }
  const lvNames = new Set(lvs.map((l) => l.name));
  for (const lv of lvs) for (const r of [...lv.refs]) if (!lvNames.has(r) || r === lv.name) lv.refs.delete(r);
  // No two areas may share an extent, and every area lies inside its PV.
  const owner = new Map<string, Array<{ start: number; end: number; lv: string }>>();
  for (const lv of lvs) {
    for (const sg of lv.segments) {
      for (const a of sg.areas) {
        const pv = pvs.get(a.pv);
        if (!pv) throw new LvmShapeError(`${where}, LV ${lv.name}: PV "${a.pv}" is not in the volume group`);
        if (a.start + a.count > pv.peCount) throw new LvmShapeError(`${where}, LV ${lv.name}: extents ${a.start}..${a.start + a.count - 1} of ${a.pv} are past its ${pv.peCount} extents`);
        const list = owner.get(a.pv) ?? [];
        list.push({ start: a.start, end: a.start + a.count, lv: lv.name });
        owner.set(a.pv, list);
      }
    }
  }
  for (const [pv, list] of owner) {
    list.sort((a, b) => a.start - b.start);
    for (let i = 1; i < list.length; i++) {
      if (list[i]!.start < list[i - 1]!.end) throw new LvmShapeError(`${where}: extent ${list[i]!.start} of ${pv} is given to both LV ${list[i - 1]!.lv} and LV ${list[i]!.lv}`);
    }
  }
  return { name, id: getString(vg, 'id', where), seqno: getInt(vg, 'seqno', where), extentSize, pvs, lvs };
}

/** A PV found on the device, with what could be read of it. */
interface PvScan {
  input: PvInput;
  label?: PvLabel;
  /** Why the PV cannot be used (no label, no valid metadata). */
  problem?: string;
  notes: string[];
  vg?: Vg;
  /** The VG's PV name ("pv0") of this PV. */
  pvName?: string;
  orphan: boolean;
}

/** Where an LV's bytes live: a list of pieces on PVs of this device. */
export class LvReader implements BlockReader {
  readonly size: number;
  private readonly extentBytes: number;

  constructor(private readonly lv: Lv, vg: Vg, private readonly pvReaders: Map<string, { reader: BlockReader; peStartBytes: number; offset: number }>) {
    this.extentBytes = vg.extentSize * SECTOR;
    this.size = lv.extents * this.extentBytes;
  }

  /** The PV pieces of LV bytes [start, end): PV name, byte offset on that PV, length. */
  *pieces(start: number, end: number): Generator<{ pv: string; offset: number; length: number }> {
    let x = start;
    let k = this.segmentAt(x);
    while (x < end) {
      const sg = this.lv.segments[k]!;
      const segStart = sg.startExtent * this.extentBytes;
      const segEnd = segStart + sg.extentCount * this.extentBytes;
      if (x >= segEnd) { k++; continue; }
      const rel = x - segStart;
      const n = sg.stripes.length;
      let stripe: Area, inStripe: number, room: number;
      if (n === 1) {
        stripe = sg.stripes[0]!;
        inStripe = rel;
        room = segEnd - x;
      } else {
        const ss = sg.stripeSize * SECTOR;
        const chunk = Math.floor(rel / ss);
        stripe = sg.stripes[chunk % n]!;
        inStripe = Math.floor(chunk / n) * ss + (rel % ss);
        room = ss - (rel % ss);
      }
      const length = Math.min(room, end - x);
      const pv = this.pvReaders.get(stripe.pv)!;
      yield { pv: stripe.pv, offset: pv.peStartBytes + stripe.start * this.extentBytes + inStripe, length };
      x += length;
    }
  }

  /** Device byte ranges of LV bytes [start, end). */
  *deviceRanges(start: number, end: number): Generator<[number, number]> {
    for (const p of this.pieces(start, end)) {
      const o = this.pvReaders.get(p.pv)!.offset + p.offset;
      yield [o, o + p.length];
    }
  }

  private segmentAt(x: number): number {
    const e = Math.floor(x / this.extentBytes);
    let lo = 0, hi = this.lv.segments.length - 1;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (this.lv.segments[mid]!.startExtent <= e) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.readMany([{ offset, length }]))[0]!;
  }

  async readMany(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<Buffer[]> {
    const out = ranges.map((r) => {
      if (!(r.offset >= 0 && r.length >= 0 && r.offset + r.length <= this.size)) {
        throw new RangeError(`read of ${r.length} bytes at ${r.offset} is outside LV ${this.lv.name} (${this.size} bytes)`);
      }
      return Buffer.alloc(r.length);
    });
    // One batch per PV: every piece of every range.
    const perPv = new Map<string, Array<{ offset: number; length: number; into: Buffer; at: number }>>();
    ranges.forEach((r, i) => {
      let at = 0;
      for (const p of this.pieces(r.offset, r.offset + r.length)) {
        const list = perPv.get(p.pv) ?? [];
        list.push({ offset: p.offset, length: p.length, into: out[i]!, at });
        perPv.set(p.pv, list);
        at += p.length;
      }
    });
    await Promise.all([...perPv].map(async ([pv, list]) => {
      const bufs = await this.pvReaders.get(pv)!.reader.readMany(list.map((l) => ({ offset: l.offset, length: l.length })));
      list.forEach((l, j) => bufs[j]!.copy(l.into, l.at));
    }));
    return out;
  }
}

/** Reads the label and metadata of each PV and settles each VG's newest metadata. */
export async function scanPvs(inputs: PvInput[]): Promise<LvmPlan> {
  const scans: PvScan[] = [];
  const candidates: Array<{ vg: Vg; from: string }> = [];
  for (const input of inputs) {
    const scan: PvScan = { input, notes: [], orphan: false };
    scans.push(scan);
    try {
      scan.label = await readPvLabel(input.reader);
    } catch (e) {
      if (e instanceof CorruptFileSystemError) { scan.problem = e.message; continue; }
      throw e;
    }
    const { texts, empty, problems } = await readMetadataTexts(input.reader, scan.label);
    scan.notes.push(...problems);
    for (const t of texts) {
      try {
        candidates.push({ vg: parseVg(parseLvmText(t.text)), from: `${input.where}, metadata area at byte ${t.area}` });
      } catch (e) {
        if (e instanceof LvmTextError || e instanceof LvmShapeError) { scan.notes.push(`metadata area at byte ${t.area}: ${e.message}`); continue; }
        throw e;
      }
    }
    if (texts.length === 0 && empty > 0 && problems.length === 0) scan.orphan = true;
  }
  // Per VG id, the copy with the highest seqno (LVM's own rule); its PV list names our PVs.
  const newest = new Map<string, { vg: Vg; from: string }>();
  for (const c of candidates) {
    const cur = newest.get(c.vg.id);
    if (!cur || c.vg.seqno > cur.vg.seqno) newest.set(c.vg.id, c);
  }
  for (const scan of scans) {
    if (!scan.label) continue;
    for (const { vg } of newest.values()) {
      for (const pv of vg.pvs.values()) {
        if (pv.uuid === scan.label.uuid) { scan.vg = vg; scan.pvName = pv.name; }
      }
    }
    if (!scan.vg && !scan.orphan && !scan.problem) {
      scan.problem = `no valid LVM metadata names this PV${scan.notes.length ? ` (${scan.notes.join('; ')})` : ''}`;
    }
  }
  return new LvmPlan(scans, [...newest.values()]);
}

export class LvmPlan {
  constructor(private readonly scans: PvScan[], private readonly vgs: Array<{ vg: Vg; from: string }>) {}

  /** Byte offsets (on the device) where LVM places boundaries: PV data areas, extents, stripes. */
  boundaries(): number[] {
    const out: number[] = [];
    for (const s of this.scans) {
      if (!s.vg || !s.pvName) continue;
      const pv = s.vg.pvs.get(s.pvName)!;
      out.push(s.input.offset + pv.peStart * SECTOR, s.vg.extentSize * SECTOR);
      for (const lv of s.vg.lvs) for (const sg of lv.segments) if (sg.stripeSize) out.push(sg.stripeSize * SECTOR);
    }
    return out;
  }

  /**
   * Marks every PV's used bytes in `builder` (device coordinates) and returns one layout node per
   * input PV. `readVolume` reads the map of an LV's contents (the caller's file-system detection).
   */
  async mark(builder: MapBuilder, readVolume: (reader: BlockReader, name: string) => Promise<{ map: UsedBlockMap; node: LayoutNode }>): Promise<LayoutNode[]> {
    const nodes = new Map<PvScan, LayoutNode>();
    for (const s of this.scans) {
      const size = s.input.reader.size;
      const node = layoutNode({ kind: 'lvm-pv', name: 'LVM physical volume', content: 'lvm2', offset: s.input.offset, size, usedBytes: 0 });
      nodes.set(s, node);
      node.notes.push(...s.notes);
      if (s.problem || (!s.vg && !s.orphan)) {
        builder.markBytes(s.input.offset, s.input.offset + size);
        node.allBlocks = true;
        node.usedBytes = size;
        node.notes.push(`${s.problem ?? 'no metadata'}: the whole PV is copied`);
        continue;
      }
      if (s.orphan) {
        const pe = s.label!.dataAreas[0]?.offset ?? size;
        builder.markBytes(s.input.offset, s.input.offset + pe);
        node.name = 'LVM physical volume (in no volume group)';
        node.usedBytes = pe;
        node.notes.push('the PV belongs to no volume group: only its label and metadata areas are copied');
        continue;
      }
      const vg = s.vg!;
      const pv = vg.pvs.get(s.pvName!)!;
      const extBytes = vg.extentSize * SECTOR;
      const peStart = pv.peStart * SECTOR;
      const peEnd = peStart + pv.peCount * extBytes;
      if (peEnd > size) {
        builder.markBytes(s.input.offset, s.input.offset + size);
        node.allBlocks = true;
        node.usedBytes = size;
        node.notes.push(`VG ${vg.name} puts ${pv.peCount} extents of ${extBytes} bytes at byte ${peStart} of ${s.pvName}, past the end of the PV (${size} bytes): the whole PV is copied`);
        continue;
      }
      node.name = `LVM physical volume ${s.pvName} of VG ${vg.name}`;
      // The label, metadata area(s) and anything before the first extent; anything after the last.
      builder.markBytes(s.input.offset, s.input.offset + peStart);
      builder.markBytes(s.input.offset + peEnd, s.input.offset + size);
      node.children.push(layoutNode({ kind: 'tables', name: 'PV label and metadata', content: 'lvm2', offset: s.input.offset, size: peStart + (size - peEnd), usedBytes: peStart + (size - peEnd) }));
    }

    // LVs: those read through their mapping, and those copied whole.
    for (const { vg, from } of this.vgs) {
      const here = new Map<string, { reader: BlockReader; peStartBytes: number; offset: number; scan: PvScan }>();
      for (const s of this.scans) {
        if (s.vg !== vg || !s.pvName || nodes.get(s)!.allBlocks) continue;
        here.set(s.pvName, { reader: s.input.reader, peStartBytes: vg.pvs.get(s.pvName)!.peStart * SECTOR, offset: s.input.offset, scan: s });
      }
      if (here.size === 0) continue;
      const extBytes = vg.extentSize * SECTOR;
      const referenced = new Set<string>();
      for (const lv of vg.lvs) for (const r of lv.refs) referenced.add(r);
      const owned = new Map<string, number>(); // pv name -> allocated extents on it
      for (const lv of vg.lvs) {
        const own = lv.segments.flatMap((sg) => sg.areas).filter((a) => here.has(a.pv));
        const ownExtents = own.reduce((n, a) => n + a.count, 0);
        for (const a of own) owned.set(a.pv, (owned.get(a.pv) ?? 0) + a.count);
        const types = [...new Set(lv.segments.map((sg) => sg.type))];
        const missing = [...new Set(lv.segments.flatMap((sg) => sg.areas).map((a) => a.pv).filter((p) => !here.has(p)))];
        const readable = lv.visible && !referenced.has(lv.name) && types.length === 1 && types[0] === 'striped' && missing.length === 0;
        if (!lv.visible && ownExtents === 0) continue;
        const pvNodeOf = (pvName: string) => nodes.get(here.get(pvName)!.scan)!;
        const home = own.length ? pvNodeOf(own[0]!.pv) : [...here.values()].map((h) => nodes.get(h.scan)!)[0]!;
        const size = lv.extents * extBytes;
        const name = `lv ${vg.name}/${lv.visible ? lv.name : `[${lv.name}]`}`;
        if (readable) {
          const reader = new LvReader(lv, vg, new Map([...here].map(([k, v]) => [k, v])));
          const { map, node } = await readVolume(reader, name);
          node.kind = 'lvm-lv';
          node.name = name;
          node.size = size;
          node.usedBytes = builder.markMap(map, size, (a, b) => reader.deviceRanges(a, b));
          if (types[0] === 'striped' && lv.segments.some((sg) => sg.stripes.length > 1)) node.notes.unshift(`striped over ${Math.max(...lv.segments.map((sg) => sg.stripes.length))} PVs`);
          home.children.push(node);
        } else {
          for (const a of own) {
            const h = here.get(a.pv)!;
            builder.markBytes(h.offset + h.peStartBytes + a.start * extBytes, h.offset + h.peStartBytes + (a.start + a.count) * extBytes);
          }
          const why = missing.length
            ? `its extents on ${missing.join(', ')} are not on this device`
            : !lv.visible ? 'a hidden sub-volume of another LV'
              : referenced.has(lv.name) ? 'used by another LV (pool, origin or image)'
                : `segment type ${types.join(', ')} is not linear or striped`;
          const content = types.join('+');
          home.children.push(layoutNode({
            kind: 'lvm-lv', name, content, size, usedBytes: ownExtents * extBytes, allBlocks: true,
            notes: [ownExtents ? `${why}: its ${ownExtents} extents on this device are copied whole` : `${why}: it owns no extents itself (what it uses is copied with the LVs that own them)`],
          }));
        }
      }
      for (const [pvName, h] of here) {
        const node = nodes.get(h.scan)!;
        const pv = vg.pvs.get(pvName)!;
        const free = pv.peCount - (owned.get(pvName) ?? 0);
        node.children.push(layoutNode({ kind: 'lvm-free', name: 'free extents', content: 'free', size: free * extBytes, usedBytes: 0 }));
        node.notes.unshift(`VG ${vg.name} (seqno ${vg.seqno}, from ${from}), ${pv.peCount} extents of ${extBytes} bytes, ${free} free`);
      }
    }
    const out: LayoutNode[] = [];
    for (const s of this.scans) {
      const node = nodes.get(s)!;
      if (!node.allBlocks) node.usedBytes = builder.usedBytes(s.input.offset, s.input.offset + s.input.reader.size);
      out.push(node);
    }
    return out;
  }
}

export { corruptLvm };
