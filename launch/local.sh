#!/usr/bin/env bash
# Runs `python -m dpwave.main` on this machine with the repo's virtual environment.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local.sh [--dry-run] --config=CONFIG[:variant] --workdir=DIR [dpwave.main flags...]

Runs `python -m dpwave.main` with the repository's virtual environment, creating it from the
pinned requirements.txt first if it is missing. Rerunning with the same --workdir resumes.

Options:
  --dry-run    print the commands that would run (one per line, prefixed "+ ") and exit 0
  -h, --help   show this help

Environment:
  DRY_RUN=1    same as --dry-run
  DPWAVE_VENV  virtual environment to use or create (default: <repo>/.venv)
  PYTHON       interpreter that creates a missing venv (default: python3.11, else python3)

Example:
  launch/local.sh --config=experiments/configs/mnist.py:demo --workdir=workdir/demo
USAGE
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO/launch/common.sh"

ARGS=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
if ! has_main_flags "${ARGS[@]}"; then
  echo "local.sh: --config and --workdir are required." >&2
  usage >&2
  exit 2
fi

VENV=${DPWAVE_VENV:-$REPO/.venv}
ensure_venv "$REPO" "$VENV"
run env "PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m dpwave.main "${ARGS[@]}"
