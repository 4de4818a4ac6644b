#!/usr/bin/env bash
# Runs the test suite with the repo's virtual environment, creating it from the pinned
# requirements.txt first if it is missing. Extra arguments go to pytest (e.g. -m slow, tests/privacy).
# Two worker processes (pytest-xdist; DPWAVE_TEST_WORKERS=N for another count, 0 for one process), each test
# file on one worker: most tests are bound by single-threaded XLA compilation, so two cores run two files.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO/launch/common.sh"

VENV=${DPWAVE_VENV:-$REPO/.venv}
ensure_venv "$REPO" "$VENV"
cd "$REPO"
run "$VENV/bin/python" -m pytest -q -n "${DPWAVE_TEST_WORKERS:-2}" --dist loadfile "$@"
