// Bundles release/sea-entry.ts into one CommonJS file for the SEA (called by release/build.sh).
//
//   node release/bundle.mjs <outfile> <cli-main.ts> <base node binary>
//
// Startup matters (goal: `livesnap --help` within 1.5x of `node -e 0`), and some built-ins are costly
// to load (node:crypto alone is several ms of CPU) although most commands never touch them. So the
// built-ins in LAZY are replaced by a shim whose exports are getters that `require` the real module
// on first use. The shim's export names are read from the base Node the binary runs on, so esbuild's
// `import * as x` / default-import interop sees the same names without loading anything.
//
// clipanion (pinned in package.json) is patched in the bundle, with the same behaviour (see CLIPANION_PATCHES):
// - its Cli.defaultContext reads process.stdin/stdout/stderr and the colour depth (loading tty and
//   net) when the module loads; here they are getters, read when used, and the contexts it merges
//   keep them as getters, so "--help" never creates process.stdin;
// - the help sorts the command list with String#localeCompare(..., 'en'), and the first ICU
//   collator costs ~5 ms; a comparison whose first difference is two ASCII letters after an ASCII
//   prefix is decided without it (the same result: the root collation orders ASCII letters
//   alphabetically at the primary level, case aside, and has no contractions among ASCII characters);
//   anything else still goes to localeCompare.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const [outfile, cliMain, baseNode] = process.argv.slice(2);
if (!outfile || !cliMain || !baseNode) {
  console.error('usage: node release/bundle.mjs <outfile> <cli-main.ts> <base node binary>');
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
const LAZY = ['crypto', 'child_process', 'zlib', 'http', 'https', 'tls', 'dgram', 'worker_threads', 'readline', 'inspector', 'net', 'tty', 'os'];

const keys = JSON.parse(execFileSync(baseNode, ['-p',
  `JSON.stringify(Object.fromEntries(${JSON.stringify(LAZY)}.map((m) => [m, Object.keys(require(m))])))`,
], { encoding: 'utf8', env: { ...process.env, NODE_OPTIONS: '' } }));

const lazyBuiltins = {
  name: 'lazy-builtins',
  setup(build) {
    const filter = new RegExp(`^(node:)?(${LAZY.join('|')})$`);
    build.onResolve({ filter }, (args) => {
      if (args.namespace === 'lazy-builtin') return { path: args.path, external: true };
      return { path: args.path.replace(/^node:/, ''), namespace: 'lazy-builtin' };
    });
    build.onLoad({ filter: /.*/, namespace: 'lazy-builtin' }, (args) => ({
      loader: 'js',
      contents: [
        `let m; const load = () => (m ??= require(${JSON.stringify('node:' + args.path)}));`,
        `for (const k of ${JSON.stringify(keys[args.path])}) Object.defineProperty(exports, k, { enumerable: true, get: () => load()[k] });`,
      ].join('\n'),
    }));
  },
};

const CLIPANION_HELPERS = `
function __livesnapCollate(a, b) {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a.charCodeAt(i) === b.charCodeAt(i) && a.charCodeAt(i) < 128) i++;
  if (i < n) {
    const x = a.charCodeAt(i), y = b.charCodeAt(i);
    const isLetter = (c) => (c >= 65 && c <= 90) || (c >= 97 && c <= 122);
    if (isLetter(x) && isLetter(y) && (x | 32) !== (y | 32)) return (x | 32) < (y | 32) ? -1 : 1;
  }
  return a.localeCompare(b, \`en\`, { usage: \`sort\`, caseFirst: \`upper\` });
}
function __livesnapMergeContext(...parts) {
  const d = {};
  for (const p of parts) {
    if (p == null) continue;
    for (const [k, v] of Object.entries(Object.getOwnPropertyDescriptors(p))) if (v.enumerable) d[k] = v;
  }
  return Object.defineProperties({}, d);
}
let __livesnapColorDepth;
`;
const CLIPANION_PATCHES = [
  ['{\n            ...Cli.defaultContext,\n            ...userContext,\n        }', '__livesnapMergeContext(Cli.defaultContext, userContext)', 2],
  ['a.localeCompare(b, `en`, { usage: `sort`, caseFirst: `upper` })', '__livesnapCollate(a, b)', 1],
  ['a.usage.localeCompare(b.usage, `en`, { usage: `sort`, caseFirst: `upper` })', '__livesnapCollate(a.usage, b.usage)', 1],
  [
    'Cli.defaultContext = {\n    env: process.env,\n    stdin: process.stdin,\n    stdout: process.stdout,\n    stderr: process.stderr,\n    colorDepth: platform.getDefaultColorDepth(),\n};',
    'Cli.defaultContext = {\n    env: process.env,\n    get stdin() { return process.stdin; },\n    get stdout() { return process.stdout; },\n    get stderr() { return process.stderr; },\n    get colorDepth() { return (__livesnapColorDepth ??= platform.getDefaultColorDepth()); },\n};',
    1,
  ],
];
let clipanionPatched = false;
const patchClipanion = {
  name: 'patch-clipanion',
  setup(build) {
    build.onLoad({ filter: /[\\/]clipanion[\\/]lib[\\/]advanced[\\/]Cli\.js$/ }, async (args) => {
      let text = await fs.readFile(args.path, 'utf8');
      for (const [from, to, count] of CLIPANION_PATCHES) {
        const found = text.split(from).length - 1;
        // A different clipanion: fail rather than ship it unpatched (or half-patched).
        if (found !== count) throw new Error(`${args.path}: expected ${count} of ${JSON.stringify(from)}, found ${found}: update CLIPANION_PATCHES`);
        text = text.split(from).join(to);
      }
      if (!text.startsWith(`'use strict';\n`)) throw new Error(`${args.path}: no 'use strict' line to put the helpers after`);
      clipanionPatched = true;
      return { contents: text.replace(/^'use strict';\n/, (m) => m + CLIPANION_HELPERS), loader: 'js' };
    });
  },
};

const result = await esbuild.build({
  entryPoints: [path.join(here, 'sea-entry.ts')],
  outfile,
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node24',
  minify: !process.env.NOMIN,
  keepNames: true,
  legalComments: 'none',
  logLevel: 'warning',
  alias: { '@livesnap/cli-main': cliMain },
  plugins: [lazyBuiltins, patchClipanion],
  metafile: true,
});
if (!clipanionPatched) throw new Error('clipanion/lib/advanced/Cli.js was not bundled from where patch-clipanion expects it');
const out = Object.values(result.metafile.outputs)[0];
console.error(`release: bundle ${out.bytes} bytes from ${Object.keys(out.inputs).length} modules`);
