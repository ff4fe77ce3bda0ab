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
ab_need_time
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
run() { ab_fresh_run "$1" "$2" full; }
cat "$img" > /dev/null # in the page cache, as in the peers run
ab_alternate "$rounds"
ab_report "$rounds" read compression
