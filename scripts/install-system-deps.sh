#!/usr/bin/env bash
# Install the system packages the Samba AD test harness needs
# (sandbox/writeback_sandbox/samba.py): Samba's AD DC, its provisioning data and
# Python bindings, OpenLDAP's command-line tools, iproute2 and openssl; the headers
# python-ldap builds against (libldap2-dev, libsasl2-dev); and what pip needs to
# build python-qpid-proton (the Service Bus emulator's AMQP engine, sdist only): a
# C compiler, OpenSSL's headers (else it builds without TLS) and Python's headers.
#
# Idempotent: when everything is present it only checks and exits at once.
# Needs root (or sudo) on Debian 12. Samba's packages would start system
# smbd/nmbd/winbind/samba-ad-dc services that bind every address and clash
# with the harness's loopback DCs, so service starts are refused during the
# install (policy-rc.d) and those services are stopped and disabled after it.
set -euo pipefail

# A notice for the terminal: to file descriptor 3 when scripts/bootstrap.sh opened it
# (it sends everything else to its log), else to stderr.
note() { if { : >&3; } 2>/dev/null; then echo "$*" >&3; else echo "$*" >&2; fi; }

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"

# python-ldap (the directory adapter's preferred LDAP client) builds from source
# against OpenLDAP's and Cyrus SASL's headers; pip needs them before it installs.
if [ ! -e /usr/include/lber.h ] || [ ! -e /usr/include/ldap.h ] || [ ! -e /usr/include/sasl/sasl.h ] \
   || ! command -v cc >/dev/null 2>&1; then
  note "install-system-deps: installing libldap2-dev libsasl2-dev from Debian (to build python-ldap)"
  build=(libldap2-dev libsasl2-dev)
  command -v cc >/dev/null 2>&1 || build+=(gcc libc6-dev)
  if [ "$(id -u)" -ne 0 ]; then
    sudo env DEBIAN_FRONTEND=noninteractive apt-get update
    sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${build[@]}"
  else
    env DEBIAN_FRONTEND=noninteractive apt-get update
    env DEBIAN_FRONTEND=noninteractive apt-get install -y "${build[@]}"
  fi
fi

missing=()
for tool in samba samba-tool ldapmodify ip openssl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ! /usr/bin/python3 -c 'import ldb, samba' >/dev/null 2>&1; then
  missing+=("python3-samba")
fi
command -v gcc >/dev/null 2>&1 || missing+=("gcc")
[ -e /usr/include/openssl/ssl.h ] || missing+=("libssl-dev")
py_include=$(${PYTHON:-python3} -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
[ -n "$py_include" ] && [ -e "$py_include/Python.h" ] || missing+=("python3-dev")
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
note "install-system-deps: installing ${missing[*]} from Debian (a few minutes)"

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "install-system-deps: need root (or sudo) to install packages" >&2
    exit 1
  fi
fi

services=(samba-ad-dc smbd nmbd winbind samba)

# Refuse service starts while packages install, unless a policy already exists.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
  "${SUDO[@]}" chmod 755 "$policy"
  made_policy=1
fi
cleanup() {
  if [ "$made_policy" -eq 1 ]; then
    "${SUDO[@]}" rm -f "$policy"
  fi
}
trap cleanup EXIT

"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y \
  samba samba-ad-dc samba-ad-provision krb5-user ldap-utils openssl iproute2 python3-samba \
  gcc libssl-dev python3-dev

# Make sure no system Samba service runs now or starts at boot.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  for svc in "${services[@]}"; do
    "${SUDO[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
else
  for svc in "${services[@]}"; do
    if [ -x "/etc/init.d/$svc" ]; then
      "${SUDO[@]}" "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
      "${SUDO[@]}" update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
  done
fi

still=()
for tool in samba samba-tool ldapmodify ip openssl; do
  command -v "$tool" >/dev/null 2>&1 || still+=("$tool")
done
if [ "${#still[@]}" -ne 0 ]; then
  echo "install-system-deps: still missing after install: ${still[*]}" >&2
  exit 1
fi
echo "install-system-deps: done" >&2
