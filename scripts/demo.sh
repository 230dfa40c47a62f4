#!/usr/bin/env bash
# The main job (README): set up (cached), then the laboratory end to end — the tiny attribute world
# trained (or reused from runs/), benchmarked, and composed by a live ComfyUI running the laboratory's
# workflow lab/workflows/tiny_world_compose.api.json through the headless client.
#   bash scripts/demo.sh [--out DIR] [--work DIR] [--size ci|full] [--cases N]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup.sh" | tail -n 1)
cd "$repo"
exec "$venv/bin/python" -m lab.demo "$@"
