#!/usr/bin/env bash
# Quick start: set up, build, and run a demo session on the embedded
# defaults (in-process proxy and repository, default pipeline):
# full backup, change blocks, incremental backup, restore both restore
# points, and show that each matches the disk as it was.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "demo: building arca (the first build compiles wasmtime: a few minutes)"
cargo build --release --quiet
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
arca() { "$target_dir/release/arca" "$@"; }

demo=target/demo
rm -rf "$demo"
mkdir -p "$demo"
export ARCA_HOME="$PWD/$demo/home"

# A 256 MiB sample VM disk: real files (this machine's /usr/share and
# /usr/lib), random data, written zeros and never-written holes.
disk="$demo/web01-disk0.raw"
truncate -s 256M "$disk"
off=0
for src in /usr/share/doc /usr/lib/x86_64-linux-gnu /usr/share/locale; do
  if [ -d "$src" ]; then
    # tar is cut off by head on purpose: its SIGPIPE is not a failure.
    { tar -cf - "$src" 2>/dev/null || true; } | head -c 48M |
      dd of="$disk" bs=1M seek=$off conv=notrunc iflag=fullblock status=none
    off=$((off + 64))
  fi
done
head -c 16M /dev/urandom | dd of="$disk" bs=1M seek=200 conv=notrunc status=none
dd if=/dev/zero of="$disk" bs=1M seek=220 count=8 conv=notrunc status=none

cat > "$demo/arca.toml" <<TOML
[[repository]]
name = "demo"
path = "repo"

[[vm]]
name = "web01"
disks = ["web01-disk0.raw"]

[[job]]
name = "demo"
vms = ["web01"]
repository = "demo"
TOML

arca apply "$demo/arca.toml"
sha_full=$(sha256sum "$disk" | cut -d' ' -f1)
echo; echo "== full backup"
arca job run demo

echo; echo "== changing 1% of the disk, then incremental backup"
for i in $(seq 1 10); do
  head -c 256K /dev/urandom | dd of="$disk" bs=256K seek=$((i * 97)) conv=notrunc status=none
done
sha_incr=$(sha256sum "$disk" | cut -d' ' -f1)
arca job run demo

echo; echo "== restore points"
arca points --job demo
mapfile -t points < <(arca points --job demo --json | python3 -c 'import json,sys; [print(p["point_id"]) for p in json.load(sys.stdin)]')

echo; echo "== restoring both restore points"
status=0
for i in 0 1; do
  want=$([ "$i" -eq 0 ] && echo "$sha_full" || echo "$sha_incr")
  out="$demo/restored-$i.raw"
  arca restore "${points[$i]}" --to "$out"
  got=$(sha256sum "$out" | cut -d' ' -f1)
  if [ "$got" = "$want" ]; then
    echo "restore point ${points[$i]}: SHA-256 matches the disk as it was ($got)"
  else
    echo "restore point ${points[$i]}: MISMATCH ($got, expected $want)"; status=1
  fi
done
echo; arca verify
exit $status
