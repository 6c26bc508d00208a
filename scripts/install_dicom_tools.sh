#!/usr/bin/env bash
# Installs Debian's DICOM tools the tests drive as real clients and validators: dcmtk (storescu, echoscu,
# dcmj2pnm, dsrdump), dicom3tools (dciodvfy) and GDCM's tools (gdcmconv: JPEG 2000, which dcmtk cannot
# decode). Needs root (CI runs as root); elsewhere the tests that need them skip with the reason.
set -eu
if command -v storescu >/dev/null 2>&1 && command -v dciodvfy >/dev/null 2>&1 \
  && command -v gdcmconv >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  echo "dcmtk/dicom3tools/libgdcm-tools not installed and not root: the DICOM tool tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends dcmtk dicom3tools libgdcm-tools >/dev/null
