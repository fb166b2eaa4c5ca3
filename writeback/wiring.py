"""The composition root: settings in, real adapters out.

Entry points (CLI, Function app, single-machine mode) call these and nothing
else constructs adapters, so every path gets the same security defaults.
Imports are local because the Graph SDK alone takes about a second to import,
which a cold start or ``--help`` should not pay.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from writeback.config import GraphAuth, Settings
from writeback.errors import ConfigError

if TYPE_CHECKING:
    from writeback.adapters.directory import LdapDirectory
    from writeback.adapters.graph import GraphCloud


def build_directory(settings: Settings) -> LdapDirectory:
    from writeback.adapters.directory import LdapDirectory

    return LdapDirectory(
        url=settings.ldap_url,
        user=settings.ldap_user,
        password=settings.ldap_password,
        target_ou=settings.target_ou,
        ca_file=settings.ldap_ca_file,
        chunk_size=settings.member_chunk,
    )


def build_cloud(settings: Settings) -> GraphCloud:
    from writeback.adapters.graph import GraphCloud

    return GraphCloud(base_url=settings.graph_url, credential=graph_credential(settings.graph_auth))


def graph_credential(auth: GraphAuth) -> object | None:
    """An async azure-identity credential for the chosen mode (None for loopback tests).

    The ids and secrets are read by azure-identity from its usual variables
    (AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET,
    AZURE_CLIENT_CERTIFICATE_PATH), never copied into our settings.
    """
    if auth is GraphAuth.NONE:
        return None
    from azure.identity import aio

    if auth is GraphAuth.MANAGED_IDENTITY:
        return aio.ManagedIdentityCredential(client_id=os.environ.get("AZURE_CLIENT_ID"))
    tenant, client = _required("AZURE_TENANT_ID"), _required("AZURE_CLIENT_ID")
    if auth is GraphAuth.CLIENT_CERTIFICATE:
        return aio.CertificateCredential(
            tenant, client, certificate_path=_required("AZURE_CLIENT_CERTIFICATE_PATH")
        )
    return aio.ClientSecretCredential(tenant, client, _required("AZURE_CLIENT_SECRET"))


def _required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set (needed by WRITEBACK_GRAPH_AUTH)")
    return value
