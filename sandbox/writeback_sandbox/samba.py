"""A real, throwaway Samba AD domain controller for tests and the demo.

``provision()`` makes a one-domain forest in a directory of its own, gives it a
certificate from a CA made for it, starts ``samba`` as a child process bound to
one loopback address and waits until LDAPS answers with a certificate that
validates against that CA. ``running_dc()`` does all of that in a temporary
directory and removes it afterwards. Every DC needs its own loopback address
(127.0.0.2, 127.0.0.3, ...); the harness adds it to ``lo`` when it is missing.
Root is needed (Samba's DC refuses to run otherwise, and so does ``ip addr``).

How it is built, and why:

* Provisioning (``samba-tool domain provision``, LMDB backend, no DNS) takes
  about 5 s, so a provisioned domain is kept as a template under
  ``$WRITEBACK_SAMBA_CACHE`` (default ``~/.cache/writeback/samba``) and copied
  for every instance; only ``smb.conf`` holds absolute paths, and it is
  written anew for each copy, together with a new certificate.
* ``smb.conf`` runs only the ``ldap`` service (no SMB, RPC, KDC, NBT), with
  per-instance pid/lock/state/cache/private/socket directories, so several DCs
  run side by side. ``ldb:nosync`` is on: a throwaway DC needs no fsync.
* Password complexity, history and expiry are off in the test domain.
* ``create_users`` adds users over one LDAPS connection: ~370 users/s on a
  fresh DC, but Samba re-reads and re-writes whole index lists (objectClass=top
  and friends) on every add, so the rate falls as the domain grows (10,000
  users average ~140/s; with 100,000 users in the domain any add takes ~25 ms).
  From ``OFFLINE_THRESHOLD`` users on it stops the DC and writes clones of one
  LDAP-created user straight into the domain partition (module-less ldb,
  attribute indexes dropped and rebuilt once with a large index cache, RIDs
  taken from the RID Manager's pool so later adds never collide), then
  restarts the DC: 1,000 users in ~0.7 s, 10,000 in ~2.3 s, 100,000 in ~28 s
  (instead of roughly an hour over LDAP).

Facts about Samba 4.17 as measured with this harness (the integration tests in
``tests/integration/test_samba_harness.py`` assert them):

* Base schema: no ``mailNickname`` and no ``msExch*`` group attributes (only
  ``msExchAssistantName``, ``msExchHouseIdentifier`` and ``msExchLabeledURI``,
  which the Windows base schema has too). ``proxyAddresses`` is allowed on every
  object (``top`` systemMayContain); ``info`` and ``mail`` are allowed on groups
  (``info`` through the Mail-Recipient auxiliary class). The Exchange variant
  adds ``mailNickname``, ``msExchRecipientTypeDetails``,
  ``msExchRecipientDisplayType``, ``msExchRequireAuthToSendTo`` and
  ``msExchHideFromAddressLists`` to Mail-Recipient, as Exchange prep does.
* Simple binds work over LDAPS and StartTLS; a simple bind on plain 389
  without TLS is refused (``ldap server require strong auth = yes``, the
  default).
* ``<SID=S-1-5-21-...>`` works as a base DN and as a ``member`` value on add
  and delete; the extended DN control (1.2.840.113556.1.4.529) with value
  ``SEQUENCE { INTEGER 1 }`` returns ``<GUID=...>;<SID=...>;CN=...`` strings
  (without a value, GUID and SID come in hex).
* Ranged retrieval: unlike Windows (MaxValRange 1500), Samba returns all
  values of ``member`` when asked for plain ``member``, however many there are;
  it does honour an explicit ``member;range=0-1499`` (returning
  ``member;range=0-1499``) and ``member;range=1500-*``, and a range past the
  end comes back closed with ``*`` (``1550-1700`` -> ``member;range=1550-*``).
  ldap3's ``auto_range`` (on by default) hides all of this.
* Permissive modify (1.2.840.113556.1.4.1413) is advertised and works for
  ordinary attributes (re-adding a ``proxyAddresses`` value or deleting a
  missing one then succeeds instead of failing with 20 / 16), but NOT for the
  linked ``member``: adding an existing member fails with entryAlreadyExists
  (68) and removing a non-member with unwillingToPerform (53), with or
  without the control, critical or not. Windows DCs do honour it for
  ``member``, so code that must run on both cannot lean on it.
* Writing an attribute the schema lacks (``mailNickname`` on the plain
  forest) fails with noSuchAttribute (16).
* The LDAP assertion control (1.3.6.1.1.12) is not supported: Samba answers a
  critical one with unavailableCriticalExtension (12), and ignores a
  non-critical one (the modify goes through even when the assertion is false).
"""

# ruff: noqa: S603 - runs fixed system tools (samba, ldapmodify, ip) with arguments it builds

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ldap3
from ldap3.utils.dn import escape_rdn

if TYPE_CHECKING:
    from writeback.adapters.directory import LdapDirectory

DEFAULT_REALM = "WB.TEST"
DEFAULT_DOMAIN = "WB"
DEFAULT_ADDRESS = "127.0.0.2"
#: Meets Samba's complexity rules (which the test domain then switches off).
DEFAULT_ADMIN_PASSWORD = "Wb-Adm1n-Passw0rd!"  # noqa: S105 - throwaway test domain
#: ``create_users`` switches to the offline bulk path from this many users.
OFFLINE_THRESHOLD = 1000
#: Users per offline transaction (LMDB refuses a transaction much larger).
OFFLINE_BATCH = 100_000

#: Bump when the template layout changes, so stale cached templates are not used.
_TEMPLATE_FORMAT = 3
#: Private OID arc for the Exchange-like schema extension (see the LDIF file).
EXCHANGE_OID_ARC = "1.2.840.113556.1.8000.2554.15903.27180.39805.19473.36442.3099500.9243159"
EXCHANGE_SCHEMA_LDIF = Path(__file__).with_name("exchange_schema.ldif")

_REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = _REPO_ROOT / "scripts" / "install-system-deps.sh"
#: Debian's interpreter, which has Samba's ``ldb`` and ``samba`` modules.
SYSTEM_PYTHON = "/usr/bin/python3"
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_APT_PACKAGES = (
    "samba samba-ad-dc samba-ad-provision krb5-user ldap-utils openssl iproute2 python3-samba"
)


class SambaHarnessError(RuntimeError):
    """The test DC could not be provisioned, started or used as asked."""


class SambaUnavailable(SambaHarnessError):
    """Samba cannot run here at all (not root, packages not installable)."""


# --------------------------------------------------------------------------- system


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN_PATH}")


def _tool(name: str) -> str:
    found = _which(name)
    if found is None:
        raise SambaUnavailable(f"{name} not found; run scripts/install-system-deps.sh")
    return found


def _missing_system_deps() -> list[str]:
    missing = [tool for tool in ("samba", "samba-tool", "ldapmodify", "ip") if _which(tool) is None]
    if not Path(SYSTEM_PYTHON).exists():
        missing.append(SYSTEM_PYTHON)
    else:
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import ldb, samba"], capture_output=True, check=False
        )
        if probe.returncode != 0:
            missing.append("python3-samba")
    return missing


def ensure_system_deps() -> None:
    """Install Samba, the LDAP tools and iproute2 if any is missing (needs root).

    Runs ``scripts/install-system-deps.sh`` when the repository is there, the
    same apt-get command otherwise. Raises :class:`SambaUnavailable` when
    that is impossible.
    """
    missing = _missing_system_deps()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SambaUnavailable(f"missing {', '.join(missing)} and not root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": _SBIN_PATH}
    if INSTALL_SCRIPT.exists():
        commands = [["bash", str(INSTALL_SCRIPT)]]
    else:
        commands = [
            ["apt-get", "update"],
            ["apt-get", "install", "-y", *_APT_PACKAGES.split()],
        ]
    for command in commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SambaUnavailable(
                f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}"
            )
    still = _missing_system_deps()
    if still:
        raise SambaUnavailable(f"still missing after install: {', '.join(still)}")


def ensure_loopback_address(address: str) -> None:
    """Put ``address`` (127.x.y.z) on ``lo`` unless it is already there.

    Samba binds only addresses that an interface carries, and the covering
    127.0.0.0/8 route does not count.
    """
    ip = ipaddress.IPv4Address(address)
    if not ip.is_loopback:
        raise SambaHarnessError(f"{address} is not a loopback address; test DCs stay on lo")
    shown = subprocess.run(
        [_tool("ip"), "-o", "-4", "addr", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if f"inet {address}/" in shown:
        return
    added = subprocess.run(
        [_tool("ip"), "addr", "add", f"{address}/32", "dev", "lo"],
        capture_output=True,
        text=True,
        check=False,
    )
    if added.returncode != 0 and "File exists" not in added.stderr:
        raise SambaHarnessError(f"cannot add {address} to lo: {added.stderr.strip()}")


def _port_open(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) == 0


def address_in_use(address: str) -> bool:
    """Whether something already serves LDAP or LDAPS on ``address``."""
    return _port_open(address, 636) or _port_open(address, 389)


def free_loopback_address(preferred: str = DEFAULT_ADDRESS, *, first: int = 100) -> str:
    """``preferred`` when nothing serves LDAP there, else the first quiet 127.0.0.N.

    Lets two test sessions on one machine each run their own DCs.
    """
    if not address_in_use(preferred):
        return preferred
    for last_octet in range(first, 255):
        candidate = f"127.0.0.{last_octet}"
        if candidate != preferred and not address_in_use(candidate):
            return candidate
    raise SambaHarnessError("no free loopback address in 127.0.0.0/24")


# --------------------------------------------------------------------------- TLS


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def new_ca_pem(path: Path, common_name: str = "writeback unrelated test CA") -> str:
    """Write a fresh self-signed CA certificate (no key kept) to ``path``.

    For tests that need a CA which did *not* sign the DC's certificate.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        ca_pem, _ = _make_ca(Path(scratch), common_name)
        shutil.copyfile(ca_pem, path)
    return str(path)


def _make_ca(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A CA certificate and key as PEM files in ``directory``."""
    ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
    try:
        _make_ca_cryptography(ca_pem, ca_key, common_name)
    except ImportError:
        subprocess.run(
            [
                _tool("openssl"),
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(ca_key),
                "-out",
                str(ca_pem),
                "-days",
                "30",
                "-subj",
                f"/CN={common_name}",
                "-addext",
                "basicConstraints=critical,CA:TRUE,pathlen:0",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            capture_output=True,
            check=True,
        )
        os.chmod(ca_key, 0o600)
    return ca_pem, ca_key


def _make_ca_cryptography(ca_pem: Path, ca_key: Path, common_name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        ca_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )


def _make_server_cert(
    directory: Path, ca_pem: Path, ca_key: Path, address: str, dns_name: str
) -> tuple[Path, Path]:
    """A server certificate for ``address`` and ``dns_name``, signed by the CA."""
    cert_pem, key_pem = directory / "cert.pem", directory / "key.pem"
    try:
        _make_server_cert_cryptography(
            cert_pem, key_pem, ca_pem, ca_key, address=address, dns_name=dns_name
        )
    except ImportError:
        csr = directory / "server.csr"
        ext = directory / "server.ext"
        ext.write_text(
            f"subjectAltName=IP:{address},DNS:{dns_name}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
        )
        openssl = _tool("openssl")
        subprocess.run(
            [
                *(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key_pem)),
                *("-out", str(csr), "-subj", f"/CN={dns_name}"),
            ],
            capture_output=True,
            check=True,
        )
        subprocess.run(
            [
                *(openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_pem)),
                *("-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert_pem)),
                *("-days", "30", "-sha256", "-extfile", str(ext)),
            ],
            capture_output=True,
            check=True,
        )
        os.chmod(key_pem, 0o600)
    return cert_pem, key_pem


def _make_server_cert_cryptography(
    cert_pem: Path, key_pem: Path, ca_pem: Path, ca_key: Path, *, address: str, dns_name: str
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(signer, rsa.RSAPrivateKey):
        raise SambaHarnessError("the test CA key is not an RSA key")
    now = datetime.datetime.now(datetime.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(address)), x509.DNSName(dns_name)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key_pem,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )


def _issue_tls(workdir: Path, address: str, dns_name: str) -> tuple[Path, Path, Path]:
    """CA, server certificate and key for one DC; returns (ca, cert, key)."""
    tls = workdir / "tls"
    if tls.exists():
        shutil.rmtree(tls)
    tls.mkdir(mode=0o700)
    ca_pem, ca_key = _make_ca(tls, f"writeback test CA for {dns_name} at {address}")
    cert_pem, key_pem = _make_server_cert(tls, ca_pem, ca_key, address, dns_name)
    return ca_pem, cert_pem, key_pem


# --------------------------------------------------------------------------- the DC


def _realm_to_dn(realm: str) -> str:
    return ",".join(f"DC={part}" for part in realm.lower().split("."))


@contextlib.contextmanager
def _unbinding(conn: ldap3.Connection) -> Iterator[ldap3.Connection]:
    """Use a bound ldap3 connection and unbind it afterwards."""
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.unbind()


def _sid_string(value: object) -> str:
    """objectSid as ``S-1-...`` whether ldap3 gave bytes (no schema) or a string."""
    if isinstance(value, list | tuple):
        value = value[0]
    if isinstance(value, bytes):
        revision, count = value[0], value[1]
        authority = int.from_bytes(value[2:8], "big")
        subs = [int.from_bytes(value[8 + 4 * i : 12 + 4 * i], "little") for i in range(count)]
        return "-".join(["S", str(revision), str(authority), *map(str, subs)])
    if isinstance(value, str) and value.startswith("S-"):
        return value
    raise SambaHarnessError(f"not an objectSid value: {value!r}")


@dataclass
class SambaDC:
    """One provisioned DC; ``start()``/``stop()`` run and end its process, data stays."""

    workdir: Path
    address: str
    realm: str
    domain: str
    base_dn: str
    admin_dn: str
    admin_password: str
    ca_file: str
    exchange_schema: bool = False
    _process: subprocess.Popen[bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    # ---- addresses and files

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.address}:636"

    @property
    def ldap_url(self) -> str:
        return f"ldap://{self.address}:389"

    @property
    def dns_name(self) -> str:
        return f"dc.{self.realm.lower()}"

    @property
    def smb_conf(self) -> Path:
        return self.workdir / "etc" / "smb.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "log" / "samba.log"

    @property
    def schema_dn(self) -> str:
        return f"CN=Schema,CN=Configuration,{self.base_dn}"

    @property
    def users_dn(self) -> str:
        return f"CN=Users,{self.base_dn}"

    # ---- process

    def start(self, timeout: float = 90.0, *, die_with_parent: bool = True) -> None:
        """Start ``samba`` (foreground, single process) and wait for LDAPS.

        With ``die_with_parent`` the DC gets SIGTERM when this process dies,
        so a killed test run leaves no DC holding the address.
        """
        if self.is_running():
            return
        self._kill_stale()
        ensure_loopback_address(self.address)
        if address_in_use(self.address):
            raise SambaHarnessError(
                f"{self.address} already serves LDAP from another process; "
                "stop it or give this DC another address (free_loopback_address())"
            )
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        preexec = _pdeathsig if die_with_parent else None
        with self.log_file.open("ab") as log:
            log.write(f"\n===== start {time.strftime('%F %T')} =====\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [_tool("samba"), "-s", str(self.smb_conf), "-i", "-M", "single"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,  # noqa: PLW1509 - only prctl, safe before exec
                env={**os.environ, "PATH": _SBIN_PATH},
            )
        self._wait_ready(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """End the samba process (SIGTERM, then SIGKILL); data stays on disk."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        deadline = time.monotonic() + 10
        while _port_open(self.address, 636) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the DC's processes (samba and every process it
        forked, those that ended included), from /proc: for benchmarks, which measure
        what a write costs the DC as well as the client."""
        if self._process is None:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        stats: dict[int, tuple[int, float]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # after the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
            used = sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks
            stats[int(entry.name)] = (int(fields[1]), used)
        root = self._process.pid
        total = 0.0
        for pid, (_, used) in stats.items():
            ancestor = pid
            while ancestor not in (0, 1, root) and ancestor in stats:
                ancestor = stats[ancestor][0]
            if ancestor == root:
                total += used
        return total

    def _kill_stale(self) -> None:
        """End a samba left running from this workdir by an earlier run of the harness."""
        pid_file = self.workdir / "run" / "samba.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            # samba rewrites its argv, so recognise it by the files it holds open.
            open_files = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except (OSError, ValueError, IndexError):
            return
        if not any(name.startswith(f"{self.workdir}/") for name in open_files):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise SambaHarnessError(f"samba exited during start-up:\n{self.log_tail()}")
            try:
                with _unbinding(self.connection(connect_timeout=2)):
                    return
            except Exception as exc:  # keep polling until the deadline
                last = exc
                time.sleep(0.2)
        self.stop()
        raise SambaHarnessError(
            f"LDAPS on {self.address} not ready after {timeout:.0f}s ({last}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- LDAP

    def directory(self, target_ou: str, **options: Any) -> LdapDirectory:
        """The product's LDAP adapter bound as Administrator over validated LDAPS,
        scoped to ``target_ou`` (``options`` go to :class:`LdapDirectory`)."""
        from writeback.adapters.directory import LdapDirectory

        return LdapDirectory(
            url=self.ldaps_url,
            user=self.admin_dn,
            password=self.admin_password,
            target_ou=target_ou,
            ca_file=self.ca_file,
            **options,
        )

    def tls(self, ca_file: str | None = None) -> ldap3.Tls:
        """ldap3 TLS settings that validate the DC's certificate."""
        return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file or self.ca_file)

    def connection(
        self,
        *,
        start_tls: bool = False,
        ca_file: str | None = None,
        user: str | None = None,
        password: str | None = None,
        raise_exceptions: bool = True,
        connect_timeout: float = 10,
        receive_timeout: float = 120,
        auto_range: bool = True,
        **options: Any,
    ) -> ldap3.Connection:
        """A bound connection as Administrator (or ``user``), certificate validated.

        LDAPS on 636 by default, StartTLS on 389 with ``start_tls``. No schema
        is read (``get_info=NONE``), so binary attributes come back as bytes.
        ``auto_range=False`` shows ranged attributes (``member;range=0-1499``)
        as the server sent them instead of ldap3 fetching and merging the rest.
        Other keyword arguments go to ``ldap3.Connection``.
        """
        tls = self.tls(ca_file)
        if start_tls:
            server = ldap3.Server(
                self.address,
                port=389,
                tls=tls,
                get_info=ldap3.NONE,
                connect_timeout=connect_timeout,
            )
            auto_bind = ldap3.AUTO_BIND_TLS_BEFORE_BIND
        else:
            server = ldap3.Server(
                self.address,
                port=636,
                use_ssl=True,
                tls=tls,
                get_info=ldap3.NONE,
                connect_timeout=connect_timeout,
            )
            auto_bind = ldap3.AUTO_BIND_NO_TLS
        return ldap3.Connection(
            server,
            user=user or self.admin_dn,
            password=password if password is not None else self.admin_password,
            auto_bind=auto_bind,
            raise_exceptions=raise_exceptions,
            receive_timeout=receive_timeout,
            auto_range=auto_range,
            **options,
        )

    def ldapmodify(self, ldif: str) -> None:
        """Apply LDIF with OpenLDAP's ldapmodify over LDAPS.

        Unlike ldap3 it writes the rootDSE (empty DN), e.g. ``schemaUpdateNow``.
        """
        env = {
            **os.environ,
            "LDAPTLS_CACERT": self.ca_file,
            "LDAPTLS_REQCERT": "demand",
        }
        done = subprocess.run(
            [
                *(_tool("ldapmodify"), "-H", self.ldaps_url, "-x"),
                *("-D", self.admin_dn, "-w", self.admin_password),
            ],
            input=ldif,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            raise SambaHarnessError(
                f"ldapmodify failed ({done.returncode}): {done.stderr.strip()}\n{done.stdout}"
            )

    def domain_sid(self) -> str:
        with _unbinding(self.connection()) as conn:
            conn.search(self.base_dn, "(objectClass=*)", ldap3.BASE, attributes=["objectSid"])
            return _sid_string(conn.response[0]["raw_attributes"]["objectSid"])

    def create_ou(self, name: str, parent_dn: str | None = None) -> str:
        """Create an organizationalUnit and return its DN."""
        dn = f"OU={escape_rdn(name)},{parent_dn or self.base_dn}"
        with _unbinding(self.connection()) as conn:
            conn.add(dn, ["top", "organizationalUnit"], {"ou": name})
        return dn

    def create_group(
        self,
        ou_dn: str,
        name: str,
        *,
        member_sids: Sequence[str] = (),
        attributes: dict[str, Any] | None = None,
    ) -> str:
        """Create a global security group (members as ``<SID=...>``); return its DN."""
        dn = f"CN={escape_rdn(name)},{ou_dn}"
        attrs: dict[str, Any] = {"sAMAccountName": name, **(attributes or {})}
        with _unbinding(self.connection()) as conn:
            conn.add(dn, ["top", "group"], attrs)
            for start in range(0, len(member_sids), 5000):
                chunk = [f"<SID={sid}>" for sid in member_sids[start : start + 5000]]
                conn.modify(dn, {"member": [(ldap3.MODIFY_ADD, chunk)]})
        return dn

    def create_users(
        self, ou_dn: str, names: Sequence[str], *, offline: bool | None = None
    ) -> dict[str, str]:
        """Create ``user`` objects (no password, so disabled); return name -> objectSid.

        Each name is the cn and the sAMAccountName (keep it to 20 characters).
        ``offline=None`` picks the LDAP path below :data:`OFFLINE_THRESHOLD`
        names and the bulk path from there on; the bulk path stops and
        restarts the DC, so connections open at that moment break.
        """
        names = list(names)
        if len(set(names)) != len(names):
            raise SambaHarnessError("create_users got duplicate names")
        if not names:
            return {}
        if offline is None:
            offline = len(names) >= OFFLINE_THRESHOLD
        if not offline or len(names) == 1:
            return self._create_users_ldap(ou_dn, names)
        return self._create_users_offline(ou_dn, names)

    def _create_users_ldap(self, ou_dn: str, names: Sequence[str]) -> dict[str, str]:
        classes = ["top", "person", "organizationalPerson", "user"]
        dns = {name: f"CN={escape_rdn(name)},{ou_dn}" for name in names}
        with _unbinding(self.connection()) as conn:
            for name, dn in dns.items():
                conn.add(dn, classes, {"sAMAccountName": name})
            sids = self._sids_under(conn, ou_dn)
        missing = [name for name in names if dns[name].lower() not in sids]
        if missing:
            raise SambaHarnessError(f"users created but not found: {missing[:5]}")
        return {name: sids[dns[name].lower()] for name in names}

    @staticmethod
    def _sids_under(conn: ldap3.Connection, base_dn: str) -> dict[str, str]:
        """Lower-cased DN -> objectSid for every user directly under ``base_dn``."""
        entries = conn.extend.standard.paged_search(
            base_dn,
            "(objectClass=user)",
            ldap3.LEVEL,
            attributes=["objectSid"],
            paged_size=1000,
            generator=True,
        )
        return {
            entry["dn"].lower(): _sid_string(entry["raw_attributes"]["objectSid"])
            for entry in entries
            if entry.get("type") == "searchResEntry"
        }

    def _create_users_offline(self, ou_dn: str, names: Sequence[str]) -> dict[str, str]:
        was_running = self.is_running()
        if not was_running:
            self.start()
        first, rest = names[0], names[1:]
        result = self._create_users_ldap(ou_dn, [first])
        template_dn = f"CN={escape_rdn(first)},{ou_dn}"
        self.stop()
        try:
            # One LMDB transaction per batch: some 150,000 users overflow one.
            for start in range(0, len(rest), OFFLINE_BATCH):
                batch = rest[start : start + OFFLINE_BATCH]
                result.update(self._bulk_add(template_dn, ou_dn, batch))
        finally:
            self.start()
            if not was_running:
                self.stop()
        return result

    def _bulk_add(self, template_dn: str, ou_dn: str, names: Sequence[str]) -> dict[str, str]:
        request = {
            "sam_ldb": str(self.workdir / "private" / "sam.ldb"),
            "private_dir": str(self.workdir / "private"),
            "base_dn": self.base_dn,
            "template_dn": template_dn,
            "users": [[name, f"CN={escape_rdn(name)},{ou_dn}"] for name in names],
        }
        done = subprocess.run(
            [SYSTEM_PYTHON, "-c", _BULK_SCRIPT],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SambaHarnessError(f"offline user creation failed: {done.stderr[-3000:]}")
        created: dict[str, str] = json.loads(done.stdout)
        return created


def _pdeathsig() -> None:
    """In the child before exec: get SIGTERM when the parent dies."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


# Runs under Debian's python3, which has Samba's ldb bindings; reads a JSON
# request on stdin and prints {name: sid}. The DC must be stopped.
_BULK_SCRIPT = r"""
import json, sys, uuid
import ldb
from samba.dcerpc import security
from samba.ndr import ndr_pack, ndr_unpack

req = json.load(sys.stdin)
users = req["users"]
sam = ldb.Ldb(req["sam_ldb"], options=["modules:"])
part = sam.search("@PARTITION", scope=ldb.SCOPE_BASE)[0]
backend = str(part["backendStore"][0]) if "backendStore" in part else "tdb"
path = None
for value in part["partition"]:
    dn, _, rel = str(value).partition(":")
    if dn.lower() == req["base_dn"].lower():
        path = req["private_dir"] + "/" + rel
if path is None:
    sys.exit("domain partition not found in @PARTITION")
del sam
db = ldb.Ldb(backend + "://" + path,
             options=["modules:", "transaction_index_cache_size:%d" % (2000003 + 12 * len(users))])

tmpl = db.search(req["template_dn"], scope=ldb.SCOPE_BASE)[0]
template_sid = str(ndr_unpack(security.dom_sid, bytes(tmpl["objectSid"][0])))
domain_sid = template_sid.rsplit("-", 1)[0]
rid_dn = "CN=RID Manager$,CN=System," + req["base_dn"]
pool = int(str(db.search(rid_dn, scope=ldb.SCOPE_BASE, attrs=["rIDAvailablePool"])[0]
                ["rIDAvailablePool"][0]))
low, high = pool & 0xFFFFFFFF, pool >> 32
if low + len(users) > high:
    sys.exit("RID pool exhausted")
taken = []
for name, _dn in users:
    hits = db.search(req["base_dn"], scope=ldb.SCOPE_SUBTREE, attrs=["cn"],
                     expression="(sAMAccountName=%s)" % ldb.binary_encode(name))
    if len(hits):
        taken.append(name)
if taken:
    sys.exit("sAMAccountName already in use: %s" % ", ".join(taken[:10]))

skip = {"dn", "distinguishedName", "cn", "name", "sAMAccountName", "objectGUID", "objectSid"}
copied = [(k, tmpl[k]) for k in tmpl.keys() if k not in skip]
result = {}
db.transaction_start()
try:
    indexlist = db.search("@INDEXLIST", scope=ldb.SCOPE_BASE)[0]
    dropped = {k: [bytes(v) for v in indexlist[k]] for k in ("@IDXATTR", "@IDXONE")
               if k in indexlist}
    m = ldb.Message(ldb.Dn(db, "@INDEXLIST"))
    for k in dropped:
        m[k] = ldb.MessageElement([], ldb.FLAG_MOD_DELETE, k)
    db.modify(m)
    for i, (name, dn) in enumerate(users):
        rid = low + i
        sid = "%s-%d" % (domain_sid, rid)
        m = ldb.Message(ldb.Dn(db, dn))
        for k, el in copied:
            m[k] = el
        raw = name.encode("utf-8")
        m["cn"] = ldb.MessageElement([raw], ldb.FLAG_MOD_ADD, "cn")
        m["name"] = ldb.MessageElement([raw], ldb.FLAG_MOD_ADD, "name")
        m["sAMAccountName"] = ldb.MessageElement([raw], ldb.FLAG_MOD_ADD, "sAMAccountName")
        m["objectGUID"] = ldb.MessageElement([uuid.uuid4().bytes_le], ldb.FLAG_MOD_ADD,
                                             "objectGUID")
        m["objectSid"] = ldb.MessageElement([ndr_pack(security.dom_sid(sid))],
                                            ldb.FLAG_MOD_ADD, "objectSid")
        db.add(m)
        result[name] = sid
    m = ldb.Message(ldb.Dn(db, rid_dn))
    m["rIDAvailablePool"] = ldb.MessageElement(
        [str((high << 32) | (low + len(users))).encode()], ldb.FLAG_MOD_REPLACE, "rIDAvailablePool")
    db.modify(m)
    m = ldb.Message(ldb.Dn(db, "@INDEXLIST"))
    for k, values in dropped.items():
        m[k] = ldb.MessageElement(values, ldb.FLAG_MOD_ADD, k)
    db.modify(m)
except BaseException:
    db.transaction_cancel()
    raise
db.transaction_commit()
json.dump(result, sys.stdout)
"""


# --------------------------------------------------------------------------- provisioning


def _render_smb_conf(
    workdir: Path,
    *,
    address: str,
    realm: str,
    domain: str,
    tls_files: tuple[Path, Path, Path] | None,
    schema_updates: bool,
) -> str:
    w = workdir
    lines = [
        "[global]",
        "netbios name = DC",
        f"realm = {realm}",
        f"workgroup = {domain}",
        "server role = active directory domain controller",
        "server services = ldap",
        f"interfaces = {address}",
        "bind interfaces only = yes",
        f"private dir = {w}/private",
        f"binddns dir = {w}/bind-dns",
        f"lock directory = {w}/lock",
        f"state directory = {w}/state",
        f"cache directory = {w}/cache",
        f"pid directory = {w}/run",
        f"ncalrpc dir = {w}/run/ncalrpc",
        f"winbindd socket directory = {w}/run/winbindd",
        f"ntp signd socket directory = {w}/run/ntp_signd",
        f"log file = {w}/log/log.%m",
        "log level = 1",
        "ldb:nosync = true",
        "ldap server require strong auth = yes",
    ]
    if tls_files is not None:
        ca, cert, key = tls_files
        lines += [
            "tls enabled = yes",
            f"tls cafile = {ca}",
            f"tls certfile = {cert}",
            f"tls keyfile = {key}",
        ]
    if schema_updates:
        lines.append("dsdb:schema update allowed = true")
    return "\n\t".join(lines) + "\n"


def _samba_version() -> str:
    return subprocess.run(
        [_tool("samba"), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _cache_root() -> Path:
    configured = os.environ.get("WRITEBACK_SAMBA_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "writeback" / "samba"


def _template_key(realm: str, domain: str, admin_password: str, exchange_schema: bool) -> str:
    parts = [
        str(_TEMPLATE_FORMAT),
        _samba_version(),
        realm,
        domain,
        admin_password,
        str(exchange_schema),
        EXCHANGE_SCHEMA_LDIF.read_text() if exchange_schema else "",
    ]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return f"{realm.lower()}-{'exchange' if exchange_schema else 'plain'}-{digest}"


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, "PATH": _SBIN_PATH}
    )
    if done.returncode != 0:
        raise SambaHarnessError(
            f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )


def _provision_into(
    target: Path,
    *,
    address: str,
    realm: str,
    domain: str,
    admin_password: str,
    exchange_schema: bool,
) -> None:
    """Provision a fresh domain into ``target`` (the template); leaves it stopped."""
    (target / "etc").mkdir(parents=True)
    empty_conf = target / "etc" / "provision.conf"
    empty_conf.write_text("[global]\n")
    _run(
        [
            _tool("samba-tool"),
            "domain",
            "provision",
            "-s",
            str(empty_conf),
            f"--targetdir={target}",
            f"--realm={realm}",
            f"--domain={domain}",
            "--server-role=dc",
            "--dns-backend=NONE",
            "--host-name=dc",
            "--backend-store=mdb",
            f"--adminpass={admin_password}",
            "--option=interfaces=lo",
            "--option=bind interfaces only=yes",
        ],
        "samba-tool domain provision",
    )
    conf = target / "etc" / "smb.conf"
    conf.write_text(
        _render_smb_conf(
            target,
            address=address,
            realm=realm,
            domain=domain,
            tls_files=None,
            schema_updates=False,
        )
    )
    _run(
        [
            _tool("samba-tool"),
            "domain",
            "passwordsettings",
            "set",
            "-s",
            str(conf),
            "-H",
            str(target / "private" / "sam.ldb"),
            "--complexity=off",
            "--history-length=0",
            "--min-pwd-length=0",
            "--min-pwd-age=0",
            "--max-pwd-age=0",
        ],
        "samba-tool domain passwordsettings set",
    )
    if exchange_schema:
        dc = _instance(target, address, realm, domain, admin_password, exchange_schema=True)
        dc.start()
        try:
            ldif = string.Template(EXCHANGE_SCHEMA_LDIF.read_text()).substitute(
                schema_dn=dc.schema_dn, oid=EXCHANGE_OID_ARC
            )
            dc.ldapmodify(ldif)
        finally:
            dc.stop()
    shutil.rmtree(target / "tls", ignore_errors=True)
    for scratch in ("log", "run", "lock", "cache", "private/ldap_priv"):
        shutil.rmtree(target / scratch, ignore_errors=True)
    (target / "private" / "ldapi").unlink(missing_ok=True)


def _ignore_sockets(directory: str, names: list[str]) -> set[str]:
    """copytree filter: leave out sockets and other special files."""
    return {
        name
        for name in names
        if not (Path(directory, name).is_dir() or Path(directory, name).is_file())
    }


def _instance(
    workdir: Path,
    address: str,
    realm: str,
    domain: str,
    admin_password: str,
    *,
    exchange_schema: bool,
) -> SambaDC:
    """Write a new certificate and smb.conf for a provisioned ``workdir``."""
    for sub in ("log", "run", "lock", "cache", "bind-dns"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    base_dn = _realm_to_dn(realm)
    dns_name = f"dc.{realm.lower()}"
    ca, cert, key = _issue_tls(workdir, address, dns_name)
    (workdir / "etc" / "smb.conf").write_text(
        _render_smb_conf(
            workdir,
            address=address,
            realm=realm,
            domain=domain,
            tls_files=(ca, cert, key),
            schema_updates=exchange_schema,
        )
    )
    return SambaDC(
        workdir=workdir,
        address=address,
        realm=realm,
        domain=domain,
        base_dn=base_dn,
        admin_dn=f"CN=Administrator,CN=Users,{base_dn}",
        admin_password=admin_password,
        ca_file=str(ca),
        exchange_schema=exchange_schema,
    )


def _template(
    *, address: str, realm: str, domain: str, admin_password: str, exchange_schema: bool
) -> Path:
    """The cached provisioned domain for these settings, built on first use."""
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / _template_key(realm, domain, admin_password, exchange_schema)
    if (final / "READY").exists():
        return final
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "READY").exists():
            return final
        shutil.rmtree(final, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _provision_into(
                building / "dc",
                address=address,
                realm=realm,
                domain=domain,
                admin_password=admin_password,
                exchange_schema=exchange_schema,
            )
            (building / "dc" / "READY").write_text(time.strftime("%F %T\n"))
            (building / "dc").rename(final)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return final


def provision(
    workdir: Path,
    *,
    address: str = DEFAULT_ADDRESS,
    exchange_schema: bool = False,
    realm: str = DEFAULT_REALM,
    domain: str = DEFAULT_DOMAIN,
    admin_password: str = DEFAULT_ADMIN_PASSWORD,
    start: bool = True,
    use_cache: bool = True,
) -> SambaDC:
    """Provision a DC into ``workdir`` (absent or empty), start it, wait for LDAPS.

    ``exchange_schema`` extends the schema with the Exchange attributes the
    product writes. With ``use_cache`` the provisioned domain comes from a
    cached template (see the module docstring); without, it is built here.
    """
    if os.geteuid() != 0:
        raise SambaUnavailable("a Samba DC needs root")
    ensure_system_deps()
    workdir = Path(workdir).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise SambaHarnessError(f"{workdir} is not empty")
    realm = realm.upper()
    if use_cache:
        template = _template(
            address=address,
            realm=realm,
            domain=domain,
            admin_password=admin_password,
            exchange_schema=exchange_schema,
        )
        shutil.copytree(
            template, workdir, symlinks=True, dirs_exist_ok=True, ignore=_ignore_sockets
        )
        (workdir / "READY").unlink(missing_ok=True)
    else:
        if workdir.exists():
            workdir.rmdir()
        _provision_into(
            workdir,
            address=address,
            realm=realm,
            domain=domain,
            admin_password=admin_password,
            exchange_schema=exchange_schema,
        )
    dc = _instance(workdir, address, realm, domain, admin_password, exchange_schema=exchange_schema)
    if start:
        dc.start()
    return dc


@contextlib.contextmanager
def running_dc(*, keep: bool = False, **kwargs: Any) -> Iterator[SambaDC]:
    """Provision a DC in a temporary directory, yield it, then stop and delete it.

    Takes the keyword arguments of :func:`provision`. With ``keep`` the DC is
    stopped but its directory (data, ``log/samba.log``, ``tls/ca.pem``) stays
    for inspection at ``dc.workdir``; ``dc.start()`` runs it again.
    """
    workdir = Path(tempfile.mkdtemp(prefix="writeback-samba-"))
    dc: SambaDC | None = None
    try:
        dc = provision(workdir, **kwargs)
        yield dc
    finally:
        if dc is not None:
            dc.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m writeback_sandbox.samba up``: run a DC until Ctrl-C (for the demo)."""
    parser = argparse.ArgumentParser(prog="python -m writeback_sandbox.samba")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="provision and run a DC in the foreground")
    up.add_argument("--workdir", type=Path, help="keep the DC here (default: a temp dir)")
    up.add_argument("--address", default=DEFAULT_ADDRESS)
    up.add_argument("--exchange", action="store_true", help="extend the schema like Exchange")
    args = parser.parse_args(argv)

    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="writeback-samba-"))
    dc = provision(workdir, address=args.address, exchange_schema=args.exchange)
    info = {
        "ldaps_url": dc.ldaps_url,
        "ldap_url": dc.ldap_url,
        "base_dn": dc.base_dn,
        "bind_dn": dc.admin_dn,
        "password": dc.admin_password,
        "ca_file": dc.ca_file,
        "workdir": str(dc.workdir),
    }
    sys.stdout.write(json.dumps(info, indent=2) + "\n")
    sys.stdout.flush()
    try:
        while dc.is_running():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        dc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
