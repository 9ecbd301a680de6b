#!/usr/bin/env bash
# Installs Debian's Chromium (headless browser tests: examples/shared-list) unless
# /usr/bin/chromium is there. Needs root (or passwordless sudo) and Debian's package mirror.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium > /dev/null
/usr/bin/chromium --version
