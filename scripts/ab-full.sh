#!/usr/bin/env bash
# Alternating A/B of whole-disk full backups of the disk that
# `cargo bench --bench peers` leaves in target/tmp/bench-peers (run that
# first).
#
#   bash scripts/ab-full.sh OLD_ARCA NEW_ARCA [ROUNDS] [STAGES]
#
# Each round backs the disk up with OLD, then NEW (or NEW, then OLD: the
# order alternates), each into a fresh repository and home (set up, not
# timed). STAGES is a pipeline's `exclusion = [...]` line (default none).
# Prints each binary's wall and CPU seconds, peak RSS and compression busy
# time, sorted. Measures; asserts nothing. ARCA_AB_DISK=path backs up that
# raw image instead (e.g. 1 GiB of /dev/urandom, for incompressible data).
set -euo pipefail
old=$(realpath "$1")
new=$(realpath "$2")
rounds=${3:-5} stages=${4:-}
. "$(dirname "$0")/ab-setup.sh"
ab_setup "$stages"
run() { ab_fresh_run "$1" "$2" bench; }
cat "$disk" > /dev/null # in the page cache, as in the peers run
run "$old" warm-up-old
run "$new" warm-up-new
ab_alternate "$rounds"
ab_report "$rounds" compression
