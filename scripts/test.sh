#!/usr/bin/env bash
# All tests: the workspace (unit and end-to-end tests of the real binary),
# then the plugins' own unit tests (natively). Ends with one line that
# totals every test run: "N passed, N failed". Exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Each pipeline's status is checked on its own: `set -e` does not apply on
# the left of `||`, so a group of commands there would hide a failure.
cargo test --release --workspace 2>&1 | tee "$log" || status=1
(cd plugins && cargo test --release 2>&1) | tee -a "$log" || status=1
awk '/^test result:/ {
       for (i = 2; i <= NF; i++) {
         if ($i ~ /^passed;?$/) p += $(i - 1)
         if ($i ~ /^failed;?$/) f += $(i - 1)
       }
     }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
