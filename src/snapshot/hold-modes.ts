// The words of --hold and the default --hold-limit, apart from the method so the CLI and the control
// protocol can name them without loading it.
export const HOLD_MODES = ['all', 'backup-blocks', 'metadata'] as const;
export type HoldMode = (typeof HOLD_MODES)[number];
/** --hold-limit default: held payload in memory before the backup falls back to copy-before-write. */
export const DEFAULT_HOLD_LIMIT = 256 << 20;
