#!/usr/bin/env bash
# Install what the browser tests (pytest -m browser) need: Debian's chromium, driven by the
# Playwright Python package through `executable_path` (Playwright never downloads a browser).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  echo "chromium present: $(command -v chromium || echo /usr/bin/chromium)"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends chromium
fi

python - <<'PY'
import importlib.util, sys
if importlib.util.find_spec("playwright") is None:
    sys.exit("the playwright Python package is missing: pip install 'rlhfkit[dev]'")
print("playwright (python) present")
PY
