#!/usr/bin/env bash
# Before/after throughput of two builds, interleaved so machine drift hits both alike:
#
#   scripts/compare.sh OLD_BIN NEW_BIN [ROUNDS] [TOTAL]   (defaults: 3 rounds, 50000 requests)
#
# Each round starts a fresh 1-node cluster with each binary in turn and runs `aspen bench`
# put and linearizable get (64 clients, 256-byte values, 10,000 keys). Prints one JSON line
# per run. Used for the cost of access control (BENCHMARKS.md).
set -euo pipefail
OLD=$1
NEW=$2
ROUNDS=${3:-3}
TOTAL=${4:-50000}
DIR=""
cleanup() { if [ -n "$DIR" ]; then kill $(cat "$DIR"/node-*/pid 2>/dev/null) 2>/dev/null || true; rm -rf "$DIR"; fi; }
trap cleanup EXIT
for round in $(seq 1 "$ROUNDS"); do
  for which in old new; do
    if [ "$which" = old ]; then BIN=$OLD; else BIN=$NEW; fi
    DIR=$(mktemp -d)
    $BIN up --nodes 1 --data-dir "$DIR" --detach -o json > /dev/null
    export ASPEN_CLUSTER=$(cat "$DIR/cluster.ticket") ASPEN_IDENTITY="$DIR/admin.key"
    $BIN bench put --clients 64 --conns 4 --total 10000 --key-space 10000 --val-size 256 -o json > /dev/null
    for run in put get; do
      extra=""
      if [ "$run" = put ]; then extra="--val-size 256"; fi
      echo "{\"round\":$round,\"build\":\"$which\",\"run\":\"$run 64 clients\",\"result\":$($BIN bench $run --clients 64 --conns 4 --total "$TOTAL" --key-space 10000 $extra -o json)}"
    done
    cleanup; DIR=""
  done
done
