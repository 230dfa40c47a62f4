#!/usr/bin/env bash
# The main job (README): set up (cached), start ComfyUI with the plugin, run the shipped
# encode workflow headlessly on the embedded tiny default model, print the result.
#   bash scripts/demo.sh [--out DIR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup.sh" | tail -n 1)
cd "$repo"
exec "$venv/bin/python" -m lab.demo "$@"
