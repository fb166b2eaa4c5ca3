"""Shared access signatures, as Service Bus checks them.

A token is ``SharedAccessSignature sr=<url-encoded resource URI>&sig=<signature>
&se=<expiry, Unix seconds>&skn=<rule name>``; the signature is HMAC-SHA256, keyed
with the rule's key, over the token's (encoded) ``sr``, a newline and ``se``. A
token covers its resource and everything below it, and grants what its rule has
(Manage implies Send and Listen). Tokens reach the broker over AMQP (a put-token
on ``$cbs``) or HTTP (the ``Authorization`` header of the administration API).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from writeback_sandbox.servicebus_emulator.model import BrokerError

MANAGE: Final = "Manage"
SEND: Final = "Send"
LISTEN: Final = "Listen"


@dataclass(frozen=True)
class SasRule:
    """A shared access policy of the namespace."""

    name: str
    key: str
    rights: frozenset[str]

    def grants(self, right: str) -> bool:
        return right in self.rights or MANAGE in self.rights


@dataclass(frozen=True)
class Grant:
    """What one accepted token allows: a resource (host/path, lower case) and rights."""

    resource: str
    rights: frozenset[str]
    expires_at: float

    def covers(self, host: str, path: str, right: str, now: float) -> bool:
        if now >= self.expires_at:
            return False
        if right not in self.rights and MANAGE not in self.rights:
            return False
        target = f"{host}/{path.strip('/')}".lower().rstrip("/")
        return target == self.resource or target.startswith(self.resource + "/")


def check_token(token: str, rules: dict[str, SasRule], host: str, now: float) -> Grant:
    """The grant a token carries, or BrokerError (401) for a token the namespace refuses."""
    scheme, _, rest = token.strip().partition(" ")
    fields = dict(part.split("=", 1) for part in rest.split("&") if "=" in part)
    if scheme != "SharedAccessSignature" or not {"sr", "sig", "se", "skn"} <= set(fields):
        raise _unauthorized("InvalidSignature: the token is not a shared access signature.")
    rule = rules.get(unquote(fields["skn"]))
    if rule is None:
        raise _unauthorized(f"InvalidSignature: no rule {unquote(fields['skn'])!r}.")
    signed = f"{fields['sr']}\n{fields['se']}".encode()
    expected = base64.b64encode(hmac.new(rule.key.encode(), signed, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, unquote(fields["sig"]).encode()):
        raise _unauthorized("InvalidSignature: the token's signature does not match.")
    try:
        expiry = float(fields["se"])
    except ValueError:
        raise _unauthorized("ExpiredToken: the token has no valid expiry.") from None
    if expiry <= now:
        raise _unauthorized("ExpiredToken: the token has expired.")
    resource = unquote(fields["sr"]).lower().split("://", 1)[-1].rstrip("/")
    authority, _, path = resource.partition("/")
    if authority.split(":", 1)[0] != host.lower():
        raise _unauthorized(f"InvalidAudience: the token is not for namespace {host}.")
    resource = host.lower() + (f"/{path}" if path else "")
    return Grant(resource, rule.rights, expiry)


def _unauthorized(text: str) -> BrokerError:
    return BrokerError("amqp:unauthorized-access", text, 401)


def require(grants: list[Grant], host: str, path: str, right: str, now: float) -> None:
    """Raise unless some grant covers ``path`` with ``right``."""
    if not any(grant.covers(host, path, right, now) for grant in grants):
        raise BrokerError(
            "amqp:unauthorized-access",
            f"Unauthorized access. '{right}' claim(s) are required to perform this operation. "
            f"Resource: 'sb://{host}/{path.strip('/')}'.",
            401,
        )
