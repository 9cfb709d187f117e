# The whole-disk case of bench/offline-backup (sourced by it): a GPT disk with an ESP (FAT32),
# ext4, XFS and swap, the file systems ~FILL % full with fragmented free space. livesnap backs up
# the whole disk in one run; the reference is what Clonezilla does: the partition table and the
# gaps with dd (first MiB, the backup GPT at the end), then partclone per partition (partclone.vfat,
# partclone.ext4, partclone.xfs; swap: nothing but its header, as Clonezilla only records its
# UUID). Bytes read are counted on the loop devices (/sys/block/loopN/stat), so page-cache
# effects cannot hide reads. Every run starts with cold caches and ends with sync.

# disk_case SIZE_MIB FILL_PERCENT ROUNDS
disk_case() {
  local size=$1 fill=$2 rounds=$3
  need sfdisk mkfs.vfat mkfs.ext4 mkfs.xfs mkswap mcopy partclone.vfat partclone.ext4 partclone.xfs dd losetup
  mkdir -p "$WORK"
  local disk="$WORK/disk.img" out="$WORK/out"
  mkdir -p "$out"; CLEANUP+=("rm -rf $out $disk")
  rm -f "$disk"; truncate -s "${size}M" "$disk"
  # ESP 256 MiB, swap 512 MiB, the rest split between ext4 and XFS.
  local rest=$(( size - 256 - 512 - 4 )) half
  half=$(( rest / 2 ))
  printf 'label: gpt\nsize=256M, type=uefi\nsize=%dM, type=linux\nsize=%dM, type=linux\nsize=512M, type=swap\n' "$half" "$half" | sfdisk -q "$disk"
  local starts sizes i
  read -r -a starts <<<"$(sfdisk -J "$disk" | node -e 'const j=JSON.parse(require("fs").readFileSync(0));console.log(j.partitiontable.partitions.map(p=>p.start*512).join(" "))')"
  read -r -a sizes <<<"$(sfdisk -J "$disk" | node -e 'const j=JSON.parse(require("fs").readFileSync(0));console.log(j.partitiontable.partitions.map(p=>p.size*512).join(" "))')"
  DISK_DEV=$(losetup -f --show "$disk"); CLEANUP+=("losetup -d $DISK_DEV")
  PART_DEV=()
  for i in 0 1 2 3; do
    PART_DEV[$i]=$(losetup -f --show -o "${starts[$i]}" --sizelimit "${sizes[$i]}" "$disk"); CLEANUP+=("losetup -d ${PART_DEV[$i]}")
  done
  mkfs.vfat -F 32 "${PART_DEV[0]}" >/dev/null
  head -c 24M /dev/urandom > "$WORK/efi.bin"
  MTOOLS_SKIP_CHECK=1 mcopy -i "${PART_DEV[0]}" "$WORK/efi.bin" ::/grubx64.efi; rm -f "$WORK/efi.bin"
  mkfs.ext4 -q -F "${PART_DEV[1]}"
  mkfs.xfs -q -f "${PART_DEV[2]}"
  mkswap -q "${PART_DEV[3]}"
  local mnt="$WORK/mnt"; mkdir -p "$mnt"
  for i in 1 2; do
    mount "${PART_DEV[$i]}" "$mnt"; CLEANUP+=("umount $mnt")
    fill_dir "$mnt" "$(( sizes[$i] >> 20 ))" "$fill"
    umount "$mnt"; unset 'CLEANUP[${#CLEANUP[@]}-1]'
  done
  local used
  used=$($LIVESNAP inspect "$DISK_DEV" --json | node -e 'const j=JSON.parse(require("fs").readFileSync(0,"utf8"));console.log(j.usedBlocks*j.blockSize)')
  echo "disk: ${size} MiB GPT on $DISK_DEV (ESP 256M, ext4 ${half}M, XFS ${half}M, swap 512M), used $((used >> 20)) MiB"
  $LIVESNAP inspect "$DISK_DEV" | sed -n '/^layout/,$p' | grep -v 'note:'

  local r ls_times=() ref_times=() ls_reads=() ref_reads=() same=""
  for ((r = 1; r <= rounds; r++)); do
    # livesnap: the whole disk in one run.
    rm -f "$out/ls.img"
    local before after t
    before=$(read_bytes "$DISK_DEV")
    t=$(time_ms $LIVESNAP backup "$DISK_DEV" --to "$out/ls.img")
    after=$(read_bytes "$DISK_DEV")
    [ -f "$out/ls.img" ] || { echo "livesnap backup failed" >&2; $LIVESNAP backup "$DISK_DEV" --to "$out/ls.img"; exit 1; }
    ls_times+=("$t"); ls_reads+=("$((after - before))")
    # Clonezilla's way: table + gaps with dd, partclone per partition, swap's header page.
    rm -f "$out"/pc*
    local b0 b1 b2 b3 b4
    b0=$(read_bytes "$DISK_DEV"); b1=$(read_bytes "${PART_DEV[0]}"); b2=$(read_bytes "${PART_DEV[1]}"); b3=$(read_bytes "${PART_DEV[2]}"); b4=$(read_bytes "${PART_DEV[3]}")
    t=$(time_ms bash -c "
      sfdisk -d $DISK_DEV > $out/pc-table.sfdisk &&
      dd if=$DISK_DEV of=$out/pc-head.img bs=1M count=1 iflag=direct status=none &&
      dd if=$DISK_DEV of=$out/pc-tail.img bs=1M skip=$(( size - 1 )) iflag=direct status=none &&
      partclone.vfat -c -a 0 -q -s ${PART_DEV[0]} -o $out/pc1.img &&
      partclone.ext4 -c -a 0 -q -s ${PART_DEV[1]} -o $out/pc2.img &&
      partclone.xfs -c -a 0 -q -s ${PART_DEV[2]} -o $out/pc3.img &&
      dd if=${PART_DEV[3]} of=$out/pc4-swap-header.img bs=4096 count=1 iflag=direct status=none")
    [ -s "$out/pc3.img" ] || { echo "reference run failed" >&2; exit 1; }
    ref_times+=("$t")
    ref_reads+=("$(( $(read_bytes "$DISK_DEV") - b0 + $(read_bytes "${PART_DEV[0]}") - b1 + $(read_bytes "${PART_DEV[1]}") - b2 + $(read_bytes "${PART_DEV[2]}") - b3 + $(read_bytes "${PART_DEV[3]}") - b4 ))")
    printf 'round %d: livesnap %6d ms, read %5d MiB | sfdisk + dd + partclone per partition %6d ms, read %5d MiB\n' \
      "$r" "${ls_times[-1]}" "$(( ls_reads[-1] >> 20 ))" "${ref_times[-1]}" "$(( ref_reads[-1] >> 20 ))"
  done
  $LIVESNAP verify "$out/ls.img" --against "$DISK_DEV" >/dev/null 2>&1 && same="verified block by block against the disk" || same="VERIFY FAILED"
  local tl tr rl
  tl=$(median "${ls_times[@]}"); tr=$(median "${ref_times[@]}"); rl=$(median "${ls_reads[@]}")
  echo "livesnap image: $same"
  echo "whole disk, median of $rounds: livesnap ${tl} ms vs Clonezilla-style ${tr} ms: $(ratio "$tl" "$tr")x   (goal <= 1.00)"
  echo "bytes read by livesnap / used bytes: $(awk -v a="$rl" -v b="$used" 'BEGIN{printf "%.4f", a/b}')   (goal <= 1.01; $((rl >> 20)) MiB read, $((used >> 20)) MiB used)"
}

# read_bytes DEV: bytes read from a block device so far (sectors read, field 3 of its stat).
read_bytes() { echo $(( $(awk '{print $3}' "/sys/block/$(basename "$1")/stat") * 512 )); }

# median N...: the middle value (lower middle for an even count).
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# fill_dir DIR SIZE_MIB FILL: files of 64 KiB..4 MiB up to 1.5 x FILL % of SIZE_MIB, every third
# deleted: about FILL % used with fragmented free space (as make_volume does).
fill_dir() {
  local dir=$1 size_mib=$2 fill=$3
  local target=$(( size_mib * 1024 * (fill * 3 / 2) / 100 )) total=0 i=0 sz
  while [ $total -lt $target ]; do
    sz=$(( (RANDOM % 64 + 1) * 64 ))
    head -c "${sz}K" /dev/urandom > "$dir/f$i"
    total=$(( total + sz )); i=$((i + 1))
  done
  for ((j=0; j<i; j+=3)); do rm -f "$dir/f$j"; done
}
