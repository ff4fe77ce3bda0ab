# Sourced by ab-full.sh and ab-restore.sh: checks what they need and
# writes the job they measure.
#
#   ab_setup STAGES
#
# Sets `disk` (ARCA_AB_DISK, or the disk `cargo bench --bench peers` leaves
# in target/tmp/bench-peers) and `out` (a scratch folder removed on exit),
# and writes $out/config.toml: repository $out/repo, VM `guest` on the
# disk, job `bench` with a pipeline whose stages are STAGES (a pipeline's
# `exclusion = [...]` line, or nothing).
ab_setup() {
  disk=${ARCA_AB_DISK:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/tmp/bench-peers/disk.raw}
  [ -f "$disk" ] || { echo "no $disk: run cargo bench --bench peers first" >&2; exit 2; }
  [ -x /usr/bin/time ] || { echo "needs GNU time (apt-get install time)" >&2; exit 2; }
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
