#!/usr/bin/env bash
# Idempotent set-up: a virtual environment with the pinned dependencies (cached between runs,
# keyed by the lock file), this package installed into it, and a ComfyUI 0.3.75 host.
#
#   bash scripts/setup.sh          # prints the venv path on its last line
#
# Cache location: $OMNI_ATTRIBUTE_CACHE (default ~/.cache/omni-attribute).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${OMNI_ATTRIBUTE_CACHE:-$HOME/.cache/omni-attribute}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

key=$( (cat "$repo/requirements-dev.lock"; "$python" --version) | sha256sum | cut -c1-12)
venv="$cache/venv-$key"

if [ ! -f "$venv/.complete" ]; then
  echo "[setup] creating $venv (first run: several minutes, torch is large)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$repo/requirements-dev.lock"
  touch "$venv/.complete"
else
  echo "[setup] using cached $venv" >&2
fi

# This checkout, editable, without touching the pinned dependencies.
log="$cache/editable-install.log"
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$repo" >"$log" 2>&1 \
  || { cat "$log" >&2; echo "[setup] installing this checkout failed (log above)" >&2; exit 1; }

# Browser tests: Debian's Chromium and playwright-core (driven with executablePath; no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the browser tests" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
  else
    echo "[setup] chromium is missing: install Debian's package (apt-get install chromium)" >&2
    exit 1
  fi
fi
command -v node >/dev/null 2>&1 || { echo "[setup] node is missing: install Node.js 18+ (apt-get install nodejs npm)" >&2; exit 1; }
if [ ! -f "$cache/node/node_modules/playwright-core/package.json" ]; then
  mkdir -p "$cache/node"
  npm install --silent --no-audit --no-fund --prefix "$cache/node" playwright-core@1.57.0 >&2
fi

# The ComfyUI host (COMFYUI_ROOT wins when set).
"$venv/bin/python" -m devtools.comfy_host provision >&2

ln -sfn "$venv" "$repo/.venv"
echo "$venv"
