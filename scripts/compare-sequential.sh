#!/usr/bin/env bash
# Before/after latency of two builds for a lone client, interleaved so machine drift hits
# both alike:
#
#   scripts/compare-sequential.sh OLD_BIN NEW_BIN [NODES] [CLUSTERS]   (defaults: 1 node, 4 clusters)
#
# For each of CLUSTERS rounds, starts a fresh NODES-node cluster with each binary in turn,
# warms it with 10,000 puts at 64 clients, then runs 3 x 3,000 sequential puts (1 client) and
# one run of 20,000 puts at 64 clients (256-byte values, 10,000 keys). Prints one JSON line
# per run (`aspen bench -o json`: p50_ms, p99_ms, requests_per_sec, ...). Used for "The
# apply answers before its commit" (BENCHMARKS.md).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OLD_BIN NEW_BIN [NODES] [CLUSTERS]" >&2
  exit 2
fi
OLD=$1
NEW=$2
NODES=${3:-1}
CLUSTERS=${4:-4}
DIR=""
cleanup() { if [ -n "$DIR" ]; then kill $(cat "$DIR"/node-*/pid 2>/dev/null) 2>/dev/null || true; rm -rf "$DIR"; fi; }
trap cleanup EXIT
for cluster in $(seq 1 "$CLUSTERS"); do
  for which in old new; do
    if [ "$which" = old ]; then BIN=$OLD; else BIN=$NEW; fi
    DIR=$(mktemp -d)
    $BIN up --nodes "$NODES" --data-dir "$DIR" --detach -o json > /dev/null
    export ASPEN_CLUSTER=$(cat "$DIR/cluster.ticket") ASPEN_IDENTITY="$DIR/admin.key"
    $BIN bench put --clients 64 --conns 4 --total 10000 --key-space 10000 --val-size 256 -o json > /dev/null
    for run in 1 2 3; do
      echo "{\"cluster\":$cluster,\"build\":\"$which\",\"nodes\":$NODES,\"run\":\"sequential $run\",\"result\":$($BIN bench put --clients 1 --conns 1 --total 3000 --key-space 10000 --val-size 256 -o json)}"
    done
    echo "{\"cluster\":$cluster,\"build\":\"$which\",\"nodes\":$NODES,\"run\":\"64 clients\",\"result\":$($BIN bench put --clients 64 --conns 4 --total 20000 --key-space 10000 --val-size 256 -o json)}"
    cleanup; DIR=""
  done
done
