#!/usr/bin/env bash
# Puts and gets of Aspen next to etcd on this machine, interleaved, with ratios:
#
#   scripts/bench-vs-etcd.sh [TOTAL]        (TOTAL requests per throughput run, default 50000)
#
# For N = 1 and 3 nodes: starts a fresh `aspen up --nodes N` and a fresh N-member etcd
# cluster (127.0.0.1, free ports, temporary data dirs on the same disk), fills the key space
# of both the same way (as scripts/bench.sh does), then runs each row below 3 times per
# system, alternating (Aspen run 1, etcd run 1, Aspen run 2, ...) so machine drift hits both
# alike, and stops both clusters. Aspen's load is `aspen bench put|get`; etcd's is
# bench/etcd-load (the same loop, see its module doc), its endpoints listing every member.
# Prints every run as it finishes, then a markdown table of medians and Aspen/etcd ratios.
#
# etcd comes from scripts/install-etcd.sh: PyPI's etcd 3.5.1 by default, Debian's etcd 3.4.23
# with ETCD_FROM=debian; bench/etcd-load is built as in scripts/bench-etcd.sh. ASPEN_BIN: measure another aspen build instead of building;
# RUNS: runs per system and row (default 3). ROWS=latency: instead of the rows under load,
# sequential puts, serializable gets and linearizable gets (one request at a time), to see
# which part of a lone put differs. ASPEN_VIA=etcd-api: drive Aspen through its etcd
# API (`--etcd-api`, a bearer token as etcd's password) with bench/etcd-load too, so one load
# generator and one protocol measure both.
#
# At one node, etcd 3.5.1's put rows are not like for like: a one-member etcd 3.5.1 answers a
# put before its WAL sync finishes, Aspen after its log sync (scripts/durability-vs-etcd.sh).
# Debian's etcd 3.4.23 waits for the sync, as Aspen does: ETCD_FROM=debian compares durable
# with durable at one node.
set -euo pipefail
shopt -s inherit_errexit   # a failed run inside $(...) stops the script
cd "$(dirname "$0")/.."
ROOT=$PWD
TOTAL=${1:-50000}
RUNS=${RUNS:-3}   # runs per system and row
KEYS=10000
# Rows: label | flags common to both load generators.
case ${ROWS:-load} in
  load) ROWS=(
    "sequential put|put --clients 1 --conns 1 --total 2000 --key-space $KEYS --val-size 256"
    "put, 64 clients|put --clients 64 --conns 4 --total $TOTAL --key-space $KEYS --val-size 256"
    "put, 256 clients|put --clients 256 --conns 8 --total $TOTAL --key-space $KEYS --val-size 256"
    "linearizable get, 64 clients|get --clients 64 --conns 4 --total $TOTAL --key-space $KEYS"
  ) ;;
  # One request at a time, three kinds: what a lone put costs besides a round trip to the
  # member (serializable get: the client's round trip alone) and besides a round of the
  # leader with its followers (linearizable get: a read index, no disk).
  latency) ROWS=(
    "sequential put|put --clients 1 --conns 1 --total 3000 --key-space $KEYS --val-size 256"
    "sequential serializable get|get --serializable --clients 1 --conns 1 --total 3000 --key-space $KEYS"
    "sequential linearizable get|get --clients 1 --conns 1 --total 3000 --key-space $KEYS"
  ) ;;
  *) echo "ROWS must be load or latency, not '$ROWS'" >&2; exit 2 ;;
esac
FILL="put --clients 64 --conns 4 --total $KEYS --key-space $KEYS --val-size 256"

# --- etcd (PyPI's 3.5.1 or Debian's 3.4.23), and the etcd load driver (as scripts/bench-etcd.sh) -------------
ETCD_BIN_DIR=$("$ROOT/scripts/install-etcd.sh")
# The machine's Python for two small helpers (PyPI's etcd brings a venv, Debian's does not).
PY=python3
ETCD=$ETCD_BIN_DIR/etcd
ETCDCTL=$ETCD_BIN_DIR/etcdctl

CRATE=$ROOT/bench/etcd-load
cargo fetch --locked --manifest-path "$CRATE/Cargo.toml" -q
PROTOC_CRATE=$(cargo metadata --locked --format-version 1 --manifest-path "$CRATE/Cargo.toml" |
  "$PY" -c 'import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "protoc-bin-vendored-linux-x86_64"))')
PROTOC=$PROTOC_CRATE/bin/protoc CARGO_TARGET_DIR=$CRATE/target \
  cargo build --release --locked -q --manifest-path "$CRATE/Cargo.toml"
LOAD=$CRATE/target/release/etcd-load

# --- aspen ---------------------------------------------------------------------------------
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build --release -q -p aspen-node
fi
ASPEN=${ASPEN_BIN:-$ROOT/target/release/aspen}

# --- clusters ------------------------------------------------------------------------------
WORK=$(mktemp -d)
ETCD_PIDS=()
ETCD_ENDPOINTS=
ASPEN_DIR=
aspen_pids() { cat "$ASPEN_DIR"/node-*/pid 2>/dev/null || true; }
# gone PID: the process has exited (a zombie too: the nodes' parent is init, not us).
gone() { local state; state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null); [ "${state:-Z}" = Z ]; }
stop_clusters() {
  local p pids
  for p in "${ETCD_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${ETCD_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ETCD_PIDS=()
  if [ -n "$ASPEN_DIR" ]; then
    # The nodes are not our children: kill them, then wait (up to 10 s each) until gone.
    pids=$(aspen_pids)
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    for p in $pids; do
      for _ in $(seq 100); do gone "$p" && break; sleep 0.1; done
      gone "$p" || kill -9 "$p" 2>/dev/null || true
    done
    ASPEN_DIR=
  fi
}
trap 'stop_clusters; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# start_etcd N: an N-member etcd cluster; sets ETCD_PIDS and ETCD_ENDPOINTS.
start_etcd() {
  local n=$1 i initial="" dir=$WORK/etcd-$1
  # 2N distinct free ports (held open together while picked).
  local -a ports
  read -ra ports < <("$PY" -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' $((2 * n)))
  local -a clients=()
  for i in $(seq 0 $((n - 1))); do
    clients+=("http://127.0.0.1:${ports[2 * i]}")
    initial+="${initial:+,}m$i=http://127.0.0.1:${ports[2 * i + 1]}"
  done
  mkdir -p "$dir"
  for i in $(seq 0 $((n - 1))); do
    local peer=http://127.0.0.1:${ports[2 * i + 1]}
    "$ETCD" --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "${clients[i]}" --advertise-client-urls "${clients[i]}" \
      --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
      --initial-cluster "$initial" --initial-cluster-token "bench-$n" --initial-cluster-state new \
      --log-level warn > "$dir/m$i.log" 2>&1 &
    ETCD_PIDS+=($!)
  done
  ETCD_ENDPOINTS=$(IFS=,; echo "${clients[*]}")
  for _ in $(seq 200); do
    if "$ETCDCTL" --endpoints "$ETCD_ENDPOINTS" --dial-timeout 1s endpoint health > /dev/null 2>&1; then return; fi
    for i in "${ETCD_PIDS[@]}"; do
      if ! kill -0 "$i" 2>/dev/null; then cat "$dir"/*.log >&2; echo "etcd exited" >&2; exit 1; fi
    done
    sleep 0.1
  done
  "$ETCDCTL" --endpoints "$ETCD_ENDPOINTS" endpoint health
}

# start_aspen N: `aspen up --nodes N`; sets ASPEN_DIR and the client's environment.
start_aspen() {
  ASPEN_DIR=$WORK/aspen-$1
  if [ "${ASPEN_VIA:-}" = etcd-api ]; then
    ASPEN_ETCD_ENDPOINTS=$("$ASPEN" up --nodes "$1" --data-dir "$ASPEN_DIR" --etcd-api --detach -o json |
      jq -r '.etcd_api | map("http://" + .) | join(",")')
  else
    "$ASPEN" up --nodes "$1" --data-dir "$ASPEN_DIR" --detach -o json > /dev/null
  fi
  ASPEN_CLUSTER=$(cat "$ASPEN_DIR/cluster.ticket")
  export ASPEN_CLUSTER ASPEN_IDENTITY=$ASPEN_DIR/admin.key ASPEN_NO_DHT=true
  if [ "${ASPEN_VIA:-}" = etcd-api ]; then
    ASPEN_ETCD_USER="aspen:$("$ASPEN" auth token issue --bearer --allow 'kv:write:*' --ttl 24h)"
  fi
}

# cpu_idle PID...: CPU use of these processes over 3 s of no load, in % of one core.
cpu_ticks() { local p; for p in "$@"; do cat "/proc/$p/stat"; done | awk '{ t += $14 + $15 } END { print t }'; }
cpu_idle() {
  local a b; a=$(cpu_ticks "$@"); sleep 3; b=$(cpu_ticks "$@")
  awk -v t=$((b - a)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t * 100 / hz / 3 }'
}

# --- one run of each system, as "req_per_s p50_ms p99_ms" ------------------------------------
run_aspen() {
  if [ "${ASPEN_VIA:-}" = etcd-api ]; then
    # shellcheck disable=SC2086
    "$LOAD" --endpoint "$ASPEN_ETCD_ENDPOINTS" --user "$ASPEN_ETCD_USER" $1 |
      sed -n 's/.* requests_per_sec=\([^ ]*\) p50_ms=\([^ ]*\) p99_ms=\([^ ]*\).*/\1 \2 \3/p'
    return
  fi
  # shellcheck disable=SC2086
  "$ASPEN" bench $1 -o json | jq -r '"\(.requests_per_sec | round) \(.p50_ms) \(.p99_ms)"'
}
run_etcd() {
  # shellcheck disable=SC2086
  "$LOAD" --endpoint "$ETCD_ENDPOINTS" $1 |
    sed -n 's/.* requests_per_sec=\([^ ]*\) p50_ms=\([^ ]*\) p99_ms=\([^ ]*\).*/\1 \2 \3/p'
}

median() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
ms() { awk -v x="$1" 'BEGIN { printf (x < 10 ? "%.2f" : "%.1f"), x }'; }

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
HEADER=(
  "machine: nproc=$(nproc), cpu \"$CPU\", $(free -g | awk '/^Mem:/ {print $2}') GiB, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
  "etcd: $("$ETCD" --version | head -1) ($("$ETCD" --version | sed -n 's/^Go Version: //p')), bench/etcd-load (etcd-client $(sed -n '/^name = "etcd-client"$/{n;s/^version = "\(.*\)"/\1/p}' "$CRATE/Cargo.lock"))"
  "aspen: $("$ASPEN" --version), ${ASPEN_BIN:+the binary $ASPEN_BIN (built $(date -u -r "$ASPEN_BIN" '+%F %T UTC')); the tree is at }commit $(git describe --always --dirty), load through ${ASPEN_VIA:-aspen bench, the Aspen protocol}"
  "TOTAL=$TOTAL, $RUNS runs per system and row, interleaved; data dirs in $(dirname "$WORK")"
)
printf '%s\n' "${HEADER[@]}"

declare -A RESULTS   # "nodes|row|system" -> "rps p50 p99;rps p50 p99;..."
IDLE=()
for NODES in 1 3; do
  start_etcd "$NODES"
  start_aspen "$NODES"
  # Fill the key space of both so gets find values (as scripts/bench.sh).
  run_aspen "$FILL" > /dev/null
  run_etcd "$FILL" > /dev/null
  # shellcheck disable=SC2046
  IDLE+=("$NODES node(s), idle CPU between runs: etcd $(cpu_idle "${ETCD_PIDS[@]}")%, aspen $(cpu_idle $(aspen_pids))% of one core")
  echo "${IDLE[-1]}"
  for row in "${ROWS[@]}"; do
    label=${row%%|*} args=${row#*|}
    for run in $(seq "$RUNS"); do
      for sys in aspen etcd; do
        r=$("run_$sys" "$args")
        echo "  $NODES node(s) | $label | $sys run $run: req/s p50_ms p99_ms = $r"
        RESULTS["$NODES|$label|$sys"]+="${RESULTS["$NODES|$label|$sys"]:+;}$r"
      done
    done
  done
  stop_clusters
done

# --- the table ------------------------------------------------------------------------------
# summary KEY: "median_rps median_p50 median_p99 rps1/rps2/rps3"
summary() {
  local -a rps=() p50=() p99=() runs
  IFS=';' read -ra runs <<< "${RESULTS[$1]}"
  local r a b c
  for r in "${runs[@]}"; do read -r a b c <<< "$r"; rps+=("$a"); p50+=("$b"); p99+=("$c"); done
  echo "$(median "${rps[@]}") $(median "${p50[@]}") $(median "${p99[@]}") $(IFS=/; echo "${rps[*]}")"
}
echo
printf '%s\n' "${HEADER[@]}" "${IDLE[@]}"
echo
echo "Medians of $RUNS runs (each field separately); ratios Aspen/etcd (req/s: >1 = Aspen faster; p50: >1 = Aspen slower)."
echo
echo "| row | nodes | etcd req/s (p50 ms) | Aspen req/s (p50 ms) | Aspen/etcd req/s | Aspen/etcd p50 | p99 ms etcd / Aspen | req/s of the runs: etcd; Aspen |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
for NODES in 1 3; do
  for row in "${ROWS[@]}"; do
    label=${row%%|*}
    read -r e_rps e_p50 e_p99 e_runs <<< "$(summary "$NODES|$label|etcd")"
    read -r a_rps a_p50 a_p99 a_runs <<< "$(summary "$NODES|$label|aspen")"
    echo "| $label | $NODES | $e_rps ($(ms "$e_p50")) | $a_rps ($(ms "$a_p50")) | $(ratio "$a_rps" "$e_rps") | $(ratio "$a_p50" "$e_p50") | $(ms "$e_p99") / $(ms "$a_p99") | $e_runs; $a_runs |"
  done
done
echo
if "$ETCD" --version | grep -q '^etcd Version: 3\.5\.[0-4]$'; then
  echo "Note: a one-member etcd 3.5.0-3.5.4 answers a put before its WAL fdatasync has finished"
  echo "(etcd issue #14370; scripts/durability-vs-etcd.sh shows it); Aspen answers after its log"
  echo "sync. So the 1-node put rows compare a durable write with one that is not; at 3 nodes"
  echo "both wait for a follower's sync. ETCD_FROM=debian compares with a durable etcd 3.4.23."
fi
