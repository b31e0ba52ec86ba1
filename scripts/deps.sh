#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build ringkv: rocksdb's build needs clang and
# libclang (bindgen), jemalloc's needs make. Extra package names given as arguments are installed too (the tests pass
# nftables and iproute2 for their network namespaces). Safe to run again; does nothing when
# everything is there.
set -euo pipefail
need=()
if command -v dpkg >/dev/null 2>&1; then
  for p in clang libclang-dev make "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
else
  command -v clang >/dev/null 2>&1 && command -v make >/dev/null 2>&1 || { echo "install clang, libclang and make (needed to build rocksdb and jemalloc)" >&2; exit 1; }
fi
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${need[*]} ..." >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
