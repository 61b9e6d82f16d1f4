#!/usr/bin/env bash
# `make gpu-check`: the whole GPU check in one command (scripts/gpu_check.py), bounded to 6 minutes.
# Works on a machine with nothing installed from this repository: the checkout is put on
# PYTHONPATH, and the machine's own python3 (its torch and transformers) is used unless PY says
# otherwise or the project's .venv exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 360 "$PY" scripts/gpu_check.py "$@"
