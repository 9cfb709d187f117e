// Bundles release/sea-entry.ts into one CommonJS file for the SEA (called by release/build.sh).
//
//   node release/bundle.mjs <outfile> <cli-main.ts> <base node binary>
//
// Startup matters (goal: `livesnap --help` within 1.5x of `node -e 0`), and some built-ins are costly
// to load (node:crypto alone is several ms of CPU) although most commands never touch them. So the
// built-ins in LAZY are replaced by a shim whose exports are getters that `require` the real module
// on first use. The shim's export names are read from the base Node the binary runs on, so esbuild's
// `import * as x` / default-import interop sees the same names without loading anything.
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const [outfile, cliMain, baseNode] = process.argv.slice(2);
if (!outfile || !cliMain || !baseNode) {
  console.error('usage: node release/bundle.mjs <outfile> <cli-main.ts> <base node binary>');
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
const LAZY = ['crypto', 'child_process', 'zlib', 'http', 'https', 'tls', 'dgram', 'worker_threads', 'readline', 'inspector'];

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
  plugins: [lazyBuiltins],
  metafile: true,
});
const out = Object.values(result.metafile.outputs)[0];
console.error(`release: bundle ${out.bytes} bytes from ${Object.keys(out.inputs).length} modules`);
