# Sourced by the ab-*.sh scripts: what alternating A/B runs share.
#
#   ab_setup STAGES       (ab-full.sh, ab-restore.sh, ab-incremental.sh)
#
# Sets `disk` (ARCA_AB_DISK, or the disk `cargo bench --bench peers` leaves
# in target/tmp/bench-peers) and `out` (a scratch folder removed on exit),
# and writes $out/config.toml: repository $out/repo, VM `guest` on the
# disk, job `bench` with a pipeline whose stages are STAGES (a pipeline's
# `exclusion = [...]` line, or nothing).
ab_setup() {
  disk=${ARCA_AB_DISK:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/tmp/bench-peers/disk.raw}
  [ -f "$disk" ] || { echo "no $disk: run cargo bench --bench peers first" >&2; exit 2; }
  ab_need_time
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  cat > "$out/config.toml" <<CONFIG
[[repository]]
name = "r"
path = "$out/repo"

[[vm]]
name = "guest"
disks = ["$disk"]

[[pipeline]]
name = "p"
$1

[[job]]
name = "bench"
vms = ["guest"]
repository = "r"
pipeline = "p"
CONFIG
}

# Fails early where GNU time, which every run is timed with, is missing.
ab_need_time() {
  [ -x /usr/bin/time ] || { echo "needs GNU time (apt-get install time)" >&2; exit 2; }
}

# Fails early, saying what to do, where `ab_cold` could not drop the page
# cache (it needs root). WHAT_ELSE names another way out, if any.
ab_need_cold() { # [WHAT_ELSE]
  [ -w /proc/sys/vm/drop_caches ] \
    || { echo "dropping the page cache needs root${1:+ ($1)}" >&2; exit 2; }
}

# Drops the page cache, so that the next run reads from the device.
ab_cold() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
}

# Runs `run BINARY LABEL` (defined by the caller) ROUNDS times for $old and
# $new, labelled old-I and new-I, the order alternating from round to
# round so that neither binary always runs on the machine's slower moment.
ab_alternate() { # ROUNDS
  local i who order
  for i in $(seq 1 "$1"); do
    if [ $((i % 2)) = 1 ]; then order="old new"; else order="new old"; fi
    for who in $order; do
      if [ "$who" = old ]; then run "$old" "old-$i"; else run "$new" "new-$i"; fi
    done
  done
}

# Time `/usr/bin/time -f "$AB_TIME"` writes to $out/LABEL.time.
AB_TIME="%e %U %S %M"

# Runs job JOB with BINARY into a fresh repository and home made from
# $out/config.toml (set up, not timed), timed into $out/LABEL.time, its
# report in $out/LABEL.json: a full backup from nothing.
ab_fresh_run() { # BINARY LABEL JOB
  rm -rf "$out/repo" "$out/home"
  ARCA_HOME=$out/home "$1" apply "$out/config.toml" >/dev/null
  /usr/bin/time -f "$AB_TIME" -o "$out/$2.time" \
    env ARCA_HOME="$out/home" "$1" job run "$3" --json > "$out/$2.json"
}

# Prints, per binary, its runs' wall, CPU and system seconds and peak RSS,
# sorted, and the busy seconds of each STAGE from the session report in
# $out/LABEL.json (whose state must be success).
ab_report() { # ROUNDS [STAGE...]
  python3 - "$out" "$@" <<'PY'
import json, sys
out, rounds, stages = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for who in ("old", "new"):
    cols = {"wall": [], "CPU": [], "system": [], "RSS": []}
    busy = {s: [] for s in stages}
    for i in range(1, rounds + 1):
        e, u, s, m = open(f"{out}/{who}-{i}.time").read().split()[-4:]
        cols["wall"].append(float(e)); cols["CPU"].append(float(u) + float(s))
        cols["system"].append(float(s)); cols["RSS"].append(int(m) / 1024)
        if stages:
            j = json.load(open(f"{out}/{who}-{i}.json"))
            assert j["state"] == "success", j
            for st in stages:
                busy[st].append(j["totals"]["stage_seconds"].get(st, 0.0))
    f = lambda xs, p=2: " ".join(f"{x:.{p}f}" for x in sorted(xs))
    parts = [f"{k} {f(v)} s" for k, v in cols.items() if k != "RSS"]
    parts.append(f"RSS {f(cols['RSS'], 0)} MiB")
    parts += [f"{st} busy {f(v)} s" for st, v in busy.items()]
    print(f"{who}: " + "; ".join(parts))
PY
}
