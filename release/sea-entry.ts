// Entry point of the single-binary release (Node SEA). Bundled by release/build.sh with esbuild.
//
// In a SEA `require` only loads built-ins, so the compiled addon travels as a SEA asset: it is written
// to a private directory (mode 0700, created with mkdtemp), `process.dlopen`ed, and the file and the
// directory are removed right away (the mapping stays valid after unlink). /tmp is often mounted
// noexec, where dlopen fails with "failed to map segment from shared object" (EPERM): then the next
// directory of the list is tried.
//
// Startup (issue 5: `livesnap --help` within 1.5x of `node -e 0`): "--help", "-h", "--version" and no
// arguments never need the addon, so for them it is not even written out; it is loaded on the first
// native() call (setAddonLoader). Every other invocation loads it up front as before, so a binary
// that cannot load its addon says so (exit 70) before it does anything.
//
// NODE_OPTIONS is ignored by the runtime itself: the SEA config sets "execArgvExtension": "none".
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { native, setAddonLoader, type NativeAddon } from '../src/device/native';
// Resolved by build.sh to src/cli/main.ts.
import { main } from '@livesnap/cli-main';

const ASSET = 'livesnap_native.node';

/** Where the addon may be written, most private first; each is tried until dlopen succeeds. */
function candidateDirs(): string[] {
  const dirs: (string | undefined)[] = [
    process.env.LIVESNAP_ADDON_DIR,
    process.env.XDG_RUNTIME_DIR,
    os.tmpdir(),
    '/run',
    '/dev/shm',
    '/var/tmp',
    process.env.HOME ? path.join(process.env.HOME, '.cache') : undefined,
    path.dirname(process.execPath),
  ];
  const seen = new Set<string>();
  return dirs.filter((d): d is string => {
    if (!d || !path.isAbsolute(d) || seen.has(d)) return false;
    seen.add(d);
    return true;
  });
}

/** dlopen errors that depend on where the file is (noexec mount, LSM policy), not on the file. */
function isPlacementError(e: unknown): boolean {
  const msg = e instanceof Error ? e.message : String(e);
  return /failed to map segment|operation not permitted|permission denied/i.test(msg);
}

function loadAddonFromAsset(): NativeAddon {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const sea = require('node:sea') as { getAsset(key: string): ArrayBuffer };
  const bytes = new Uint8Array(sea.getAsset(ASSET));
  const tried: string[] = [];
  for (const base of candidateDirs()) {
    let dir: string | undefined;
    try {
      dir = fs.mkdtempSync(path.join(base, 'livesnap-addon-')); // mode 0700
    } catch (e) {
      tried.push(`${base}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      continue;
    }
    const file = path.join(dir, ASSET);
    try {
      fs.writeFileSync(file, bytes, { mode: 0o500, flag: 'wx' });
      const m = { exports: {} as NativeAddon };
      process.dlopen(m, file);
      return m.exports;
    } catch (e) {
      tried.push(`${base}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`);
      if (!isPlacementError(e)) throw new Error(`livesnap: cannot load its native addon: ${(e as Error).message}`);
    } finally {
      try { fs.rmSync(file, { force: true }); } catch { /* best effort */ }
      try { fs.rmdirSync(dir); } catch { /* best effort */ }
    }
  }
  throw new Error(
    `livesnap: cannot load its native addon: no writable directory allows executable mappings ` +
    `(set LIVESNAP_ADDON_DIR to one that is not mounted noexec). Tried:\n  ${tried.join('\n  ')}`,
  );
}

/** Help and version flags (clipanion's builtins, also "<command> --help"): nothing there uses the addon. */
function needsAddon(argv: string[]): boolean {
  if (argv.length === 0) return false; // prints the help
  if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-v')) return false;
  return !argv.some((a) => a === '--help' || a === '-h');
}

function start(): void {
  const argv = process.argv.slice(2);
  setAddonLoader(loadAddonFromAsset);
  if (needsAddon(argv)) {
    try {
      native();
    } catch (e) {
      process.stderr.write(`${(e as Error).message}\n`);
      process.exitCode = 70; // EX_SOFTWARE
      return;
    }
  }
  main(argv).then(
    (code) => { process.exitCode = code; },
    (e: unknown) => {
      process.stderr.write(`livesnap: error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
      process.exitCode = 1;
    },
  );
}

start();
