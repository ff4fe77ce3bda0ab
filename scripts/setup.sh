#!/usr/bin/env bash
# Installs what building arca needs on Debian 12 with a rustup toolchain:
# the wasm32-wasip2 target, and clang/lld/wasi-libc for the C zstd library
# inside the codec plugin. Safe to run again; installs only what is missing.
set -euo pipefail

packages=(clang lld wasi-libc llvm-14 xfsprogs qemu-guest-agent sqlite3 e2fsprogs fdisk ntfs-3g iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi
