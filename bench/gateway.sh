#!/usr/bin/env bash
# The Redis gateway against the native client on one cluster in one run, and a single durable
# redis-server (appendfsync always) as the ceiling of one durable node.
#   bash bench/gateway.sh            (SHARDS=64 DURATION_S=20 REDIS_N=200000 by default)
# 1. `ringkv dev` with SHARDS shards (3 nodes, fsync on);
# 2. ringkv-bench writes, 256 in flight (16 clients x 16), 256-byte values;
# 3. redis-benchmark SET through node 1's Redis gateway, 256 in flight (-c 16 -P 16), then the
#    other tests it knows (ping, get, incr, mset);
# 4. the same redis-benchmark against redis-server with appendonly yes, appendfsync always.
# Prints the figures and the gateway/native ratio; JSON and CSV go to bench/results/gateway/.
# Needs redis-tools and redis-server (apt) and python3; build first:
#   cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ringkv-target}
BIN=$TARGET_DIR/release
SHARDS=${SHARDS:-64}
DUR=${DURATION_S:-20}
N=${REDIS_N:-200000}
OUT=bench/results/gateway
mkdir -p "$OUT"
for b in "$BIN/ringkv" "$BIN/ringkv-bench"; do [ -x "$b" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }; done
command -v redis-benchmark >/dev/null && command -v redis-server >/dev/null || { echo "needs redis-tools and redis-server (apt-get install redis-tools redis-server)" >&2; exit 1; }

dir=$(mktemp -d /tmp/ringkv-gateway-bench.XXXX)
"$BIN/ringkv" dev --data-dir "$dir" --shards "$SHARDS" >"$dir/dev.log" 2>&1 &
dev=$!
redis_pid=
cleanup() {
  kill "$dev" 2>/dev/null && wait "$dev" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 180); do grep -q "^cluster ready" "$dir/dev.log" 2>/dev/null && break; sleep 1; done
grep -q "^cluster ready" "$dir/dev.log" || { cat "$dir/dev.log" >&2; echo "the dev cluster did not come up" >&2; exit 1; }
token=$(cat "$dir/app.token")
port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["resp_addr"].rsplit(":",1)[1])' "$dir/cluster.json")

echo "native client: writes, $SHARDS shards, 16 clients x 16 in flight, ${DUR}s"
"$BIN/ringkv-bench" --cluster "$dir/cluster.json" --workload write --clients 16 --inflight 16 --value-size 256 \
  --duration "${DUR}s" --warmup 5s --json "$OUT/native-write.json" >/dev/null
native=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["ops_per_sec"]))' "$OUT/native-write.json")

echo "Redis gateway: redis-benchmark SET -c 16 -P 16 -d 256 -n $N"
redis-benchmark -p "$port" -a "$token" -t set -c 16 -P 16 -d 256 -r 100000 -n "$N" --csv >"$OUT/gateway-set.csv"
gateway=$(python3 -c 'import csv,sys; r=[x for x in csv.reader(open(sys.argv[1])) if x and x[0]=="SET"]; print(round(float(r[0][1])))' "$OUT/gateway-set.csv")
redis-benchmark -p "$port" -a "$token" -t ping,get,incr,mset -c 16 -P 16 -d 256 -r 100000 -n "$N" --csv >"$OUT/gateway-other.csv"

echo "redis-server, appendfsync always: the same redis-benchmark"
rport=$((20000 + RANDOM % 10000))
redis-server --port "$rport" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always --save "" --daemonize no >"$dir/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-benchmark -p "$rport" -t set,get,incr,mset -c 16 -P 16 -d 256 -r 100000 -n "$N" --csv >"$OUT/redis-server.csv"

echo
echo "writes/s at 256 in flight: native client $native, Redis gateway SET $gateway ($(python3 -c "print(f'{$gateway/$native:.2f}')")x of native)"
echo "gateway, other tests:"; cat "$OUT/gateway-other.csv"
echo "redis-server (one durable node, no replication):"; cat "$OUT/redis-server.csv"
