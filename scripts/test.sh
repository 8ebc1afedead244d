#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's test command; CI runs it).
set -euo pipefail
. "$(dirname "$0")/setup.sh" test
# Two processes (pytest-xdist): with cold compile caches, as on a fresh machine, two took about
# 6 minutes on 2 cores where one took 9, when the suite was smaller. Each test goes to whichever
# process is free (--dist load), not whole files, so that one slow file does not leave the
# other process idle. No test shares an expensive fixture with another, so nothing runs twice.
# (xdist's loadgroup would not help: with pytest 9.2 it silently stops grouping,
# pytest-dev/pytest-xdist#1386.)
# --durations: the slowest tests, so that a cold run (CI's) shows where its time went.
python -m pytest -q -n 2 --dist load --durations=15 "$@"
