#!/usr/bin/env bash
# Sessions with nothing written since the last one, on the live VM that
# `cargo bench --bench cbt` leaves in target/tmp/bench-cbt (run that first).
#
#   bash scripts/cbt-empty.sh ARCA [SESSIONS]
#
# Serves the bench's qcow2 again with qemu-storage-daemon and runs SESSIONS
# backups of job `bench` (default 4) with no guest write in between. The
# first one starts a fresh CBT bitmap (the bench's daemon was killed, so
# its bitmap is gone); each later one should read nothing. ARCA_CBT_VM=peers
# uses the peers benchmark's VM instead (scripts/bench-cbt-vm.sh). Prints per
# session its time and the bytes it read. Measures; asserts nothing.
set -euo pipefail
bin=$(realpath "$1")
. "$(dirname "$0")/bench-cbt-vm.sh"
for i in $(seq 1 "${2:-4}"); do
  ARCA_HOME=$home "$bin" job run bench --json > "$out/report.json"
  python3 - "$out/report.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); t = j["tasks"][0]; s = t["stats"]
print(f'session {j["duration_seconds"]:.3f} s, read {s["read_bytes"]} B, zero {s["zero_bytes"]} B, '
      f'CBT dirty {s["cbt_dirty_bytes"]} B; {" ".join(n[:90] for n in t["notices"])}')
PY
done
