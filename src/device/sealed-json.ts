// Sealed state files (an export's state directory, a replica's metadata, the change map's header):
// a JSON object whose last field "checksum" is the XXH3-128 of the JSON of everything else, so a
// torn, damaged or edited file is never mistaken for a good one. (Archives seal their members
// differently: archive/manifest.ts, the checksum over the text as written.)
import { xxh128 } from './hash';

/** `obj` with its checksum field last. */
export function sealed<T extends object>(obj: T): T & { checksum: string } {
  return { ...(JSON.parse(JSON.stringify(obj)) as T), checksum: xxh128(Buffer.from(JSON.stringify(obj))).toString('hex') };
}

/** The object without its checksum if the checksum matches, else undefined. */
export function unsealed(j: Record<string, unknown>): Record<string, unknown> | undefined {
  const { checksum, ...rest } = j;
  return checksum === xxh128(Buffer.from(JSON.stringify(rest))).toString('hex') ? rest : undefined;
}
