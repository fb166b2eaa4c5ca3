#!/usr/bin/env bash
# Installs everything writeback needs on a fresh Debian machine (run as root):
# Samba AD DC and LDAP tools for the throwaway test/demo DC, then a virtualenv
# in .venv with the Python dependencies. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
  fi
  "$PY" -m venv .venv
fi

stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt pyproject.toml sandbox/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  .venv/bin/python -m pip install -q --no-deps -e . -e sandbox
  echo "$want" > "$stamp"
fi

# The Functions Python worker's indexing runs in a Python 3.13 venv of its own
# (tests/unit/test_functions_runtime.py checks function_app.py with it).
bash scripts/functions-runtime
