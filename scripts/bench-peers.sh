#!/usr/bin/env bash
# arca side by side with restic, borg, `zstd -1 -T2` and b3sum on one guest
# disk (host/benches/peers.rs). Installs the peers from Debian if missing.
# Size with ARCA_BENCH_GIB (default 4). Results: results/peers-<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
missing=()
for p in restic borgbackup b3sum zstd; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bench-peers: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo bench --bench peers
