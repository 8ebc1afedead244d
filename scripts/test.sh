#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's test command; CI runs it).
set -euo pipefail
. "$(dirname "$0")/setup.sh" test
# Two processes (pytest-xdist): with cold compile caches, as on a fresh machine, two took about
# 6 minutes on 2 cores where one took 9, when the suite was smaller. Tests go to whichever
# process is free (loadgroup), not whole files: test_compile.py alone holds 4 minutes of
# Inductor builds. The tests sharing the sweep's module-scoped run stay in one process
# (tests/test_perf.py's xdist group).
python -m pytest -q -n 2 --dist loadgroup "$@"
