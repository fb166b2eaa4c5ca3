"""The two LDAP client libraries the directory adapter can speak through.

:class:`PythonLdapClient` (python-ldap: C, OpenLDAP's libldap) is preferred:
on one Samba DC (``bench/ldap_client.py``, 20,000 groups) it made one-value
modifies at 1.3 times ldap3's rate (1.46 with 8 in flight) for a sixth of the
client CPU (0.035 against 0.22-0.28 ms), answered a 20-GUID search in half the
time for a twelfth of the CPU, and read all 20,000 groups with their 400,000
members in 4.1 s for 0.34 s of CPU, where ldap3 took 5.6 s and 1.8 s: BER is
decoded in C. :class:`Ldap3Client` (ldap3, pure Python) is the fallback where
python-ldap cannot be installed: it has no wheels, and its build needs
libldap's headers, which Azure Functions' remote build and Windows lack.

Both give :class:`~writeback.adapters.directory.LdapDirectory` the same small
surface: open (connect, TLS with the certificate and host name validated,
StartTLS on ``ldap://``, simple bind), search (optionally paged, optionally
with the extended-DN control), add, modify, rename, delete. Search, add and
modify are a send and a wait each, so several requests can be outstanding on
one connection (ldap3 carries each out at send, and the wait reports it).
Values go in as text and come back as bytes; attribute names come back
lower-cased. Failures are raised as the exceptions below, which the adapter
maps to writeback's errors with the request's context.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MethodType
from typing import Any, ClassVar, Literal, NoReturn, Protocol
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

Scope = Literal["base", "one", "subtree"]
ModOp = Literal["add", "delete", "replace"]
#: One change of a modify: (operation, attribute, values).
Change = tuple[ModOp, str, Sequence[str]]

EXTENDED_DN_OID = "1.2.840.113556.1.4.529"
#: The extended-DN control's value, SEQUENCE { INTEGER 1 }: GUID and SID as strings.
EXTENDED_DN_VALUE = b"\x30\x03\x02\x01\x01"
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"
STARTTLS_OID = "1.3.6.1.4.1.1466.20037"


@dataclass(slots=True)
class Entry:
    """One search result: its DN (extended when asked) and raw values by lower-case name."""

    dn: str
    attributes: dict[str, list[bytes]]


class ClientFailure(Exception):
    """Base of what a client raises; ``detail`` never holds the password."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ResultError(ClientFailure):
    """The server answered with a non-zero LDAP result code."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class ConnectionFailed(ClientFailure):
    """Not reachable, dropped, or no answer in time; the connection is closed."""


class CertificateRejected(ClientFailure):
    """The server's certificate is not trusted by the CA file, or names another host."""


class StartTlsFailed(ClientFailure):
    """The server on ``ldap://`` would not start TLS."""


@dataclass(frozen=True)
class Endpoint:
    url: str
    user: str
    password: str
    ca_file: str | None
    timeout: float

    @property
    def ldaps(self) -> bool:
        return self.url.lower().startswith("ldaps://")

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "", parts.port or (636 if self.ldaps else 389)

    def scrub(self, text: str) -> str:
        return text.replace(self.password, "***") if self.password else text


class Client(Protocol):
    name: ClassVar[str]

    @property
    def closed(self) -> bool: ...

    def open(self) -> None:
        """Connect, start TLS, bind. Raises ResultError for a refused bind."""
        ...

    def close(self) -> None: ...

    def send_search(
        self,
        base: str,
        scope: Scope,
        search_filter: str,
        attributes: Sequence[str],
        *,
        extended: bool,
        page_size: int | None = None,
        cookie: bytes | None = None,
    ) -> object:
        """Send a search (optionally paged) without waiting for it."""
        ...

    def collect(self, token: object) -> tuple[list[Entry], bytes | None]:
        """A sent search's entries (no referrals) and, when paged, the next cookie."""
        ...

    def abandon(self, token: object) -> None:
        """Give up a sent search whose answer is no longer wanted."""
        ...

    def send_add(self, dn: str, attributes: Mapping[str, Sequence[str]]) -> object: ...

    def send_modify(self, dn: str, changes: Sequence[Change]) -> object: ...

    def wait(self, token: object) -> None:
        """The outcome of a sent add or modify: returns, or raises its failure."""
        ...

    def rename(self, dn: str, new_rdn: str, new_superior: str | None = None) -> None:
        """Modify DN: a new RDN, and with ``new_superior`` a new parent (a move)."""
        ...

    def delete(self, dn: str) -> None: ...


def python_ldap_available() -> bool:
    return importlib.util.find_spec("ldap") is not None


def make_client(name: str | None, endpoint: Endpoint) -> Client:
    """The client called ``name`` ('python-ldap', 'ldap3'); None: python-ldap if installed."""
    if name is None:
        name = PythonLdapClient.name if python_ldap_available() else Ldap3Client.name
    if name == PythonLdapClient.name:
        return PythonLdapClient(endpoint)
    if name == Ldap3Client.name:
        return Ldap3Client(endpoint)
    raise ValueError(f"unknown LDAP client {name!r} (python-ldap or ldap3)")


# --------------------------------------------------------------------------- python-ldap


class PythonLdapClient:
    """python-ldap: requests go out from C and results are decoded in C.

    libldap reports an untrusted certificate and an unreachable server alike
    (SERVER_DOWN, "unknown error code" from GnuTLS), so when connecting fails
    :func:`certificate_problem` repeats the handshake with Python's ``ssl`` to
    tell them apart. The handle's own TLS options (CA file, demand a valid
    certificate whose name matches) override ldap.conf and LDAPTLS_* variables.
    """

    name: ClassVar[str] = "python-ldap"

    def __init__(self, endpoint: Endpoint) -> None:
        import ldap
        from ldap.controls import RequestControl

        self._ldap: Any = ldap
        self._endpoint = endpoint
        self._conn: Any = None
        self._extended = RequestControl(EXTENDED_DN_OID, True, EXTENDED_DN_VALUE)
        self._scopes = {
            "base": ldap.SCOPE_BASE,
            "one": ldap.SCOPE_ONELEVEL,
            "subtree": ldap.SCOPE_SUBTREE,
        }
        self._ops = {"add": ldap.MOD_ADD, "delete": ldap.MOD_DELETE, "replace": ldap.MOD_REPLACE}
        self._unreachable = (ldap.SERVER_DOWN, ldap.CONNECT_ERROR, ldap.TIMEOUT)

    @property
    def closed(self) -> bool:
        return self._conn is None

    def open(self) -> None:
        ldap, e = self._ldap, self._endpoint
        conn = ldap.initialize(e.url)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        conn.set_option(ldap.OPT_REFERRALS, 0)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, e.timeout)
        conn.set_option(ldap.OPT_TIMEOUT, e.timeout)
        conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        cafile, capath = _trust(e.ca_file)
        if cafile:
            conn.set_option(ldap.OPT_X_TLS_CACERTFILE, cafile)
        if capath:
            conn.set_option(ldap.OPT_X_TLS_CACERTDIR, capath)
        conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # last: the TLS options above take effect
        conn.timeout = e.timeout  # for the *_s calls
        self._conn = conn
        try:
            if not e.ldaps:
                try:
                    conn.start_tls_s()
                except self._unreachable:
                    raise
                except ldap.LDAPError as error:
                    raise StartTlsFailed(_python_ldap_text(error, e)) from error
            conn.simple_bind_s(e.user, e.password)
        except self._unreachable as error:
            self.close()
            problem = certificate_problem(e)
            if problem is not None:
                raise CertificateRejected(problem) from error
            raise ConnectionFailed(_python_ldap_text(error, e)) from error
        except ldap.LDAPError as error:
            self.close()
            self._raise(error)
        except ClientFailure:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(self._ldap.LDAPError, OSError):
                conn.unbind_ext_s()

    def send_search(
        self,
        base: str,
        scope: Scope,
        search_filter: str,
        attributes: Sequence[str],
        *,
        extended: bool,
        page_size: int | None = None,
        cookie: bytes | None = None,
    ) -> object:
        controls = [self._extended] if extended else []
        if page_size is not None:
            from ldap.controls.libldap import SimplePagedResultsControl

            controls.append(SimplePagedResultsControl(True, size=page_size, cookie=cookie or b""))
        try:
            return self._connection().search_ext(
                base, self._scopes[scope], search_filter, list(attributes), serverctrls=controls
            )
        except self._ldap.LDAPError as error:
            self._raise(error)

    def collect(self, token: object) -> tuple[list[Entry], bytes | None]:
        try:
            _, data, _, response_controls = self._connection().result3(
                token, all=1, timeout=self._endpoint.timeout
            )
        except self._ldap.LDAPError as error:
            self._raise(error)
        entries = [
            Entry(dn, {name.lower(): values for name, values in found.items()})
            for dn, found in data
            if dn is not None
        ]
        next_cookie = None
        for control in response_controls or ():
            if control.controlType == PAGED_RESULTS_OID:
                next_cookie = control.cookie or None
        return entries, next_cookie

    def abandon(self, token: object) -> None:
        if self._conn is not None:
            with contextlib.suppress(self._ldap.LDAPError):
                self._conn.abandon_ext(token)

    def send_add(self, dn: str, attributes: Mapping[str, Sequence[str]]) -> object:
        modlist = [(name, [v.encode() for v in values]) for name, values in attributes.items()]
        try:
            return self._connection().add_ext(dn, modlist)
        except self._ldap.LDAPError as error:
            self._raise(error)

    def send_modify(self, dn: str, changes: Sequence[Change]) -> object:
        modlist = [
            (self._ops[op], name, [v.encode() for v in values] if values else None)
            for op, name, values in changes
        ]
        try:
            return self._connection().modify_ext(dn, modlist)
        except self._ldap.LDAPError as error:
            self._raise(error)

    def wait(self, token: object) -> None:
        try:
            self._connection().result3(token, all=1, timeout=self._endpoint.timeout)
        except self._ldap.LDAPError as error:
            self._raise(error)

    def rename(self, dn: str, new_rdn: str, new_superior: str | None = None) -> None:
        try:
            self._connection().rename_s(dn, new_rdn, new_superior, 1)
        except self._ldap.LDAPError as error:
            self._raise(error)

    def delete(self, dn: str) -> None:
        try:
            self._connection().delete_ext_s(dn)
        except self._ldap.LDAPError as error:
            self._raise(error)

    def _connection(self) -> Any:
        if self._conn is None:
            raise ConnectionFailed("connection closed")
        return self._conn

    def _raise(self, error: Exception) -> NoReturn:
        text = _python_ldap_text(error, self._endpoint)
        if isinstance(error, self._unreachable):
            self.close()
            raise ConnectionFailed(text) from error
        info = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
        code = info.get("result")
        if isinstance(code, int) and code >= 0:
            raise ResultError(code, text) from error
        self.close()  # a client-side failure (encoding, decoding): the stream is suspect
        raise ClientFailure(f"{type(error).__name__}: {text}") from error


def _python_ldap_text(error: Exception, endpoint: Endpoint) -> str:
    info = error.args[0] if error.args and isinstance(error.args[0], dict) else None
    if info is None:
        return endpoint.scrub(str(error) or type(error).__name__)
    parts = [str(info.get("info") or ""), str(info.get("desc") or "")]
    return endpoint.scrub(": ".join(p for p in parts if p) or type(error).__name__)


def _trust(ca_file: str | None) -> tuple[str | None, str | None]:
    """The CA file to trust, or the system trust store's file and directory."""
    if ca_file is not None:
        return ca_file, None
    paths = ssl.get_default_verify_paths()
    cafile = paths.cafile or (
        paths.openssl_cafile if os.path.isfile(paths.openssl_cafile) else None
    )
    capath = paths.capath or (paths.openssl_capath if os.path.isdir(paths.openssl_capath) else None)
    return cafile, capath


def certificate_problem(endpoint: Endpoint) -> str | None:
    """Why the server's certificate fails validation, or None when it does not
    (or the server cannot be reached at all): a TLS handshake with Python's
    ``ssl``, after a StartTLS request on ``ldap://``."""
    host, port = endpoint.host_port
    context = ssl.create_default_context(cafile=endpoint.ca_file)
    try:
        with socket.create_connection((host, port), timeout=min(endpoint.timeout, 10)) as raw:
            if not endpoint.ldaps and not _start_tls(raw):
                return None
            with context.wrap_socket(raw, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as error:
        ca = endpoint.ca_file or "the system trust store"
        return f"TLS certificate not trusted by {ca}: {error.verify_message or error}"
    except (OSError, ValueError):
        return None


def _start_tls(raw: socket.socket) -> bool:
    """Send an LDAP StartTLS extended request (message id 1); True when it succeeded."""
    oid = STARTTLS_OID.encode()
    request = _ber(0x77, _ber(0x80, oid))
    raw.sendall(_ber(0x30, b"\x02\x01\x01" + request))
    answer = _read_message(raw)
    # LDAPMessage { id, extendedResp [APPLICATION 24] { resultCode ENUMERATED, ... } }
    at = answer.find(b"\x78")
    if at < 0:
        return False
    body = answer[at:]
    offset = 2 if body[1] < 0x80 else 2 + (body[1] & 0x7F)
    return body[offset : offset + 3] == b"\x0a\x01\x00"


def _ber(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _read_message(raw: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = raw.recv(4096)
        if not chunk:
            return data
        data += chunk
        if len(data) >= 2:
            first = data[1]
            header = 2 if first < 0x80 else 2 + (first & 0x7F)
            if len(data) >= header:
                length = first if first < 0x80 else int.from_bytes(data[2:header], "big")
                if len(data) >= header + length:
                    return data


# --------------------------------------------------------------------------- ldap3


def linear_receiving(strategy: Any) -> list[bytes]:
    """ldap3's ``SyncStrategy.receiving`` without its quadratic buffer.

    ldap3 appends every piece the socket returns to a ``bytes`` object, copying
    everything received so far each time. A large entry that arrives in many
    small pieces (a group of 50,000 members is some 6 MB of extended DNs, and a
    DC that has to build it streams it slowly) then costs seconds of CPU: 7.8 s
    to read such a group cold from Samba, 0.6 s with this buffer. Same contract:
    the complete LDAP messages received (as ``bytes``), stopping once the buffer
    is empty after at least one, or when the peer closes; a socket error closes
    the connection and raises ldap3's ``LDAPSocketReceiveError``. Only for
    connections without SASL signing (ours bind with SIMPLE over TLS).
    """
    from ldap3.core.exceptions import (
        LDAPException,
        LDAPSocketReceiveError,
        communication_exception_factory,
    )
    from ldap3.strategy.base import BaseStrategy

    messages: list[bytes] = []
    buffer = bytearray()
    while True:
        try:
            data = strategy.connection.socket.recv(strategy.socket_size)
        except (OSError, AttributeError) as error:
            strategy.connection.last_error = f"error receiving data: {error}"
            with contextlib.suppress(OSError, LDAPException):
                strategy.close()
            raise communication_exception_factory(LDAPSocketReceiveError, type(error)(str(error)))(
                strategy.connection.last_error
            ) from error
        if not data:
            return messages
        buffer += data
        while True:
            length = BaseStrategy.compute_ldap_message_size(buffer)
            if length == -1 or len(buffer) < length:
                break
            messages.append(bytes(buffer[:length]))
            del buffer[:length]
        if messages and not buffer:
            return messages


@dataclass(frozen=True)
class _Failed:
    failure: ClientFailure


class Ldap3Client:
    """ldap3, synchronous: ``send_*`` carries the request out, ``wait`` tells how it went."""

    name: ClassVar[str] = "ldap3"

    def __init__(self, endpoint: Endpoint) -> None:
        import ldap3

        self._ldap3: Any = ldap3
        self._endpoint = endpoint
        self._conn: Any = None
        self._scopes = {"base": ldap3.BASE, "one": ldap3.LEVEL, "subtree": ldap3.SUBTREE}
        self._ops = {
            "add": ldap3.MODIFY_ADD,
            "delete": ldap3.MODIFY_DELETE,
            "replace": ldap3.MODIFY_REPLACE,
        }

    @property
    def closed(self) -> bool:
        return self._conn is None or self._conn.closed

    def open(self) -> None:
        ldap3, e = self._ldap3, self._endpoint
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=e.ca_file)
        server = ldap3.Server(
            e.url, use_ssl=e.ldaps, tls=tls, get_info=ldap3.NONE, connect_timeout=e.timeout
        )
        conn = ldap3.Connection(
            server,
            user=e.user,
            password=e.password,
            authentication=ldap3.SIMPLE,
            raise_exceptions=False,
            auto_range=False,
            auto_referrals=False,
            return_empty_attributes=False,
            receive_timeout=max(1, math.ceil(e.timeout)),  # ldap3 packs it as an int
        )
        if conn.sasl_mechanism is None and hasattr(conn.strategy, "receiving"):
            conn.strategy.receiving = MethodType(linear_receiving, conn.strategy)
        self._conn = conn
        try:
            conn.open()
            if not e.ldaps and not conn.start_tls():
                raise StartTlsFailed(f"StartTLS with {e.url} failed")
            bound = conn.bind()
        except ClientFailure:
            self.close()
            raise
        except Exception as error:  # ldap3 raises more than LDAPException
            try:
                self._raise(error)
            except ConnectionFailed as failed:
                problem = certificate_problem(e)
                if problem is not None:
                    raise CertificateRejected(problem) from error
                raise failed from error
        if not bound:
            self._check()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already gone: nothing to release
                conn.unbind()

    def send_search(
        self,
        base: str,
        scope: Scope,
        search_filter: str,
        attributes: Sequence[str],
        *,
        extended: bool,
        page_size: int | None = None,
        cookie: bytes | None = None,
    ) -> object:
        """Carries the search out; :meth:`collect` returns what it found."""
        try:
            return self._search(
                base,
                scope,
                search_filter,
                attributes,
                extended=extended,
                page_size=page_size,
                cookie=cookie,
            )
        except ClientFailure as failure:
            return _Failed(failure)

    def collect(self, token: object) -> tuple[list[Entry], bytes | None]:
        if isinstance(token, _Failed):
            raise token.failure
        assert isinstance(token, tuple)
        return token

    def abandon(self, token: object) -> None:
        return None

    def _search(
        self,
        base: str,
        scope: Scope,
        search_filter: str,
        attributes: Sequence[str],
        *,
        extended: bool,
        page_size: int | None,
        cookie: bytes | None,
    ) -> tuple[list[Entry], bytes | None]:
        controls = [(EXTENDED_DN_OID, True, EXTENDED_DN_VALUE)] if extended else None
        paging: dict[str, Any] = {}
        if page_size is not None:
            paging = {"paged_size": page_size, "paged_cookie": cookie}
        conn = self._run(
            lambda c: c.search(
                base,
                search_filter,
                search_scope=self._scopes[scope],
                attributes=list(attributes),
                controls=controls,
                **paging,
            )
        )
        entries = []
        for item in conn.response or ():
            if item.get("type") != "searchResEntry":
                continue
            raw = item.get("raw_attributes") or {}
            found = {str(name).lower(): list(values or ()) for name, values in raw.items()}
            entries.append(Entry(str(item.get("dn") or ""), found))
        next_cookie = None
        if page_size is not None:
            control = ((conn.result or {}).get("controls") or {}).get(PAGED_RESULTS_OID) or {}
            value = (control.get("value") or {}).get("cookie")
            next_cookie = bytes(value) if value else None
        return entries, next_cookie

    def send_add(self, dn: str, attributes: Mapping[str, Sequence[str]]) -> object:
        classes = next((list(v) for k, v in attributes.items() if k.lower() == "objectclass"), [])
        rest = {k: list(v) for k, v in attributes.items() if k.lower() != "objectclass"}
        try:
            self._run(lambda c: c.add(dn, classes, rest))
        except ClientFailure as failure:
            return _Failed(failure)
        return None

    def send_modify(self, dn: str, changes: Sequence[Change]) -> object:
        grouped: dict[str, list[tuple[str, list[str]]]] = {}
        for op, name, values in changes:
            grouped.setdefault(name, []).append((self._ops[op], list(values)))
        try:
            self._run(lambda c: c.modify(dn, grouped))
        except ClientFailure as failure:
            return _Failed(failure)
        return None

    def wait(self, token: object) -> None:
        """Raises what the request, carried out at send, failed with."""
        if isinstance(token, _Failed):
            raise token.failure

    def rename(self, dn: str, new_rdn: str, new_superior: str | None = None) -> None:
        self._run(lambda c: c.modify_dn(dn, new_rdn, delete_old_dn=True, new_superior=new_superior))

    def delete(self, dn: str) -> None:
        self._run(lambda c: c.delete(dn))

    def _run(self, send: Any) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            raise ConnectionFailed("connection closed")
        try:
            send(conn)
        except Exception as error:  # ldap3 raises more than LDAPException
            self._raise(error)
        self._check()
        return conn

    def _check(self) -> None:
        result = (self._conn.result if self._conn is not None else None) or {}
        code = int(result.get("result", 80))
        if code != 0:
            raise ResultError(code, self._endpoint.scrub(str(result.get("message") or "")))

    def _raise(self, error: Exception) -> NoReturn:
        from ldap3.core.exceptions import (
            LDAPCertificateError,
            LDAPCommunicationError,
            LDAPMaximumRetriesError,
            LDAPResponseTimeoutError,
            LDAPStartTLSError,
        )

        self.close()
        detail = self._endpoint.scrub(str(error)) or type(error).__name__
        if isinstance(error, (LDAPCertificateError, ssl.SSLCertVerificationError)):
            ca = self._endpoint.ca_file or "the system trust store"
            raise CertificateRejected(f"TLS certificate not trusted by {ca}: {detail}") from error
        unreachable = (
            LDAPCommunicationError,
            LDAPResponseTimeoutError,
            LDAPStartTLSError,
            LDAPMaximumRetriesError,
            OSError,
        )
        if isinstance(error, unreachable):
            raise ConnectionFailed(detail) from error
        raise ClientFailure(f"{type(error).__name__}: {detail}") from error
