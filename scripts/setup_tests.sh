#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine with Python >= 3.11:
# the CPU build of torch (first, so nothing pulls a CUDA build), rlhfkit with its test
# extras, Debian's Chromium for the browser tests (Playwright drives it; no browser
# download) and the Debian packages the bundled corpus is rebuilt from (its byte-identical
# rebuild is a test). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev,bench]"
APT_PACKAGES=(chromium wordnet-base fortunes fortunes-min)
if ! command -v chromium >/dev/null 2>&1 || [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/doc/fortunes/copyright ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q "${APT_PACKAGES[@]}"
fi
