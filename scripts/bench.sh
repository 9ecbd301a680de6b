#!/usr/bin/env bash
# Runs the benchmarks reported in BENCHMARKS.md against local clusters of 1 and 3 nodes.
#
#   scripts/bench.sh [TOTAL]        (TOTAL requests per throughput run, default 50000)
#
# Builds the release binary, starts each cluster with `aspen up --detach` in a temporary
# directory, runs `aspen bench` with -o json, prints one JSON line per run, and stops the
# cluster. Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-50000}
# ASPEN_BIN: another build to measure (e.g. an older commit's, for before/after numbers).
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build --release -q -p aspen-node
fi
ASPEN=${ASPEN_BIN:-target/release/aspen}

# The baseline for the blob runs: one raw iroh QUIC stream on loopback, no cluster.
echo "{\"nodes\":0,\"run\":\"raw quic 256 MiB\",\"result\":$($ASPEN bench quic --size-mib 256 --runs 3 -o json)}"

for NODES in 1 3; do
  DIR=$(mktemp -d)
  trap 'kill $(cat "$DIR"/node-*/pid 2>/dev/null) 2>/dev/null || true; rm -rf "$DIR"' EXIT
  $ASPEN up --nodes "$NODES" --data-dir "$DIR" --detach -o json > /dev/null
  export ASPEN_CLUSTER=$(cat "$DIR/cluster.ticket")
  export ASPEN_IDENTITY="$DIR/admin.key"
  run() { echo "{\"nodes\":$NODES,\"run\":\"$1\",\"result\":$($ASPEN bench "${@:2}" -o json)}"; }
  # Fill the key space so gets find values.
  $ASPEN bench put --clients 64 --conns 4 --total 10000 --key-space 10000 --val-size 256 -o json > /dev/null
  run "sequential put"      put --clients 1   --conns 1 --total 2000     --key-space 10000 --val-size 256
  run "put 64 clients"      put --clients 64  --conns 4 --total "$TOTAL" --key-space 10000 --val-size 256
  run "put 256 clients"     put --clients 256 --conns 8 --total "$TOTAL" --key-space 10000 --val-size 256
  run "lin get 64 clients"  get --clients 64  --conns 4 --total "$TOTAL" --key-space 10000
  run "ser get 64 clients"  get --clients 64  --conns 4 --total "$TOTAL" --key-space 10000 --serializable
  run "doc sequential"      doc --clients 1   --conns 1 --total 1000 --val-size 32
  run "doc 16 clients"      doc --clients 16  --conns 4 --total 3000 --val-size 32
  run "blob 256 MiB"        blob --size-mib 256 --runs 3
  kill $(cat "$DIR"/node-*/pid) 2>/dev/null || true
  rm -rf "$DIR"
  trap - EXIT
done
