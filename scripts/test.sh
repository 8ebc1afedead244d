#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's test command; CI runs it).
set -euo pipefail
. "$(dirname "$0")/setup.sh" test
# Two processes (pytest-xdist), each test file in one of them: with cold compile caches, as
# on a fresh machine, two processes took about 6 minutes on 2 cores where one took 9, when the
# suite was smaller (it now takes about 7 in two).
python -m pytest -q -n 2 --dist loadfile "$@"
