// CRC-32 (IEEE 802.3, reflected polynomial 0xedb88320): GPT headers and entry arrays use it with the
// usual pre- and post-inversion; LVM2 uses the same table with its own start value and no inversion.
const TABLE = new Uint32Array(256);
for (let i = 0; i < 256; i++) {
  let c = i;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  TABLE[i] = c >>> 0;
}

/** Raw register update: no inversion (LVM's calc_crc). */
export function crc32Update(crc: number, buf: Uint8Array, start = 0, end = buf.length): number {
  let c = crc >>> 0;
  for (let i = start; i < end; i++) c = TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** The standard CRC-32 of `buf[start, end)` (crc32("123456789") = 0xcbf43926). */
export function crc32(buf: Uint8Array, start = 0, end = buf.length): number {
  return (crc32Update(0xffffffff, buf, start, end) ^ 0xffffffff) >>> 0;
}

/** LVM2's INITIAL_CRC. */
export const LVM_INITIAL_CRC = 0xf597a6cf;
