#!/usr/bin/env bash
# Runs the whole test suite: formatting, unit tests, the openraft storage suite and the
# integration tests (real clusters on 127.0.0.1, and fault runs in network namespaces, which
# need root and nftables). Tests and binaries share one release
# build, so the dependencies (rocksdb above all) compile once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh nftables iproute2 binutils systemd prometheus redis-tools python3-venv
# The Python `redis` package (the Redis gateway's tests), in a virtualenv outside the clone.
export RINGKV_PYTHON="${RINGKV_PYTHON:-$HOME/.cache/ringkv-py-venv/bin/python}"
if ! "$RINGKV_PYTHON" -c 'import redis' 2>/dev/null; then
  venv="$(dirname "$(dirname "$RINGKV_PYTHON")")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'redis>=5,<9'
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ringkv-target}"
cargo fmt --all --check
cargo build --release --workspace --bins
# Each integration test runs its own cluster of three processes; two at a time fit two cores.
cargo test --release --workspace -- --test-threads=2
