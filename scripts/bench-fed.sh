#!/usr/bin/env bash
# Federation benchmarks reported in BENCHMARKS.md: local clusters of NODES nodes each
# (default 1): a follower following documents and blobs of an origin, and a reader pulling a
# blob of the origin through a mirror (a fourth cluster) while knowing no address of the
# origin.
#
#   scripts/bench-fed.sh [NODES] [CHANGES] [PULL_INTERVAL_MS]
#
# Builds the release binary, starts the nodes with `aspen node run` in a temporary directory
# (DHT off: the follower dials the origin by its ticket), forms both clusters, runs
# `aspen bench fed -o json` and `aspen bench fed --mirror ... -o json` three times each and
# stops everything. Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${1:-1}
CHANGES=${2:-100000}
# A long pull interval by default: edits then arrive by announcement alone.
INTERVAL=${3:-600000}
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build --release -q -p aspen-node
fi
ASPEN=$(realpath "${ASPEN_BIN:-target/release/aspen}")
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP_LOGS:-}" ] && cp "$DIR"/*.log "$KEEP_LOGS"/; rm -rf "$DIR"' EXIT

# form NAME: starts NODES nodes under $DIR/NAME and makes them one cluster.
form() {
  local name=$1
  for i in $(seq 1 "$NODES"); do
    "$ASPEN" node run --no-dht --data-dir "$DIR/$name/n$i" --fed-pull-interval-ms "$INTERVAL" \
      > "$DIR/$name-n$i.log" 2>&1 &
  done
  for i in $(seq 1 "$NODES"); do
    until [ -s "$DIR/$name/n$i/node.ticket" ]; do sleep 0.1; done
  done
  ASPEN_IDENTITY="$DIR/$name.key" "$ASPEN" cluster init "$DIR/$name/n1" > /dev/null
  until [ -s "$DIR/$name/n1/cluster.ticket" ]; do sleep 0.1; done
  for i in $(seq 2 "$NODES"); do
    ASPEN_IDENTITY="$DIR/$name.key" "$ASPEN" cluster add "$DIR/$name/n$i" \
      --cluster "$(cat "$DIR/$name/n1/cluster.ticket")" > /dev/null
  done
}
form origin
form follower
form mirror
form reader

for run in 1 2 3; do
  echo "{\"nodes\":$NODES,\"run\":$run,\"result\":$(ASPEN_IDENTITY="$DIR/follower.key" "$ASPEN" bench fed \
    --cluster "$(cat "$DIR/follower/n1/cluster.ticket")" \
    --origin "$(cat "$DIR/origin/n1/cluster.ticket")" --origin-identity "$DIR/origin.key" \
    --changes "$CHANGES" --edits 20 -o json)}"
  echo "{\"nodes\":$NODES,\"run\":$run,\"result\":$(ASPEN_IDENTITY="$DIR/reader.key" "$ASPEN" bench fed \
    --cluster "$(cat "$DIR/reader/n1/cluster.ticket")" \
    --origin "$(cat "$DIR/origin/n1/cluster.ticket")" --origin-identity "$DIR/origin.key" \
    --mirror "$(cat "$DIR/mirror/n1/cluster.ticket")" --mirror-identity "$DIR/mirror.key" \
    -o json)}"
done
