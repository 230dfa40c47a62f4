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

# The ComfyUI host (COMFYUI_ROOT wins when set).
"$venv/bin/python" -m omni_attribute.comfy_host provision >&2

ln -sfn "$venv" "$repo/.venv"
echo "$venv"
