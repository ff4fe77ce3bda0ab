#!/usr/bin/env bash
# Alternating A/B of full backups of a live VM: the one `cargo bench --bench
# cbt` leaves in target/tmp/bench-cbt, or with ARCA_CBT_VM=peers the one of
# `cargo bench --bench peers` (scripts/bench-cbt-vm.sh serves it again).
#
#   bash scripts/ab-vm-full.sh OLD_ARCA NEW_ARCA [ROUNDS]
#
# Each round backs the VM's disk up with OLD, then NEW (or NEW, then OLD:
# the order alternates), each into a fresh repository and home (set up, not
# timed), through QEMU's fleecing snapshot and NBD export. Prints each
# binary's wall and CPU seconds and its `read` and `compression` busy
# times, sorted. Measures; asserts nothing.
set -euo pipefail
old=$(realpath "$1") new=$(realpath "$2") rounds=${3:-4}
. "$(dirname "$0")/bench-cbt-vm.sh"
. "$(dirname "$0")/ab-setup.sh"
[ -x /usr/bin/time ] || { echo "needs GNU time (apt-get install time)" >&2; exit 2; }
cat > "$out/config.toml" <<CONFIG
[[repository]]
name = "r"
path = "$out/repo"

[[hypervisor]]
name = "q"
qmp = "$dir/qmp.sock"
nbd = "$dir/nbd.sock"

[[vm]]
name = "guest"
hypervisor = "q"
disks = [{ node = "disk0" }]

[[job]]
name = "full"
vms = ["guest"]
repository = "r"
CONFIG
run() { # binary label
  rm -rf "$out/repo" "$out/home"
  ARCA_HOME=$out/home "$1" apply "$out/config.toml" >/dev/null
  /usr/bin/time -f "$AB_TIME" -o "$out/$2.time" \
    env ARCA_HOME="$out/home" "$1" job run full --json > "$out/$2.json"
}
qemu-img info -U "$img" > /dev/null
cat "$img" > /dev/null # in the page cache, as in the peers run
ab_alternate "$rounds"
ab_report "$rounds" read compression
