// XXH3-128 (the addon's, from libxxhash): archive chunk and manifest checksums, state files.
import { native } from './native';

/** XXH3-128 of the bytes, canonical big-endian 16-byte form. */
export function xxh128(bytes: Uint8Array | ArrayBuffer, seed?: number): Buffer {
  return native().xxh128(bytes, seed);
}
