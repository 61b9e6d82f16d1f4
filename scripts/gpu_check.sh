#!/usr/bin/env bash
# `make gpu-check`: the whole GPU check in one command, bounded to 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
