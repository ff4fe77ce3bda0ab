#!/usr/bin/env bash
# Alternating A/B of cold restores of a whole-disk full of the disk that
# `cargo bench --bench peers` leaves in target/tmp/bench-peers (run that
# first), or of ARCA_AB_DISK.
#
#   bash scripts/ab-restore.sh OLD_ARCA NEW_ARCA [ROUNDS]
#
# NEW backs the disk up once (set up, not timed). Then per round OLD and
# NEW (the order alternates) each restore that point to a fresh raw file,
# after the page cache is dropped (as root: `echo 3 >
# /proc/sys/vm/drop_caches`), so the packs come off the device as they do
# when a restore follows a backup made days before. Checks each restore's
# SHA-256 against the disk; prints each binary's wall, CPU and system
# seconds, sorted. Measures; asserts only the restores' bytes.
set -euo pipefail
old=$(realpath "$1")
new=$(realpath "$2")
rounds=${3:-5}
. "$(dirname "$0")/ab-setup.sh"
ab_setup ""
ab_need_cold
export ARCA_HOME=$out/home
"$new" apply "$out/config.toml" >/dev/null
"$new" job run bench >/dev/null
point=$("$new" points --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["point_id"])')
want=$(sha256sum < "$disk" | cut -d' ' -f1)
run() { # binary label
  rm -f "$out/out.raw"
  ab_cold
  /usr/bin/time -f "$AB_TIME" -o "$out/$2.time" \
    "$1" restore "$point" --to "$out/out.raw" >/dev/null
  [ "$(sha256sum < "$out/out.raw" | cut -d' ' -f1)" = "$want" ] \
    || { echo "$2: the restore differs from the disk" >&2; exit 1; }
}
ab_alternate "$rounds"
ab_report "$rounds"
