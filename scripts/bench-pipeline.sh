#!/usr/bin/env bash
# Where a loaded node's write time goes: one put run against a fresh local cluster, with the
# node's own figures (from its /metrics, before and after the run) and CPU per put.
#
#   scripts/bench-pipeline.sh [NODES] [TOTAL] [CLIENTS]     (defaults: 1 40000 64)
#
# Prints the run's puts/s, the leader's CPU time and the load generator's per put, Raft
# entries and commands per entry, and how busy the log flush and the state machine's apply
# were (their summed time over the run's wall time) with the apply-time histogram. The
# stage near 100% is the one that bounds throughput. ASPEN_BIN: another build to measure.
# Needs curl, jq, python3 and GNU time (Debian: apt-get install curl jq python3 time).
# Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in curl jq python3; do
  command -v "$tool" > /dev/null || { echo "bench-pipeline.sh needs $tool" >&2; exit 1; }
done
if ! /usr/bin/env time -f '' true 2> /dev/null; then
  echo "bench-pipeline.sh needs GNU time (the 'time' package), for the load generator's CPU" >&2
  exit 1
fi
NODES=${1:-1}
TOTAL=${2:-40000}
CLIENTS=${3:-64}
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build --release -q -p aspen-node
fi
ASPEN=${ASPEN_BIN:-target/release/aspen}

DIR=$(mktemp -d)
trap 'kill $(cat "$DIR"/node-*/pid 2>/dev/null) 2>/dev/null || true; rm -rf "$DIR"' EXIT
$ASPEN up --nodes "$NODES" --data-dir "$DIR" --detach --metrics -o json > "$DIR/up.json"
export ASPEN_CLUSTER=$(cat "$DIR/cluster.ticket")
export ASPEN_IDENTITY="$DIR/admin.key"
export ASPEN_NO_DHT=true

# The leader: the member whose metrics say so.
LEADER_URL=""
LEADER_PID=""
for i in $(seq 1 "$NODES"); do
  url=$(jq -r ".metrics[$((i - 1))]" "$DIR/up.json")
  if curl -sf "$url" | grep -q '^aspen_raft_is_leader 1'; then
    LEADER_URL=$url
    LEADER_PID=$(cat "$DIR/node-$i/pid")
  fi
done
if [ -z "$LEADER_URL" ]; then
  echo "no leader found among the $NODES members' metrics" >&2
  exit 1
fi

# Fill the key space, then measure.
$ASPEN bench put --clients 64 --conns 4 --total 10000 --key-space 10000 --val-size 256 -o json > /dev/null
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
curl -sf "$LEADER_URL" > "$DIR/before"
node_before=$(cpu_ticks "$LEADER_PID")
start=$(date +%s.%N)
/usr/bin/env time -f '%U %S' -o "$DIR/client_cpu" \
  $ASPEN bench put --clients "$CLIENTS" --conns 4 --total "$TOTAL" --key-space 10000 --val-size 256 -o json > "$DIR/run.json"
end=$(date +%s.%N)
node_after=$(cpu_ticks "$LEADER_PID")
curl -sf "$LEADER_URL" > "$DIR/after"

python3 - "$DIR" "$start" "$end" "$node_before" "$node_after" "$TOTAL" "$(getconf CLK_TCK)" <<'PY'
import json, sys
d, start, end, nb, na, total, tck = sys.argv[1:]
wall, total = float(end) - float(start), int(total)

def load(path):
    out = {}
    for line in open(path):
        if line.startswith('#') or not line.strip():
            continue
        key, value = line.rsplit(' ', 1)
        out[key] = float(value)
    return out

a, b = load(f"{d}/before"), load(f"{d}/after")
delta = lambda k: b.get(k, 0.0) - a.get(k, 0.0)
run = json.load(open(f"{d}/run.json"))
user, sys_ = map(float, open(f"{d}/client_cpu").read().split())
print(f"puts/s {run['requests_per_sec']:.0f}  p50 {run['p50_ms']:.2f} ms  p99 {run['p99_ms']:.2f} ms  errors {run['errors']}")
print(f"CPU per put: leader {1e6 * (float(na) - float(nb)) / float(tck) / total:.1f} us, "
      f"load generator {1e6 * (user + sys_) / total:.1f} us")
entries = delta('aspen_state_machine_applied_entries_total')
commands = delta('aspen_state_machine_applied_commands_total')
print(f"wall {wall:.2f} s, Raft entries {entries:.0f}, commands per entry {commands / max(entries, 1):.1f}")
for name, metric in [("log flush", "aspen_raft_log_flush_seconds"),
                     ("apply", "aspen_state_machine_apply_seconds")]:
    n, s = delta(metric + "_count"), delta(metric + "_sum")
    print(f"{name}: {n:.0f} times, mean {1e3 * s / max(n, 1):.3f} ms, busy {s / wall:.0%} of the run")
print("apply time histogram (upper bound s: count):")
previous = 0.0
for key in [k for k in b if k.startswith("aspen_state_machine_apply_seconds_bucket")]:
    count = delta(key)
    bound = key.split("le=")[1].strip('"}')
    if count - previous:
        print(f"  {bound}: {count - previous:.0f}")
    previous = count
PY
