#!/usr/bin/env bash
# The client path with a member down, measured with real processes on 127.0.0.1:
#
#   scripts/failover.sh [TRIALS]     (default 10)
#
# 1. Leader kill: a 3-node cluster (`aspen up --detach`), kill -9 of the leader, then one
#    CLI `kv put` after another until one succeeds. Prints the time from the kill to the
#    first successful write, per trial, and the median.
# 2. One member down: the time of 20 sequential CLI `kv get`s with all members up, then with
#    each member in turn stopped (SIGSTOP: its port stays bound, it just never answers),
#    whichever member is first in the ticket.
# Prints JSON lines. Needs the release binary (built unless ASPEN_BIN is set).
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${1:-10}
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build --release -q -p aspen-node
fi
ASPEN=${ASPEN_BIN:-target/release/aspen}
now_ms() { date +%s%3N; }
DIR=""
cleanup() {
  if [ -n "$DIR" ]; then
    for p in "$DIR"/node-*/pid; do kill -CONT "$(cat "$p")" 2>/dev/null || true; kill -9 "$(cat "$p")" 2>/dev/null || true; done
    rm -rf "$DIR"
  fi
}
trap cleanup EXIT
start_cluster() {
  DIR=$(mktemp -d)
  $ASPEN up --nodes 3 --data-dir "$DIR" --detach -o json > /dev/null
  export ASPEN_CLUSTER=$(cat "$DIR/cluster.ticket")
  export ASPEN_IDENTITY="$DIR/admin.key"
  export ASPEN_NO_DHT=true
}
# The data directory of the member with node id $1.
dir_of() {
  for d in "$DIR"/node-*; do
    local t; t=$(cat "$d/node.ticket")
    if $ASPEN cluster status -o json | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if any(m['node_id']=='$1' and m['ticket']=='$t' for m in s['members']) else 1)"; then
      echo "$d"; return
    fi
  done
}

times=()
for trial in $(seq 1 "$TRIALS"); do
  start_cluster
  $ASPEN kv put warm up > /dev/null
  leader=$($ASPEN cluster status -o json | python3 -c "import json,sys; print(json.load(sys.stdin)['leader'])")
  victim=$(dir_of "$leader")
  killed=$(now_ms)
  kill -9 "$(cat "$victim/pid")"
  until $ASPEN kv put after-kill "$trial" --timeout 30 > /dev/null 2>&1; do :; done
  took=$(( $(now_ms) - killed ))
  times+=("$took")
  echo "{\"run\":\"write after leader kill -9\",\"trial\":$trial,\"ms\":$took}"
  cleanup; DIR=""
done
median=$(printf '%s\n' "${times[@]}" | sort -n | python3 -c "import sys; v=[int(x) for x in sys.stdin]; print(v[len(v)//2] if len(v)%2 else (v[len(v)//2-1]+v[len(v)//2])//2)")
echo "{\"run\":\"write after leader kill -9\",\"trials\":$TRIALS,\"median_ms\":$median}"

start_cluster
$ASPEN kv put k v > /dev/null
gets() {
  local t0; t0=$(now_ms)
  for _ in $(seq 1 20); do $ASPEN kv get k > /dev/null; done
  echo $(( ($(now_ms) - t0) / 20 ))
}
echo "{\"run\":\"kv get, all up\",\"ms_per_command\":$(gets)}"
for d in "$DIR"/node-*; do
  pid=$(cat "$d/pid")
  kill -STOP "$pid"
  # The first command after a stop pays for an election if the stopped member led; the
  # timed ones show the steady state with the member down.
  until $ASPEN kv get k > /dev/null 2>&1; do :; done
  echo "{\"run\":\"kv get, $(basename "$d") stopped\",\"ms_per_command\":$(gets)}"
  kill -CONT "$pid"
  # Let it catch up before the next one stops.
  until $ASPEN kv put k v > /dev/null 2>&1; do :; done
done
