#!/usr/bin/env bash
# Installs everything writeback needs on a fresh Debian machine (run as root):
# Samba AD DC and LDAP tools for the throwaway test/demo DC, then a virtualenv
# in .venv with the Python dependencies. Safe to run again: it skips what is there.
#
# Quiet by default, so the demo's first screen is the demo: what the installers
# print goes to build/bootstrap.log, and only a line naming each step that has
# something to install reaches the terminal (the steps write those notices to
# file descriptor 3). When a step fails, the log's last lines are shown and its
# path named. WRITEBACK_BOOTSTRAP_VERBOSE=1 shows everything as it happens.
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p build
LOG=$PWD/build/bootstrap.log
: >"$LOG"
exec 3>&2

# step DESCRIPTION COMMAND...: run COMMAND with its output in the log.
step() {
  local what=$1
  shift
  if [ -n "${WRITEBACK_BOOTSTRAP_VERBOSE:-}" ]; then
    "$@"
    return
  fi
  echo "== $what" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    {
      echo "bootstrap: $what failed; the installers' output is in $LOG. Its last lines:"
      tail -n 30 "$LOG" | sed 's/^/  /'
    } >&3
    exit 1
  fi
}

step "system packages (Samba AD DC, LDAP tools)" bash scripts/install-system-deps.sh
step "the relay interop test's Node.js client" bash scripts/install-interop.sh

PY=${PYTHON:-python3}
make_venv() {
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip
  fi
  "$PY" -m venv .venv
}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: making .venv (log: $LOG)" >&3
  step "making .venv" make_venv
fi

# requirements-dev.txt is compiled from pyproject.toml by scripts/lock, every
# distribution pinned with its hashes; the product and the sandbox are then
# installed editable over it, without dependencies of their own (setuptools is
# in the lock: no build environment is fetched).
install_python() {
  .venv/bin/python -m pip install --upgrade pip
  .venv/bin/python -m pip install --require-hashes -r requirements-dev.txt
  .venv/bin/python -m pip install --no-deps --no-build-isolation -e . -e sandbox
}
stamp=.venv/.requirements.sha
want=$(cat requirements-dev.txt pyproject.toml sandbox/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing the Python packages into .venv (log: $LOG)" >&3
  step "installing the Python packages into .venv" install_python
  echo "$want" >"$stamp"
fi

# The Functions Python worker's indexing runs in a Python 3.13 venv of its own
# (tests/unit/test_functions_runtime.py checks function_app.py with it).
step "the Functions runtime venv (.venv-functions)" bash scripts/functions-runtime
