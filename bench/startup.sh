#!/usr/bin/env bash
# Startup time of the single binary: `livesnap --help` vs `node -e 0` on the same (stripped) base Node
# the binary was built from. Goal (issue 5): within 1.5x. Other work on the machine inflates both
# sides; the medians' ratio is the verdict, the best-of-runs ratio is printed too.
#
#   npm run release && bash bench/startup.sh [runs]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/release/out/livesnap-linux-x64"
ver="$(sed -n 's/^NODE_VERSION=//p' "$root/release/build.sh")"
node="$root/release/cache/node-$ver/node-stripped"
runs="${1:-50}"
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)" >&2; exit 2; }
[ -x "$bin" ] && [ -x "$node" ] || { echo "build the binary first: npm run release" >&2; exit 2; }
json="$(mktemp)"
trap 'rm -f "$json"' EXIT
hyperfine -N --warmup 5 --runs "$runs" --export-json "$json" \
  -n 'livesnap --help (binary)' "$bin --help" \
  -n "node -e 0 (v$ver)" "$node -e 0" >&2
"$node" -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).results;
  const [b, n] = r.map((x) => x.median * 1000);
  const [bMin, nMin] = r.map((x) => x.min * 1000);
  const ratio = b / n;
  console.log(`startup: livesnap --help ${b.toFixed(1)} ms, node -e 0 ${n.toFixed(1)} ms (medians), ratio ${ratio.toFixed(2)}x (goal <= 1.5x): ${ratio <= 1.5 ? "OK" : "OVER"}` +
    `; best ${bMin.toFixed(1)} ms vs ${nMin.toFixed(1)} ms (${(bMin / nMin).toFixed(2)}x)`);
' "$json"
