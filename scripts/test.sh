#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's test command).
# torch==2.13.0 is pinned here only to get the CPU build on machines without a GPU; the
# package itself asks for torch>=2.6.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test]"
python -m pytest -q "$@"
