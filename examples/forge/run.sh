#!/usr/bin/env bash
# Organisation B follows organisation A's git repository through federation, and clones it
# from its own cluster while A is offline. Git objects are blobs (tagged by type and SHA-1),
# the branch heads a blob beside them; A signs the list of those tags (its manifest), so
# every object and every ref a follower takes is the one A published. A third organisation,
# C, pulls through B as a mirror: a mirror that rewrites a ref is refused.
#
#   examples/forge/run.sh
#
# Needs git. Everything runs in a temporary directory on 127.0.0.1 and stops at the end.
# ASPEN_BIN=path/to/aspen skips the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v git > /dev/null || { echo "forge needs git (apt install git)" >&2; exit 1; }
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build -q -p aspen-node
fi
ASPEN=$(realpath "${ASPEN_BIN:-target/debug/aspen}")
DIR=$(mktemp -d)
declare -A PID
cleanup() {
  local status=$?
  kill "${PID[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "$status" != 0 ]; then
    for log in "$DIR"/*.log; do
      echo "--- $log (last 15 lines)" >&2
      tail -n 15 "$log" >&2
    done
  fi
  rm -rf "$DIR"
}
trap cleanup EXIT
export GIT_CONFIG_NOSYSTEM=1 HOME="$DIR"
git config --global user.name "Org A" && git config --global user.email a@example.org
git config --global init.defaultBranch main

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
# start ORG [ARGS...]: runs the organisation's node (a one-node cluster, no DHT: others
# reach it by its ticket; pulls every 0.5 s) and, once it has a cluster, waits until it
# answers.
start() {
  local org=$1
  shift
  "$ASPEN" node run --data-dir "$DIR/$org" --no-dht --fed-pull-interval-ms 500 "$@" \
    >> "$DIR/$org.log" 2>&1 &
  PID[$org]=$!
  wait_until 60 test -s "$DIR/$org/node.ticket"
  if [ -s "$DIR/$org/cluster.ticket" ]; then
    wait_until 60 at "$org" cluster identity
  fi
}
stop() {
  kill -9 "${PID[$1]}"
  wait "${PID[$1]}" 2>/dev/null || true
  unset "PID[$1]"
}
# at ORG COMMAND...: an aspen command as that organisation's admin, on its cluster.
at() {
  local org=$1
  shift
  ASPEN_IDENTITY="$DIR/$org.key" ASPEN_CLUSTER=$(cat "$DIR/$org/cluster.ticket") \
    "$ASPEN" "$@" < /dev/null
}
key_of() {
  at "$1" cluster identity -o json | sed -n 's/.*"cluster_key": *"\([0-9a-f]\{64\}\)".*/\1/p'
}
# tags ORG PREFIX: "tag<TAB>hash" of every tag under PREFIX.
tags() {
  at "$1" blob list --after "$2" --limit 1000 | awk -F'\t' -v p="$2" 'index($1, p) == 1 { print $1 "\t" $2 }'
}

# pulled ORG: its follow's last pull verified and committed everything (a pull records
# its manifest last).
pulled() {
  local status
  status=$(at "$1" fed status -o json)
  echo "$status" | grep -q '"last_error":null' && ! echo "$status" | grep -q '"last_success_ms":0'
}

# publish ORG REPO NAME: every object of REPO as a blob tagged git/NAME/objects/TYPE/SHA1,
# and the branch heads (`git show-ref --heads`) as git/NAME/heads.
publish() {
  local org=$1 repo=$2 name=$3
  git -C "$repo" cat-file --batch-all-objects --batch-check='%(objecttype) %(objectname)' |
    while read -r type sha; do
      git -C "$repo" cat-file "$type" "$sha" > "$DIR/object"
      at "$org" blob add "$DIR/object" --tag "git/$name/objects/$type/$sha" > /dev/null
    done
  git -C "$repo" show-ref --heads > "$DIR/heads"
  at "$org" blob add "$DIR/heads" --tag "git/$name/heads" > /dev/null
}

# clone ORG PREFIX DEST: rebuilds the repository from ORG's own cluster (the blobs under
# PREFIX). Git recomputes each object's SHA-1, which must be its name.
clone() {
  local org=$1 prefix=$2 dest=$3
  git init -q "$dest"
  tags "$org" "$prefix" > "$DIR/list"
  while IFS=$'\t' read -r tag hash; do
    case "$tag" in
      "${prefix}objects/"*)
        local rest=${tag#"${prefix}objects/"}
        local type=${rest%/*} sha=${rest#*/}
        at "$org" blob get "$hash" -o "$DIR/object" > /dev/null
        local got
        got=$(git -C "$dest" hash-object -w -t "$type" "$DIR/object")
        [ "$got" = "$sha" ] || { echo "object $sha hashes to $got" >&2; exit 1; }
        ;;
      "${prefix}heads") at "$org" blob get "$hash" -o "$DIR/heads.got" > /dev/null ;;
    esac
  done < "$DIR/list"
  while read -r sha ref; do
    git -C "$dest" update-ref "$ref" "$sha"
  done < "$DIR/heads.got"
  git -C "$dest" checkout -q main
  git -C "$dest" fsck --strict --no-dangling > /dev/null
}

echo "== three organisations, each its own cluster"
for org in a b c; do
  start "$org"
  ASPEN_IDENTITY="$DIR/$org.key" "$ASPEN" cluster init "$DIR/$org" > /dev/null
  wait_until 60 test -s "$DIR/$org/cluster.ticket"
done
A=$(key_of a)
B=$(key_of b)
C=$(key_of c)

echo "== A publishes its repository and exports it to B and C"
git init -q "$DIR/work"
for n in 1 2 3; do
  echo "release notes, version $n" > "$DIR/work/NOTES"
  mkdir -p "$DIR/work/src" && echo "fn version() -> u32 { $n }" > "$DIR/work/src/lib.rs"
  git -C "$DIR/work" add -A && git -C "$DIR/work" commit -q -m "version $n"
done
publish a "$DIR/work" demo
at a fed export blob git/demo/ --to "$B" --to "$C" > /dev/null
WANT=$(git -C "$DIR/work" rev-parse main)

echo "== B follows it and mirrors it to C"
at b fed follow "$(cat "$DIR/a/cluster.ticket")" blob git/demo/ > /dev/null
LOCAL="fed/${A:0:16}/git/demo/"
wait_until 60 pulled b
at b fed mirror "$A" blob git/demo/ --to "$C" > /dev/null

echo "== A goes offline; B clones from its own cluster"
stop a
clone b "$LOCAL" "$DIR/b-clone"
GOT=$(git -C "$DIR/b-clone" rev-parse main)
[ "$GOT" = "$WANT" ] || { echo "B's clone is at $GOT, A's main at $WANT" >&2; exit 1; }
echo "B's clone: $(git -C "$DIR/b-clone" log --oneline | wc -l) commits, main at ${GOT:0:12}, $(cat "$DIR/b-clone/NOTES")"

echo "== B, as a mirror, rewrites a ref: C refuses it"
stop b
start b --unsafe-test-fault fed-flip-byte
at c fed follow "$A" blob git/demo/ --via "$(cat "$DIR/b/cluster.ticket")" > /dev/null
refused() { at c fed status -o json | grep -q 'does not match the signed manifest'; }
wait_until 60 refused
echo "C: $(at c fed status | grep -m1 'refused')"
[ -z "$(tags c "$LOCAL")" ] || { echo "C took something from the lying mirror" >&2; exit 1; }

echo "== B is honest again: C clones A's repository through it, A still offline"
stop b
start b
wait_until 60 pulled c
clone c "$LOCAL" "$DIR/c-clone"
GOT=$(git -C "$DIR/c-clone" rev-parse main)
[ "$GOT" = "$WANT" ] || { echo "C's clone is at $GOT, A's main at $WANT" >&2; exit 1; }
echo "C's clone: main at ${GOT:0:12}, through mirror ${B:0:16}"
echo "forge: OK"
