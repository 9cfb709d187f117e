// What an export is asked to be: the device, its name, where it listens and how it caches. The
// control protocol's serve request carries exactly this (its schema is built from these names).

/**
 * How the export writes the backing device. 'none': O_DIRECT, an acknowledged write is on the device
 * (in its volatile cache until FLUSH). 'writeback': through the kernel's page cache, as nbdkit's
 * file plugin and QEMU's default do; acknowledged writes survive a crash of livesnap (the kernel
 * holds them) and FLUSH makes them durable; the backup still reads the device with O_DIRECT.
 */
export const CACHE_MODES = ['none', 'writeback'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

/** Export names: what NBD clients and the CLI name an export by. */
export const EXPORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export interface ExportSpec {
  device: string;
  name: string;
  /** The export's unix socket (default: beside the control socket). */
  socket?: string;
  /** TCP HOST:PORT (see listen.ts). */
  listen?: string;
  /** Path of a PSK file (livesnap keygen): TCP clients must start TLS with one of its keys. */
  tlsPsk?: string;
  /** TCP without TLS, asked for explicitly. */
  insecurePlaintext?: boolean;
  cache?: CacheMode;
  /** The export's state directory (absolute); default <state root>/<name>. */
  state?: string;
}
