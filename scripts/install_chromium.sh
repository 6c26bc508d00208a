#!/usr/bin/env bash
# Installs Debian's chromium for the browser test. Needs root (CI runs as root); elsewhere the test skips.
set -eu
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  echo "chromium not installed and not root: the browser test will skip (apt-get install chromium to run it)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq chromium >/dev/null
