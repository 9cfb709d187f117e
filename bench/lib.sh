# Shared helpers for the bench scripts: a scratch directory, a real ext4 volume on a loop device
# filled to a target level with fragmented free space, timing, and cleanup on any exit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIVESNAP=${LIVESNAP:-"node $ROOT/bin/livesnap.js"}
WORK=${BENCH_DIR:-/var/tmp/livesnap-bench}
# Exports served by a bench keep their state directories under WORK, not in /var/lib/livesnap.
export LIVESNAP_STATE_DIR=${LIVESNAP_STATE_DIR:-$WORK/state}
CLEANUP=()
cleanup() { local i; for ((i=${#CLEANUP[@]}-1; i>=0; i--)); do eval "${CLEANUP[$i]}" >/dev/null 2>&1 || true; done; }
trap cleanup EXIT INT TERM

need() { for c in "$@"; do command -v "$c" >/dev/null || { echo "bench needs $c" >&2; exit 2; }; done; }

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# now_ms: wall clock in milliseconds
now_ms() { date +%s%3N; }

# time_ms CMD...: runs CMD (output discarded) followed by sync; prints elapsed ms
time_ms() { local t0 t1; drop_caches; t0=$(now_ms); "$@" >/dev/null 2>&1; sync; t1=$(now_ms); echo $((t1 - t0)); }

# make_volume SIZE_MIB FILL_PERCENT: sets VOL_FILE and VOL_DEV (unmounted ext4 on a loop device)
make_volume() {
  local size_mib=$1 fill=$2
  mkdir -p "$WORK"
  VOL_FILE="$WORK/volume.img"
  rm -f "$VOL_FILE"; truncate -s "${size_mib}M" "$VOL_FILE"
  mkfs.ext4 -q -F "$VOL_FILE"
  VOL_DEV=$(losetup -f --show "$VOL_FILE"); CLEANUP+=("losetup -d $VOL_DEV")
  local mnt="$WORK/mnt"; mkdir -p "$mnt"; mount "$VOL_DEV" "$mnt"; CLEANUP+=("umount $mnt")
  # Files of 64 KiB..4 MiB up to 1.5 x fill of the volume (KiB), then every third deleted: about
  # fill % used, with fragmented free space.
  local target=$(( size_mib * 1024 * (fill * 3 / 2) / 100 )) total=0 i=0 sz
  while [ $total -lt $target ]; do
    sz=$(( (RANDOM % 64 + 1) * 64 ))   # KiB
    head -c "${sz}K" /dev/urandom > "$mnt/f$i"
    total=$(( total + sz )); i=$((i + 1))
  done
  for ((j=0; j<i; j+=3)); do rm -f "$mnt/f$j"; done
  umount "$mnt"; unset 'CLEANUP[${#CLEANUP[@]}-1]'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
