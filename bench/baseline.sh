#!/usr/bin/env bash
# Reproduces the figures in bench/RESULTS.md on one machine (3 nodes on one host, fsync on).
#   bash bench/baseline.sh [SECTION...]     sections: workloads contract shards concurrency values idle placement
# Results (JSON and SVG plots) go to bench/results/. Build first: cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ringkv-target}
BENCH=${RINGKV_BENCH:-$TARGET_DIR/release/ringkv-bench}
OUT=bench/results
mkdir -p "$OUT"
[ -x "$BENCH" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }

# The common setting of every figure: a fresh 3-node cluster per run, fsync on.
LOCAL=(--local --nodes 3 --fsync on)

workloads() {
  for w in write read a b f; do
    "$BENCH" "${LOCAL[@]}" --shards 64 --workload "$w" --clients 16 --inflight 4 --duration 20s --warmup 5s --json "$OUT/workload-$w.json"
  done
  "$BENCH" "${LOCAL[@]}" --shards 64 --workload a --distribution zipfian --clients 16 --inflight 4 --duration 20s --warmup 5s --json "$OUT/workload-a-zipfian.json"
  # Open loop at a fixed rate: latency under a given load, coordinated omission corrected.
  "$BENCH" "${LOCAL[@]}" --shards 64 --workload a --clients 16 --inflight 8 --rate 1000 --duration 20s --warmup 5s --json "$OUT/workload-a-open-1000.json"
}

contract() {
  "$BENCH" "${LOCAL[@]}" --shards 64 --workload write --clients 64 --value-size 256 --duration 20s --json "$OUT/contract-write.json"
}

shards() {
  "$BENCH" sweep --param shards --values 1,8,64,256,1024 "${LOCAL[@]}" --workload write --clients 16 --inflight 4 \
    --duration 10s --warmup 3s --json "$OUT/sweep-shards.json" --plots "$OUT"
}

concurrency() {
  "$BENCH" sweep --param concurrency --values 1,2,4,8,16,32,64,128,256,512 "${LOCAL[@]}" --shards 64 --workload write \
    --duration 10s --warmup 3s --json "$OUT/sweep-concurrency.json" --plots "$OUT"
}

values() {
  "$BENCH" sweep --param value-size --values 64,256,1024,4096,16384,65536 "${LOCAL[@]}" --shards 64 --workload write \
    --clients 16 --inflight 4 --duration 10s --warmup 3s --json "$OUT/sweep-value-size.json" --plots "$OUT"
}

placement() {
  # The planner alone over a simulated cluster (no processes): 100 nodes join, 10 are lost.
  "$BENCH" placement-sim --nodes 1000 --shards 100000 --add 100 --lose 10 --json "$OUT/placement-sim.json"
}

idle() {
  "$BENCH" idle --shards 1,8,64,256,1024 --nodes 3 --settle 10s --window 15s --json "$OUT/idle.json" --plots "$OUT"
}

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(workloads contract shards concurrency values idle placement)
for s in "${sections[@]}"; do
  echo "== $s" >&2
  "$s"
done
