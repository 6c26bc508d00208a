#!/usr/bin/env bash
# Installs Debian's chromium (browser test) and poppler-utils (pdftoppm/pdftotext: the PDF test renders pages).
# Needs root (CI runs as root); elsewhere those tests skip.
set -eu
want=""
[ -x /usr/bin/chromium ] || want="$want chromium"
command -v pdftoppm >/dev/null 2>&1 || want="$want poppler-utils"
if [ -z "$want" ]; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  echo "not installed and not root:$want; the tests that need them will skip (apt-get install$want)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# shellcheck disable=SC2086
apt-get install -y -qq $want >/dev/null
