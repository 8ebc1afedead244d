#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's test command; CI runs it).
set -euo pipefail
. "$(dirname "$0")/setup.sh" test
python -m pytest -q "$@"
