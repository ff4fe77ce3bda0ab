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
run() { # binary label
  rm -rf "$out/repo" "$out/home"
  ARCA_HOME=$out/home "$1" apply "$out/config.toml" >/dev/null
  /usr/bin/time -f "%e %U %S %M" -o "$out/$2.time" \
    env ARCA_HOME="$out/home" "$1" job run bench --json > "$out/$2.json"
}
cat "$disk" > /dev/null # in the page cache, as in the peers run
run "$old" warm-up-old
run "$new" warm-up-new
for i in $(seq 1 "$rounds"); do
  if [ $((i % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for who in $order; do
    if [ "$who" = old ]; then run "$old" "old-$i"; else run "$new" "new-$i"; fi
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for who in ("old", "new"):
    wall, cpu, rss, comp = [], [], [], []
    for i in range(1, rounds + 1):
        e, u, s, m = open(f"{out}/{who}-{i}.time").read().split()[-4:]
        j = json.load(open(f"{out}/{who}-{i}.json"))
        assert j["state"] == "success", j
        wall.append(float(e)); cpu.append(float(u) + float(s)); rss.append(int(m) / 1024)
        comp.append(j["totals"]["stage_seconds"]["compression"])
    f = lambda xs, p=2: " ".join(f"{x:.{p}f}" for x in sorted(xs))
    print(f"{who}: wall {f(wall)} s; CPU {f(cpu)} s; RSS {f(rss, 0)} MiB; compression busy {f(comp)} s")
PY
