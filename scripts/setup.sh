#!/usr/bin/env bash
# Sourced by test.sh and sweep.sh: make .venv and install torch and this package with the extras
# given as $1 ("test" or "dev"). torch==2.13.0 is pinned here only to get the CPU build on
# machines without a GPU; the package itself asks for torch>=2.6.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# No pip cache: torch and triton are large, and CI's disk can be nearly full.
export PIP_NO_CACHE_DIR=1
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[$1]"
