# shellcheck shell=bash
# Helpers sourced by the dpwave launch scripts: dry-run aware execution and the venv bootstrap.
# Under DRY_RUN=1 every command is printed as one shell-quoted line prefixed by "+ " and not run.

# run CMD [ARGS...]: print (dry run) or execute the command.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# setenv NAME VALUE: export a variable, and print the export under dry run.
setenv() {
  export "$1=$2"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '+ export %s=%q\n' "$1" "$2"
  fi
}

# requirements_stamp REPO [PIP_SPEC...]: what ensure_venv records after an install (a hash of the requirements).
requirements_stamp() {
  local repo=$1
  shift
  { cat "$repo/requirements.txt"; echo "$*"; } | sha256sum | cut -d' ' -f1
}

# ensure_venv REPO VENV [PIP_SPEC...]: create VENV with the pinned requirements if it is missing, and install them
# again when requirements.txt (or the extra specs) changed since the last install (a stamp file in VENV).
ensure_venv() {
  local repo=$1 venv=$2
  shift 2
  local stamp="$venv/.dpwave-requirements" want
  want=$(requirements_stamp "$repo" "$@")
  if [[ -x "$venv/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
    return 0
  fi
  if [[ ! -x "$venv/bin/python" ]]; then
    local python=${PYTHON:-python3.11}
    command -v "$python" >/dev/null 2>&1 || python=python3
    run "$python" -m venv "$venv"
  fi
  run "$venv/bin/pip" install -q -r "$repo/requirements.txt" "$@"
  run "$venv/bin/pip" install -q --no-deps -e "$repo"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    echo "$want" >"$stamp"
  fi
}

# has_main_flags ARGS...: true if both --config and --workdir are among the dpwave.main flags.
has_main_flags() {
  local config=0 workdir=0 arg
  for arg in "$@"; do
    case $arg in
      --config=?* | --config) config=1 ;;
      --workdir=?* | --workdir) workdir=1 ;;
    esac
  done
  [[ $config == 1 && $workdir == 1 ]]
}
