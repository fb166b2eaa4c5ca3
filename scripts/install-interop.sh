#!/usr/bin/env bash
# Installs Microsoft's Node.js Hybrid Connections client (hyco-https, pinned in
# tests/interop/package-lock.json) for the relay interop tests
# (tests/interop/test_hyco_https.py). Node and npm come from Debian when missing.
# Safe to run again: `npm ci` runs only when the lockfile changed.
set -euo pipefail

# A notice for the terminal: to file descriptor 3 when scripts/bootstrap.sh opened it
# (it sends everything else to its log), else to stderr.
note() { if { : >&3; } 2>/dev/null; then echo "$*" >&3; else echo "$*" >&2; fi; }
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  note "install-interop: installing node and npm from Debian"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi

dir=tests/interop
stamp=$dir/node_modules/.lock.sha
want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  note "install-interop: installing the interop test's npm packages"
  npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want" > "$stamp"
fi
