#!/usr/bin/env bash
# Alternating A/B of CBT incrementals on the live VM that
# `cargo bench --bench cbt` leaves in target/tmp/bench-cbt (run that first).
#
#   bash scripts/ab-cbt.sh OLD_ARCA NEW_ARCA [ROUNDS]
#
# Serves the bench's qcow2 again with qemu-storage-daemon, runs one
# incremental to start a fresh CBT bitmap (the bench's daemon was killed,
# so its bitmap is gone), then per round: the guest writes 1% of the disk
# in clustered runs of 64 KiB-1 MiB, and OLD, then NEW (or NEW, then OLD:
# the order alternates) back up. Prints each binary's session times and
# times to the task's start, sorted. Measures; asserts nothing. ARCA_CBT_VM=peers
# uses the peers benchmark's VM instead (scripts/bench-cbt-vm.sh).
# ARCA_AB_RANDOM=1 writes random bytes, as the peers benchmark does, instead
# of one byte pattern per run (which compresses to nothing); every session's
# writes are new data, so none of it is deduplicated.
set -euo pipefail
old=$(realpath "$1") new=$(realpath "$2") rounds=${3:-6}
. "$(dirname "$0")/bench-cbt-vm.sh"
size=$(qemu-img info -U --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')

writes() { # seed: 1% of the disk, clustered
  python3 - "$1" "$size" "${ARCA_AB_RANDOM:-}" "$out/runs" <<'PY'
import os, random, sys
r = random.Random(int(sys.argv[1])); size = int(sys.argv[2]); done = 0
rand, runs = sys.argv[3] == "1", sys.argv[4]
os.makedirs(runs, exist_ok=True)
while done < size // 100:
    n = r.choice([64, 128, 256, 512, 1024]) * 1024
    off = r.randrange(0, size - n) // 65536 * 65536
    if rand:
        f = f"{runs}/{done}.bin"
        with open(f, "wb") as w:
            w.write(r.randbytes(n))
        print(f"write -s {f} {off} {n}")
    else:
        print(f"write -P {r.randrange(1, 255)} {off} {n}")
    done += n
PY
}
run() { # binary label
  ARCA_HOME=$home "$1" job run bench --json > "$out/$2.json"
}
# Seeds differ from one invocation to the next: data written again by a
# later invocation would be deduplicated.
base=$(date +%s)
guest() { writes "$((base * 1000 + $1))" | qemu-io -f raw "nbd+unix:///vm?socket=$dir/nbd.sock" >/dev/null; }

guest 1000; run "$new" warm-up
for i in $(seq 1 "$rounds"); do
  if [ $((i % 2)) = 1 ]; then first=old second=new; else first=new second=old; fi
  for who in $first $second; do
    if [ $who = old ]; then guest $((i * 2)); run "$old" "old-$i"
    else guest $((i * 2 + 1)); run "$new" "new-$i"; fi
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for who in ("old", "new"):
    s, q = [], []
    for i in range(1, rounds + 1):
        j = json.load(open(f"{out}/{who}-{i}.json"))
        t = j["tasks"][0]
        if t["stats"]["cbt_dirty_bytes"] is None:
            print(f"{who}-{i}: no CBT ({j['notices']})")
        s.append(j["duration_seconds"]); q.append(t["queued_seconds"])
    print(f"{who}: session " + " ".join(f"{x:.3f}" for x in sorted(s)) +
          " s; to the task's start " + " ".join(f"{x*1e3:.1f}" for x in sorted(q)) + " ms")
PY
