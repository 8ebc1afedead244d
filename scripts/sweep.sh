#!/usr/bin/env bash
# Set up a fresh machine and run the main job, perf/sweep.py (the README's first command).
set -euo pipefail
. "$(dirname "$0")/setup.sh" dev
python perf/sweep.py "$@"
