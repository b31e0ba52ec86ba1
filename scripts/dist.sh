#!/usr/bin/env bash
# Builds the binaries to ship into dist/ (what the Ansible role copies to every host):
# dist/ringkv, dist/ringctl and dist/ringkv-bench without debug information, each linked by a
# GNU debuglink to its debug file in dist/debug/ (keep those for symbolized profiles and
# backtraces: `perf report --symfs`, or put them next to the binaries). Uses the same release
# build as the tests, so nothing compiles twice.
#   scripts/dist.sh [OUT_DIR]     (default: dist)
# Fails if a shipped binary is over 40 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh binutils
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ringkv-target}"
OUT=${1:-dist}
MAX_BYTES=$((40 * 1000 * 1000))
cargo build --release --workspace --bins
mkdir -p "$OUT/debug"
for bin in ringkv ringctl ringkv-bench; do
  src="$CARGO_TARGET_DIR/release/$bin"
  # Written under temporary names and renamed: a host copying from dist/ never sees half a file.
  objcopy --only-keep-debug --compress-debug-sections=zlib "$src" "$OUT/debug/$bin.debug.tmp"
  mv "$OUT/debug/$bin.debug.tmp" "$OUT/debug/$bin.debug"
  objcopy --strip-debug --strip-unneeded --add-gnu-debuglink="$OUT/debug/$bin.debug" "$src" "$OUT/$bin.tmp"
  chmod 0755 "$OUT/$bin.tmp"
  mv "$OUT/$bin.tmp" "$OUT/$bin"
  size=$(stat -c %s "$OUT/$bin")
  if [ "$size" -gt "$MAX_BYTES" ]; then
    echo "$OUT/$bin is $size bytes, over the $MAX_BYTES allowed" >&2
    exit 1
  fi
  awk -v b="$bin" -v s="$size" -v d="$(stat -c %s "$OUT/debug/$bin.debug")" -v o="$OUT" \
    'BEGIN { printf "%-14s %6.1f MB (debug info: %s/debug/%s.debug, %.0f MB)\n", b, s / 1e6, o, b, d / 1e6 }'
done
"$OUT/ringkv" --version >/dev/null
"$OUT/ringctl" --version >/dev/null
