# Sourced by ab-cbt.sh and cbt-empty.sh: serves the live VM that
# `cargo bench --bench cbt` leaves in target/tmp/bench-cbt again with
# qemu-storage-daemon (the bench's daemon was killed, so its CBT bitmap is
# gone and the first session after this starts a fresh one; a bitmap
# QEMU stored in the image is found again). With ARCA_CBT_VM=peers it
# serves the live VM of `cargo bench --bench peers` (target/tmp/bench-peers,
# its qcow2 and its `arca+cbt` home) instead.
#
# Sets `dir` (the bench's folder), `img` (the VM's qcow2), `home` (the
# ARCA_HOME whose job `bench` backs the VM up) and `out` (a temporary
# folder, removed at exit with the daemon).
root=$(cd "$(dirname "$0")/.." && pwd)/target/tmp
if [ "${ARCA_CBT_VM:-}" = peers ]; then
  dir=$root/bench-peers img=$root/bench-peers/vm.qcow2 home=$root/bench-peers/arca+cbt bench=peers
else
  dir=$root/bench-cbt img=$root/bench-cbt/disk.qcow2 home=$root/bench-cbt/home bench=cbt
fi
[ -f "$img" ] || { echo "no $img: run cargo bench --bench $bench first" >&2; exit 2; }
out=$(mktemp -d)
rm -f "$dir/qmp.sock" "$dir/nbd.sock"
qemu-storage-daemon \
  --blockdev "driver=file,filename=$img,node-name=file0" \
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
