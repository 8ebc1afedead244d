#!/usr/bin/env bash
# Set up a fresh machine and run the main job, perf/sweep.py (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[dev]"
python perf/sweep.py "$@"
