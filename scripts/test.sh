#!/usr/bin/env bash
# All tests: the workspace (unit and end-to-end tests of the real binary),
# then the plugins' own unit tests (natively). Ends with one line that
# totals every test run: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
{
  cargo test --release --workspace 2>&1
  (cd plugins && cargo test --release 2>&1)
} | tee "$log" || status=$?
awk '/^test result:/ {
       for (i = 2; i <= NF; i++) {
         if ($i ~ /^passed;?$/) p += $(i - 1)
         if ($i ~ /^failed;?$/) f += $(i - 1)
       }
     }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
