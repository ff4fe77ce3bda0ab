#!/usr/bin/env bash
# Alternating A/B of whole-disk incrementals without changed block tracking
# of the disk that `cargo bench --bench peers` leaves in
# target/tmp/bench-peers (run that first), with the page cache dropped
# before each (a cold read of the image, as on a host that did not just
# read it) or, with ARCA_AB_WARM=1, kept.
#
#   bash scripts/ab-incremental.sh OLD_ARCA NEW_ARCA [ROUNDS]
#
# NEW makes the first point (not timed); then each round runs one
# incremental with OLD and one with NEW (the order alternates) into the
# same repository. Nothing changes between them, so each reads and hashes
# the whole disk and stores nothing. ARCA_AB_DISK=path backs up that raw
# image instead. Prints each binary's times (ab-setup.sh's ab_report) and
# its read and hash busy times, sorted. Measures; asserts nothing.
set -euo pipefail
old=$(realpath "$1")
new=$(realpath "$2")
rounds=${3:-4}
. "$(dirname "$0")/ab-setup.sh"
ab_setup ""
[ -n "${ARCA_AB_WARM:-}" ] || ab_need_cold "or set ARCA_AB_WARM=1"
export ARCA_HOME=$out/home
"$new" apply "$out/config.toml" >/dev/null
"$new" job run bench >/dev/null
run() { # binary label
  [ -n "${ARCA_AB_WARM:-}" ] || ab_cold
  /usr/bin/time -f "$AB_TIME" -o "$out/$2.time" "$1" job run bench --json > "$out/$2.json"
}
ab_alternate "$rounds"
ab_report "$rounds" read hash
