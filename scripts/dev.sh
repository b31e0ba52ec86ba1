#!/usr/bin/env bash
# Builds ringkv and starts a local 3-node cluster with data under ./data/dev (loopback only).
# Extra arguments go to `ringkv dev` (e.g. --shards 16). Ctrl-C stops the cluster; running this
# again restarts it with its data.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ringkv-target}"
cargo build --release --bins
echo "binaries: $CARGO_TARGET_DIR/release/{ringkv,ringctl}" >&2
exec "$CARGO_TARGET_DIR/release/ringkv" dev "$@"
