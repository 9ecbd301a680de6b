#!/usr/bin/env bash
# Find a cluster by its key alone, over a local Mainline DHT, and read from it.
#
#   examples/discover/run.sh
#
# Starts a local DHT (`aspen dht-testnet`, 8 nodes on 127.0.0.1) and a one-node cluster that
# publishes its signed record there, writes a key, then, as a client that knows nothing but
# the cluster's key, finds the cluster (`aspen discover`) and reads the key back. Everything
# runs in a temporary directory and stops at the end; nothing leaves 127.0.0.1.
# ASPEN_BIN=path/to/aspen skips the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build -q -p aspen-node
fi
ASPEN=$(realpath "${ASPEN_BIN:-target/debug/aspen}")
DIR=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

# wait_for FILE: until FILE exists and is not empty (at most 60 s).
wait_for() {
  for _ in $(seq 600); do
    [ -s "$1" ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  exit 1
}

echo "== a local Mainline DHT"
"$ASPEN" dht-testnet --nodes 8 --bootstrap-file "$DIR/bootstrap" > /dev/null 2> "$DIR/dht.log" &
wait_for "$DIR/bootstrap"
BOOTSTRAP=$(cat "$DIR/bootstrap")
DHT=(--dht-bootstrap "$BOOTSTRAP" --dht-timeout-ms 500)

echo "== the site: a one-node cluster that publishes its record to that DHT"
"$ASPEN" node run --data-dir "$DIR/site" "${DHT[@]}" > "$DIR/site.log" 2>&1 &
wait_for "$DIR/site/node.ticket"
export ASPEN_IDENTITY="$DIR/admin.key"
"$ASPEN" cluster init "$DIR/site" > /dev/null
wait_for "$DIR/site/cluster.ticket"
TICKET=$(cat "$DIR/site/cluster.ticket")
KEY=$("$ASPEN" cluster identity -o json --cluster "$TICKET" |
  sed -n 's/.*"cluster_key": *"\([0-9a-f]\{64\}\)".*/\1/p')
"$ASPEN" kv put greeting "hello from the site" --cluster "$TICKET" > /dev/null
echo "cluster key: $KEY"

echo "== elsewhere: a client that knows only the key"
# A fresh record cache: nothing known but the key; the record comes from the DHT.
FOUND=""
for _ in $(seq 60); do
  if FOUND=$("$ASPEN" discover "$KEY" "${DHT[@]}" --record-cache "$DIR/cache" 2> /dev/null); then
    break
  fi
  FOUND=""
  sleep 1
done
if [ -z "$FOUND" ]; then
  echo "the cluster's record never appeared on the DHT" >&2
  exit 1
fi
echo "$FOUND"
VALUE=$("$ASPEN" kv get greeting --cluster "$KEY" "${DHT[@]}" --record-cache "$DIR/cache")
echo "read by key alone: greeting = $VALUE"
[ "$VALUE" = "hello from the site" ]
echo "discover: OK"
