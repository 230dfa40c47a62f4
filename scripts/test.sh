#!/usr/bin/env bash
# The test command (README): set up (cached) and run every test, host tests included.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup.sh" | tail -n 1)
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
