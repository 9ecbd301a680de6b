#!/usr/bin/env bash
# Does a put wait for its log's fdatasync? Aspen's and etcd's, one node each.
#
#   scripts/durability-vs-etcd.sh [DELAY_MS]      (default 300)
#
# Starts a single-member etcd (scripts/install-etcd.sh: PyPI's 3.5.1, or Debian's 3.4.23 with
# ETCD_FROM=debian) and `aspen up --nodes 1` (127.0.0.1, free ports, temporary data dirs),
# then, for each, attaches strace to the server and makes every fdatasync it calls return DELAY_MS late (`strace -e inject=fdatasync:
# delay_exit=...`), and times 5 puts, each a fresh CLI process (`etcdctl put`, `aspen kv put`)
# with a pause between them so each starts with the server idle, and 5 serializable gets (no
# sync: what the process and the round trip cost). Only the log's syncs are delayed (etcd's
# WAL file, Aspen's active log file; strace -P). A put that waits for its log to reach the
# disk takes at least DELAY_MS; one that answers before the sync does not.
#
# Why it matters: BENCHMARKS.md compares sequential put latency with etcd. A single etcd
# 3.5.1 member applies and answers a put while its WAL sync is still running (etcd issue
# #14370), so its one-node put latency does not include its fdatasync, and Aspen's does;
# Debian's etcd 3.4.23 waits for the sync (seen with this script), the like-for-like reference.
#
# Needs strace (ptrace allowed). ASPEN_BIN: the aspen binary (default: a release build).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
ROOT=$PWD
DELAY_MS=${1:-300}
command -v strace > /dev/null || { echo "needs strace (apt-get install strace)" >&2; exit 1; }

ETCD_BIN_DIR=$("$ROOT/scripts/install-etcd.sh")
ETCD=$ETCD_BIN_DIR/etcd
ETCDCTL=$ETCD_BIN_DIR/etcdctl
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build --release -q -p aspen-node
fi
ASPEN=${ASPEN_BIN:-$ROOT/target/release/aspen}

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
  if [ -d "$WORK/aspen" ]; then
    for p in $(cat "$WORK"/aspen/node-*/pid 2> /dev/null); do kill "$p" 2> /dev/null || true; done
  fi
  for p in "${PIDS[@]}"; do wait "$p" 2> /dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

# with_slow_sync PID LABEL FILE: attaches strace to PID (every thread) delaying each fdatasync
# of FILE (the log; not the state machine's database, whose syncs run on their own
# schedule), waits until it is attached, and leaves it running (stopped by stop_strace).
STRACE_PID=
with_slow_sync() {
  strace -f -p "$1" -P "$3" -e trace=fdatasync -e inject=fdatasync:delay_exit=$((DELAY_MS * 1000)) \
    -o "$WORK/$2.strace" 2> "$WORK/$2.attach" &
  STRACE_PID=$!
  PIDS+=("$STRACE_PID")
  for _ in $(seq 100); do
    grep -q attached "$WORK/$2.attach" 2> /dev/null && return
    sleep 0.1
  done
  cat "$WORK/$2.attach" >&2
  echo "strace did not attach to $1" >&2
  exit 1
}
stop_strace() { kill "$STRACE_PID" 2> /dev/null || true; wait "$STRACE_PID" 2> /dev/null || true; }

# measure LABEL PUT_CMD... : 5 gets then 5 puts, printed in ms.
measure() {
  local label=$1 i t gets="" puts=""
  for i in 1 2 3 4 5; do
    t=$(date +%s%N); "${GET[@]}" > /dev/null; gets+=" $(ms_since "$t")"
  done
  for i in 1 2 3 4 5; do
    sleep 0.5
    t=$(date +%s%N); "${PUT[@]}" "durability-$i" "v$i" > /dev/null; puts+=" $(ms_since "$t")"
  done
  echo "$label: get ms:$gets | put ms:$puts | fdatasync calls delayed: $(grep -c 'DELAYED' "$WORK/$label.strace")"
}

# --- etcd ------------------------------------------------------------------------------------
read -r CPORT PPORT < <(python3 -c 'import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')
"$ETCD" --name m0 --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$CPORT" --advertise-client-urls "http://127.0.0.1:$CPORT" \
  --listen-peer-urls "http://127.0.0.1:$PPORT" --initial-advertise-peer-urls "http://127.0.0.1:$PPORT" \
  --initial-cluster "m0=http://127.0.0.1:$PPORT" --log-level warn > "$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
PIDS+=("$ETCD_PID")
for _ in $(seq 100); do
  "$ETCDCTL" --endpoints "127.0.0.1:$CPORT" put warm up > /dev/null 2>&1 && break
  sleep 0.1
done
GET=("$ETCDCTL" --endpoints "127.0.0.1:$CPORT" get --consistency=s warm)
PUT=("$ETCDCTL" --endpoints "127.0.0.1:$CPORT" put)
echo "fdatasync delayed by $DELAY_MS ms; every command a fresh process"
echo "$("$ETCD" --version | head -1)"
WAL=$(ls "$WORK"/etcd/member/wal/*.wal | tail -1)
with_slow_sync "$ETCD_PID" etcd "$WAL"
measure etcd
stop_strace

# --- aspen -----------------------------------------------------------------------------------
"$ASPEN" up --nodes 1 --data-dir "$WORK/aspen" --detach -o json > /dev/null
export ASPEN_CLUSTER ASPEN_IDENTITY=$WORK/aspen/admin.key ASPEN_NO_DHT=true
ASPEN_CLUSTER=$(cat "$WORK/aspen/cluster.ticket")
"$ASPEN" kv put warm up > /dev/null
GET=("$ASPEN" kv get --serializable warm)
PUT=("$ASPEN" kv put)
echo "$("$ASPEN" --version)"
# The active log file: the one with data (log-0.wal on a fresh store).
LOG=$(ls -S "$WORK"/aspen/node-*/store/log-*.wal | head -1)
with_slow_sync "$(cat "$WORK"/aspen/node-*/pid)" aspen "$LOG"
measure aspen
stop_strace
