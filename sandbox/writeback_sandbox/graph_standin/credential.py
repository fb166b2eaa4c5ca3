"""A token credential for the Graph stand-in: app-only tokens carrying chosen roles.

Graph decides what an application may read from the ``roles`` claim of its
access token (the application permissions an admin granted), and so does the
stand-in when a request carries one; writeback reads the same claim to learn
whether it holds ``Member.Read.Hidden``. This credential mints such tokens the
way azure-identity's credentials hand them out (``get_token`` returning an
``AccessToken``), so tests can run the real Graph client with an app that lacks
a permission. Differs from Entra ID: the tokens are unsigned JWTs (the stand-in
checks no signature) and never expire within a test.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any


def _segment(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def app_token(roles: Iterable[str], *, tenant_id: str = "", lifetime: int = 3600) -> str:
    """An unsigned app-only JWT with ``roles`` (the shape Entra issues, minus a signature)."""
    now = int(time.time())
    header = {"typ": "JWT", "alg": "none"}
    payload = {
        "aud": "https://graph.microsoft.com",
        "iss": f"https://sts.windows.net/{tenant_id}/",
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "idtyp": "app",
        "oid": str(uuid.uuid4()),
        "roles": sorted(set(roles)),
        "tid": tenant_id,
    }
    return f"{_segment(header)}.{_segment(payload)}."


class StandInCredential:
    """``get_token`` as azure-identity's sync credentials have it, for the stand-in."""

    def __init__(self, roles: Iterable[str], *, tenant_id: str = "") -> None:
        self.roles = frozenset(roles)
        self.tenant_id = tenant_id
        self.calls = 0

    def get_token(self, *scopes: str, **_: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.calls += 1
        token = app_token(self.roles, tenant_id=self.tenant_id)
        return AccessToken(token, int(time.time()) + 3600)
