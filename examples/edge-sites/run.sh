#!/usr/bin/env bash
# Two edge sites, each with its own cluster, edit one Automerge document; each keeps working
# while the other is away, and they converge when both are back.
#
#   examples/edge-sites/run.sh
#
# Everything runs in a temporary directory on 127.0.0.1 and stops at the end.
# ASPEN_BIN=path/to/aspen skips the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build -q -p aspen-node
fi
ASPEN=$(realpath "${ASPEN_BIN:-target/debug/aspen}")
DIR=$(mktemp -d)
declare -A PID
cleanup() {
  kill "${PID[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

# wait_until SECONDS COMMAND...: until COMMAND succeeds.
wait_until() {
  local limit=$1
  shift
  for _ in $(seq $((limit * 10))); do
    "$@" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "timed out: $*" >&2
  exit 1
}

# start SITE: runs the site's node (a one-node cluster; pulls from the other site every 0.5 s)
# and, once it has a cluster, waits until it answers.
start() {
  "$ASPEN" node run --data-dir "$DIR/$1" --no-dht --fed-pull-interval-ms 500 \
    >> "$DIR/$1.log" 2>&1 &
  PID[$1]=$!
  wait_until 60 test -s "$DIR/$1/node.ticket"
  if [ -s "$DIR/$1/cluster.ticket" ]; then
    wait_until 60 at "$1" cluster identity
  fi
}
# stop SITE: the site goes away (killed, as a power cut would).
stop() {
  kill -9 "${PID[$1]}"
  wait "${PID[$1]}" 2>/dev/null || true
  unset "PID[$1]"
}
# at SITE COMMAND...: an aspen command as that site's admin, against that site's cluster.
at() {
  local site=$1
  shift
  ASPEN_IDENTITY="$DIR/$site.key" ASPEN_CLUSTER=$(cat "$DIR/$site/cluster.ticket") \
    "$ASPEN" "$@"
}
key_of() {
  at "$1" cluster identity -o json | sed -n 's/.*"cluster_key": *"\([0-9a-f]\{64\}\)".*/\1/p'
}
# converged: both sites show the same heads and the same JSON.
converged() {
  [ "$(at north doc heads inventory)" = "$(at south doc heads inventory)" ] &&
    [ "$(at north doc get inventory)" = "$(at south doc get inventory)" ]
}

echo "== two sites, north and south, each its own cluster"
for site in north south; do
  start "$site"
  ASPEN_IDENTITY="$DIR/$site.key" "$ASPEN" cluster init "$DIR/$site" > /dev/null
  wait_until 60 test -s "$DIR/$site/cluster.ticket"
done
NORTH=$(key_of north)
SOUTH=$(key_of south)

echo "== each keeps an inventory document, shared with the other site"
at north doc create inventory --json '{"north": {}}' > /dev/null
at south doc create inventory --json '{"south": {}}' > /dev/null
at north fed export doc inventory --to "$SOUTH" > /dev/null
at south fed export doc inventory --to "$NORTH" > /dev/null
# Each follows the other's document into its own (by ticket: no DHT here).
at north fed follow "$(cat "$DIR/south/cluster.ticket")" doc inventory --into inventory > /dev/null
at south fed follow "$(cat "$DIR/north/cluster.ticket")" doc inventory --into inventory > /dev/null
at north doc set inventory north.tents 12 > /dev/null
at south doc set inventory south.water 40 > /dev/null
wait_until 60 converged
echo "both sites: $(at north doc get inventory)"

echo "== south goes offline; north keeps working"
stop south
at north doc set inventory north.tents 10 > /dev/null
at north doc set inventory north.radios 3 > /dev/null

echo "== north goes offline too; south comes back and keeps working alone"
stop north
start south
at south doc set inventory south.water 35 > /dev/null
at south doc set inventory south.blankets 80 > /dev/null

echo "== north comes back: the sites converge"
start north
wait_until 120 converged
FINAL=$(at north doc get inventory)
echo "both sites: $FINAL"
for want in '"tents": *10' '"radios": *3' '"water": *35' '"blankets": *80'; do
  echo "$FINAL" | grep -q "$want" || { echo "missing $want" >&2; exit 1; }
done
echo "edge-sites: OK"
