# Sourced by ab-cbt.sh and cbt-empty.sh: serves the live VM that
# `cargo bench --bench cbt` leaves in target/tmp/bench-cbt again with
# qemu-storage-daemon (the bench's daemon was killed, so its CBT bitmap is
# gone and the first session after this starts a fresh one).
#
# Sets `dir` (the bench's folder) and `out` (a temporary folder, removed
# at exit with the daemon).
dir=$(cd "$(dirname "$0")/.." && pwd)/target/tmp/bench-cbt
[ -f "$dir/disk.qcow2" ] || { echo "no $dir/disk.qcow2: run cargo bench --bench cbt first" >&2; exit 2; }
out=$(mktemp -d)
rm -f "$dir/qmp.sock" "$dir/nbd.sock"
qemu-storage-daemon \
  --blockdev "driver=file,filename=$dir/disk.qcow2,node-name=file0" \
  --blockdev driver=qcow2,file=file0,node-name=disk0 \
  --nbd-server "addr.type=unix,addr.path=$dir/nbd.sock" \
  --export type=nbd,id=vm,node-name=disk0,name=vm,writable=on \
  --chardev "socket,path=$dir/qmp.sock,server=on,wait=off,id=qmp0" \
  --monitor chardev=qmp0 >/dev/null 2>&1 &
qsd=$!
trap 'kill $qsd 2>/dev/null; rm -rf "$out"' EXIT
# A socket file appears a moment before QEMU listens on it.
listens() { python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null; }
until listens "$dir/qmp.sock" && listens "$dir/nbd.sock"; do sleep 0.05; done
