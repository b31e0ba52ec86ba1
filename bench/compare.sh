#!/usr/bin/env bash
# ringkv against etcd 3.4 on this box, side by side, minutes apart: the targets of the engine
# work are ratios measured here (absolute figures move with the host).
#   bash bench/compare.sh [CASE...]     cases: write shards read single idle   (default: all)
# Each case runs etcd (../shared/tools/etcd-compare, or $ETCD_COMPARE) and ringkv-bench with the
# same load shape, prints both and the ratio, and keeps the JSON in bench/results/compare/.
# Needs python3 (to read JSON); build first: cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ringkv-target}
BENCH=${RINGKV_BENCH:-$TARGET_DIR/release/ringkv-bench}
ETCD=${ETCD_COMPARE:-../shared/tools/etcd-compare}
DUR=${COMPARE_DURATION_S:-20}
OUT=bench/results/compare
mkdir -p "$OUT"
[ -x "$BENCH" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }
[ -x "$ETCD" ] || { echo "no etcd-compare at $ETCD (set ETCD_COMPARE)" >&2; exit 1; }

LOCAL=(--local --nodes 3 --fsync on --value-size 256 --duration "${DUR}s" --warmup 5s)

# field FILE KEY: one number from a result file ('-' when absent).
field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("-" if v is None else (f"{v:.1f}" if isinstance(v,float) else v))' "$1" "$2"; }
ratio() { python3 -c 'import sys; a,b=sys.argv[1:3]; print("-" if "-" in (a,b) or float(b)==0 else f"{float(a)/float(b):.2f}x")' "$1" "$2"; }
row() { # name ringkv.json etcd.json
  local r=$2 e=$3
  printf '%-34s ringkv %8s ops/s p50 %7s p99 %7s cpu/op %6s µs | etcd %8s ops/s p50 %7s p99 %7s cpu/op %6s µs | throughput %s, cpu %s\n' \
    "$1" "$(field "$r" ops_per_sec)" "$(field "$r" p50_us)" "$(field "$r" p99_us)" "$(field "$r" cpu_us_per_op_nodes)" \
    "$(field "$e" ops_per_sec)" "$(field "$e" p50_us)" "$(field "$e" p99_us)" "$(field "$e" cpu_us_per_op)" \
    "$(ratio "$(field "$r" ops_per_sec)" "$(field "$e" ops_per_sec)")" "$(ratio "$(field "$r" cpu_us_per_op_nodes)" "$(field "$e" cpu_us_per_op)")"
}

etcd_write() { [ -s "$OUT/etcd-write-256.json" ] || "$ETCD" --workload write --clients 256 --conns 64 --value-size 256 --duration-s "$DUR" --json "$OUT/etcd-write-256.json" >/dev/null; }

write() {
  etcd_write
  "$BENCH" "${LOCAL[@]}" --shards 64 --workload write --clients 16 --inflight 16 --json "$OUT/ringkv-write-64.json" >/dev/null
  row "writes, 64 shards, 256 in flight" "$OUT/ringkv-write-64.json" "$OUT/etcd-write-256.json"
}

shards() {
  etcd_write
  for s in 1 256 1024; do
    "$BENCH" "${LOCAL[@]}" --shards "$s" --workload write --clients 16 --inflight 16 --json "$OUT/ringkv-write-$s.json" >/dev/null
    row "writes, $s shards, 256 in flight" "$OUT/ringkv-write-$s.json" "$OUT/etcd-write-256.json"
  done
}

read() {
  "$ETCD" --workload read --clients 256 --conns 64 --value-size 256 --duration-s "$DUR" --json "$OUT/etcd-read-256.json" >/dev/null
  "$BENCH" "${LOCAL[@]}" --shards 64 --workload read --clients 16 --inflight 16 --json "$OUT/ringkv-read-64.json" >/dev/null
  row "linearizable reads, 64 shards, 256" "$OUT/ringkv-read-64.json" "$OUT/etcd-read-256.json"
}

single() {
  "$ETCD" --workload write --clients 1 --conns 1 --value-size 256 --duration-s "$DUR" --json "$OUT/etcd-write-inflight-1.json" >/dev/null
  "$BENCH" "${LOCAL[@]}" --shards 64 --workload write --clients 1 --inflight 1 --json "$OUT/ringkv-write-inflight-1.json" >/dev/null
  row "writes, one in flight" "$OUT/ringkv-write-inflight-1.json" "$OUT/etcd-write-inflight-1.json"
}

idle() {
  "$BENCH" idle --shards 1024 --nodes 3 --settle 10s --window 15s --json "$OUT/ringkv-idle-1024.json" >/dev/null
  python3 - "$OUT/ringkv-idle-1024.json" <<'PY'
import json, sys
for p in json.load(open(sys.argv[1]))["points"]:
    per_replica = p["rss_mib_mean"] / p["replicas_per_node"]
    print(f"idle, {p['shards']} shards: {p['cpu_percent_mean']:.1f} % of a core per node (max {p['cpu_percent_max']:.1f}), "
          f"{per_replica:.3f} MiB per replica")
PY
}

rm -f "$OUT/etcd-write-256.json"
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(write shards read single idle)
for c in "${cases[@]}"; do
  echo "== $c" >&2
  "$c"
done
