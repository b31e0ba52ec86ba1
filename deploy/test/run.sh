#!/usr/bin/env bash
# Tests the Ansible playbooks on four hosts made on this machine: network namespaces on a bridge,
# each with its own address, its own sshd, and its own /etc, /var/lib and /opt (overlays), so a
# host's files are its own. Over ssh, as on real hosts:
#   site on three hosts (the cluster serves), site again (zero changes), rolling restart while
#   ringkv-bench writes (zero failed operations, every node restarted), scale out to the fourth
#   (balanced), scale in (drained, removed), and a benchmark run from agents on two hosts.
# Needs root. Installs openssh-server and ansible-core (in a virtualenv) when missing. Removes
# every namespace, process, mount and file it made, also after a failure; bounded in time.
#   deploy/test/run.sh            (KEEP=1 keeps the work directory for a look after a failure)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
[ "$(id -u)" -eq 0 ] || { echo "deploy/test/run.sh needs root (network namespaces, mounts)" >&2; exit 1; }
scripts/deps.sh openssh-server python3-venv iproute2 binutils curl redis-tools
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ringkv-target}"

VENV=${RINGKV_ANSIBLE_VENV:-$HOME/.cache/ringkv-ansible-venv}
if [ ! -x "$VENV/bin/ansible-playbook" ]; then
  echo "installing ansible-core into $VENV ..." >&2
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'ansible-core>=2.15,<2.20'
fi

PREFIX=rkvt
BRIDGE=${PREFIX}br0
NET=10.231.77
HOSTS=(1 2 3 4)
WORK=$(mktemp -d /tmp/ringkv-deploy-test.XXXXXX)
DEADLINE=$((SECONDS + ${DEPLOY_TEST_TIMEOUT_S:-1500}))

cleanup() {
  local rc=$?
  set +e
  for h in "${HOSTS[@]}"; do
    ns=${PREFIX}h$h
    if ip netns list | grep -qw "$ns"; then
      pids=$(ip netns pids "$ns" 2>/dev/null)
      [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
      sleep 0.5
      pids=$(ip netns pids "$ns" 2>/dev/null)
      [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
      ip netns del "$ns"
    fi
    ip link del "${PREFIX}v$h" 2>/dev/null
  done
  ip link del "$BRIDGE" 2>/dev/null
  if [ "$rc" -ne 0 ] && [ -n "${KEEP:-}" ]; then
    echo "kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT INT TERM

step() { echo "=== $* ($((SECONDS))s)" >&2; [ "$SECONDS" -lt "$DEADLINE" ] || { echo "out of time" >&2; exit 1; }; }

step "binaries"
bash scripts/dist.sh "$WORK/dist" >/dev/null

step "four hosts"
ip link add "$BRIDGE" type bridge
ip addr add "$NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id" </dev/null
for h in "${HOSTS[@]}"; do
  ns=${PREFIX}h$h
  d=$WORK/host$h
  mkdir -p "$d"/{etc,var-lib,opt}/{up,work} "$d/ssh"
  ip netns add "$ns"
  ip link add "${PREFIX}v$h" type veth peer name eth0 netns "$ns"
  ip link set "${PREFIX}v$h" master "$BRIDGE" up
  ip -n "$ns" addr add "$NET.1$h/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ssh-keygen -q -t ed25519 -N '' -f "$d/ssh/host_key" </dev/null
  cp "$WORK/id.pub" "$d/ssh/authorized_keys"
  cat >"$d/ssh/sshd_config" <<EOF
ListenAddress $NET.1$h
Port 22
HostKey $d/ssh/host_key
AuthorizedKeysFile $d/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $d/ssh/sshd.pid
Subsystem sftp internal-sftp
EOF
  # The host's own /etc, /var/lib and /opt: overlays whose writes land in its directory.
  ip netns exec "$ns" unshare --mount --propagation private sh -c "
    mount -t overlay overlay -o lowerdir=/etc,upperdir=$d/etc/up,workdir=$d/etc/work /etc &&
    mount -t overlay overlay -o lowerdir=/var/lib,upperdir=$d/var-lib/up,workdir=$d/var-lib/work /var/lib &&
    mount -t overlay overlay -o lowerdir=/opt,upperdir=$d/opt/up,workdir=$d/opt/work /opt &&
    mkdir -p /run/sshd && exec /usr/sbin/sshd -D -f $d/ssh/sshd_config" &
done

inventory() { # the hosts of the cluster: inventory N
  local n=$1
  {
    echo "[ringkv_placement]"
    for h in 1 2 3; do echo "host$h ansible_host=$NET.1$h ringkv_node_id=$h"; done
    echo "[ringkv_nodes]"
    for h in $(seq 4 "$n"); do echo "host$h ansible_host=$NET.1$h ringkv_node_id=$h"; done
    echo "[ringkv:children]"
    echo "ringkv_placement"
    echo "ringkv_nodes"
    echo "[ringkv:vars]"
    echo "ansible_user=root"
    echo "ansible_ssh_private_key_file=$WORK/id"
    echo "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR'"
    echo "ansible_python_interpreter=/usr/bin/python3"
  } >"$WORK/inventory-$n.ini"
  echo "$WORK/inventory-$n.ini"
}

# The test's settings, as extra vars (they win over group_vars/all.yml).
cat >"$WORK/test-vars.yml" <<EOF
ringkv_service_manager: daemon
ringkv_bin_dir: $WORK/dist
ringkv_certs_dir: $WORK/certs
ringkv_shards: 16
EOF

# Runs a playbook; its output goes to WORK/NAME.log and, on failure, to stderr.
play() { # play NAME INVENTORY PLAYBOOK [ARGS...]
  local name=$1 inv=$2 book=$3
  shift 3
  if ! (cd deploy/ansible && ANSIBLE_CONFIG=ansible.cfg timeout $((DEADLINE - SECONDS)) \
    "$VENV/bin/ansible-playbook" -i "$inv" -e "@$WORK/test-vars.yml" "$book" "$@") >"$WORK/$name.log" 2>&1; then
    tail -60 "$WORK/$name.log" >&2
    echo "playbook $book failed (log above)" >&2
    exit 1
  fi
}

# The changed count of every host in a playbook's recap: "host1=0 host2=0 ...".
changed() { grep -E '^\S+ +: ok=' "$WORK/$1.log" | sed -E 's/^(\S+) +: .*changed=([0-9]+).*/\1=\2/' | sort | tr '\n' ' '; }

RINGCTL=("$WORK/dist/ringctl" --cluster "$WORK/certs/cluster.json")

step "sshd up on every host"
for h in "${HOSTS[@]}"; do
  for _ in $(seq 50); do
    ssh -i "$WORK/id" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=2 \
      "root@$NET.1$h" true 2>/dev/null && break
    sleep 0.2
  done
done

step "site on three hosts"
INV3=$(inventory 3)
play site1 "$INV3" site.yml
"${RINGCTL[@]}" health
"${RINGCTL[@]}" put deployed yes
[ "$("${RINGCTL[@]}" get deployed)" = yes ] || { echo "the deployed cluster does not serve" >&2; exit 1; }
# The gateways, over TLS on every host: HTTPS with a token, the Redis protocol with the admin
# client certificate.
TOKEN=$("${RINGCTL[@]}" token create --name deploy-test --role write)
C="$WORK/certs"
for h in 1 2 3; do
  for _ in $(seq 50); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$C/ca.pem" -H "Authorization: Bearer $TOKEN" "https://$NET.1$h:8101/v1/kv/deployed" || true)
    [ "$code" = 200 ] && break
    sleep 0.2
  done
  [ "$code" = 200 ] || { echo "HTTPS gateway on host $h: $code" >&2; exit 1; }
  out=$(redis-cli -e --tls --cacert "$C/ca.pem" --cert "$C/client.pem" --key "$C/client.key" -h "$NET.1$h" -p 6379 incr deploy-counter)
  [ "$out" = "$h" ] || { echo "Redis gateway on host $h answered $out" >&2; exit 1; }
done
# Each host's files are its own: node 2's identity is on host 2 and nowhere else.
grep -q '^id = 2' "$WORK/host2/var-lib/up/ringkv/node.toml"
[ ! -e "$WORK/host1/var-lib/up/ringkv/node.toml" ] || ! grep -q '^id = 2' "$WORK/host1/var-lib/up/ringkv/node.toml"
[ ! -e /opt/ringkv ] && [ ! -e /etc/ringkv ] && [ ! -e /var/lib/ringkv ] || { echo "the playbook wrote outside the hosts" >&2; exit 1; }

step "site again: nothing changes"
play site2 "$INV3" site.yml
c=$(changed site2)
echo "changed: $c" >&2
if echo "$c" | grep -qE '=[1-9]'; then
  grep -B2 -E '^changed:' "$WORK/site2.log" | tail -30 >&2
  echo "a second site run changed something: $c" >&2
  exit 1
fi

step "rolling restart under load"
pid_of() { tr -d '\n' <"$WORK/host$1/var-lib/up/ringkv/ringkv.pid"; }
declare -A pids_before
for h in 1 2 3; do pids_before[$h]=$(pid_of "$h"); done
(play rolling "$INV3" rolling_restart.yml) &
restart=$!
# Back-to-back bench runs of writes for as long as the restart lasts.
i=0
while kill -0 "$restart" 2>/dev/null; do
  i=$((i + 1))
  "$WORK/dist/ringkv-bench" --cluster "$WORK/certs/cluster.json" --workload write --clients 4 --inflight 4 \
    --duration 5s --warmup 1s --json "$WORK/bench-restart-$i.json" >>"$WORK/bench-restart.log" 2>&1 ||
    { tail -20 "$WORK/bench-restart.log" >&2; echo "ringkv-bench failed during the rolling restart" >&2; exit 1; }
done
wait "$restart"
for h in 1 2 3; do
  [ -n "${pids_before[$h]}" ] && [ "${pids_before[$h]}" != "$(pid_of "$h")" ] ||
    { echo "node $h was not restarted (pid ${pids_before[$h]})" >&2; exit 1; }
done
python3 - "$WORK"/bench-restart-*.json <<'EOF'
import json, sys
runs = [json.load(open(f)) for f in sys.argv[1:]]
ops, errors = sum(r["ops"] for r in runs), sum(r["errors"] for r in runs)
print(f"rolling restart under load: {len(runs)} runs, {ops} writes, {errors} failed", file=sys.stderr)
assert errors == 0, f"{errors} writes failed during the rolling restart"
assert ops > 0 and len(runs) >= 3, "the load did not cover the restart"
EOF

step "scale out to the fourth host"
INV4=$(inventory 4)
play scale_out "$INV4" scale_out.yml
"${RINGCTL[@]}" -o json node list | python3 -c '
import json, sys
nodes = {n["id"]: n for n in json.load(sys.stdin)}
assert 4 in nodes and nodes[4]["state"] == "up" and nodes[4]["replicas"] > 0, nodes
print("node 4 holds", nodes[4]["replicas"], "replicas", file=sys.stderr)'

step "scale in: node 4 leaves"
play scale_in "$INV4" scale_in.yml -e ringkv_remove_node_id=4
"${RINGCTL[@]}" -o json node list | python3 -c '
import json, sys
nodes = {n["id"]: n for n in json.load(sys.stdin)}
assert 4 not in nodes or nodes[4]["state"] == "removed", nodes'
if ip netns pids ${PREFIX}h4 | xargs -r ps -o comm= -p | grep -q '^ringkv$'; then
  echo "node 4 still runs" >&2
  exit 1
fi
"${RINGCTL[@]}" health
[ "$("${RINGCTL[@]}" get deployed)" = yes ]

step "bench from agents on two hosts"
play bench "$INV4" bench.yml -e '{"ringkv_bench_hosts": ["host1", "host2"]}' \
  -e "ringkv_bench_args='--workload write --clients 2 --inflight 2 --duration 3s --warmup 1s'" -e "ringkv_bench_result=$WORK/bench-result.json"
python3 - "$WORK/bench-result.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"bench from two agents: {r['ops']} writes, {r['errors']} failed", file=sys.stderr)
assert r["ops"] > 0 and r["errors"] == 0, r
EOF

step "done"
echo "deploy test passed" >&2
