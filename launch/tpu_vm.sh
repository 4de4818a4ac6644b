#!/usr/bin/env bash
# Copies this repository to every worker of a Cloud TPU VM, installs it, and runs dpwave on all.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh --name=TPU_NAME --zone=ZONE [--project=PROJECT] [--secret-seed-file=FILE] \
         [--dry-run] --config=CONFIG[:variant] --workdir=gs://BUCKET/RUN [dpwave.main flags...]

1. packs the working tree (without .venv, .git, workdirs) into a tarball,
2. `gcloud compute tpus tpu-vm scp` copies it to every worker (--worker=all),
3. `gcloud compute tpus tpu-vm ssh --worker=all` unpacks it into ~/dpwave, creates ~/dpwave/.venv
   with the pinned requirements plus jax[tpu] if missing, and runs `python -m dpwave.main` with
   DPWAVE_DISTRIBUTED=auto on every worker (jax.distributed detects the pod).
On a multi-host pod, --workdir must be shared by all workers (a gs:// path), and the DP stage needs
the same secret seed on every worker: --secret-seed-file copies an owner-only local file holding it
(write one with: (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE)) into
~/.dpwave_secret/dp_seed (mode 0600, in a 0700 directory) on every worker and passes
--config.dp.secret.seed_file to dpwave. The seed never appears on a command line.

Options:
  --name=NAME       TPU VM name              --zone=ZONE   its zone
  --project=ID      GCP project (default: gcloud's configured one)
  --secret-seed-file=FILE  owner-only file (chmod 600) holding the DP secret seed, copied to every worker
  --dry-run         print the commands that would run (one per line, prefixed "+ ") and exit 0
  -h, --help        show this help
Environment: DRY_RUN=1 (same as --dry-run), TMPDIR (where the tarball is built).
USAGE
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO/launch/common.sh"

NAME="" ZONE="" PROJECT="" SEED_FILE=""
ARGS=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --name=*) NAME=${arg#*=} ;;
    --zone=*) ZONE=${arg#*=} ;;
    --project=*) PROJECT=${arg#*=} ;;
    --secret-seed-file=*) SEED_FILE=${arg#*=} ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [[ -z $NAME || -z $ZONE ]] || ! has_main_flags "${ARGS[@]}"; then
  echo "tpu_vm.sh: --name, --zone, --config and --workdir are required." >&2
  usage >&2
  exit 2
fi
if [[ -n $SEED_FILE ]] && { [[ ! -f $SEED_FILE || ! -r $SEED_FILE ]] || [[ -n $(find "$SEED_FILE" -maxdepth 0 -perm /077) ]]; }; then
  echo "tpu_vm.sh: --secret-seed-file=$SEED_FILE must be a readable owner-only file; chmod 600 it." >&2
  exit 2
fi
if [[ "${DRY_RUN:-0}" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
  echo "tpu_vm.sh: gcloud not found; install the Google Cloud CLI." >&2
  exit 2
fi

GCLOUD_FLAGS=(--zone="$ZONE" --worker=all)
if [[ -n $PROJECT ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi
TARBALL="${TMPDIR:-/tmp}/dpwave-src.tgz"
printf -v MAIN_ARGS ' %q' "${ARGS[@]}"
REMOTE="set -e; mkdir -p ~/dpwave; tar -xzf ~/dpwave-src.tgz -C ~/dpwave; cd ~/dpwave;"
REMOTE+=" if [ ! -x .venv/bin/python ]; then python3 -m venv .venv;"
REMOTE+=" .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2';"
REMOTE+=" .venv/bin/pip install -q --no-deps -e .; fi;"
if [[ -n $SEED_FILE ]]; then
  REMOTE+=" chmod 600 ~/.dpwave_secret/dp_seed;"
  MAIN_ARGS+=" --config.dp.secret.seed_file=\$HOME/.dpwave_secret/dp_seed"
fi
REMOTE+=" DPWAVE_DISTRIBUTED=auto .venv/bin/python -m dpwave.main${MAIN_ARGS}"

run tar -czf "$TARBALL" -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./workdir \
  --exclude=./workdirs --exclude=__pycache__ .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:dpwave-src.tgz" "${GCLOUD_FLAGS[@]}"
if [[ -n $SEED_FILE ]]; then
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --command="install -d -m 700 ~/.dpwave_secret"
  run gcloud compute tpus tpu-vm scp "$SEED_FILE" "$NAME:.dpwave_secret/dp_seed" "${GCLOUD_FLAGS[@]}"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --command="$REMOTE"
