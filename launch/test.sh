#!/usr/bin/env bash
# Runs the test suite with the repo's virtual environment, creating it from the pinned
# requirements.txt first if it is missing. Extra arguments go to pytest (e.g. -m slow, tests/privacy).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO/launch/common.sh"

VENV=${DPWAVE_VENV:-$REPO/.venv}
ensure_venv "$REPO" "$VENV"
cd "$REPO"
run "$VENV/bin/python" -m pytest -q "$@"
