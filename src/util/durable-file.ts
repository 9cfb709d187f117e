// Files that must survive a crash: written whole under a temporary name, fsync'd, renamed, and the
// directory fsync'd so the rename itself is durable. Directory fsync is best effort: some file
// systems refuse it (the rename is still ordered after the data there).
import * as fs from 'node:fs';
import * as path from 'node:path';

export async function syncDir(dir: string): Promise<void> {
  const d = await fs.promises.open(dir, 'r').catch(() => undefined);
  if (!d) return;
  try { await d.sync(); } catch { /* refused here */ } finally { await d.close(); }
}

export function syncDirSync(dir: string): void {
  try {
    const fd = fs.openSync(dir, 'r');
    try { fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
  } catch { /* refused here */ }
}

/** Replaces `file` with `text` atomically and durably (mode 0600). */
export async function writeFileDurably(file: string, text: string): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await fs.promises.open(tmp, 'w', 0o600);
  try { await fh.writeFile(text); await fh.sync(); } finally { await fh.close(); }
  await fs.promises.rename(tmp, file);
  await syncDir(path.dirname(file));
}
