"""The composition root: settings in, real adapters out.

Entry points (CLI, Function app, single-machine mode) call these and nothing
else constructs adapters, so every path gets the same security defaults.
Imports are local because the Graph SDK alone takes about a second to import,
which a cold start or ``--help`` should not pay.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from writeback.config import GraphAuth, PipelineSettings, QueueKind, RelaySettings, Settings
from writeback.errors import ConfigError

if TYPE_CHECKING:
    from writeback.adapters.directory import LdapDirectory
    from writeback.adapters.graph import GraphCloud
    from writeback.adapters.hybrid_connection import RelayEndpoint
    from writeback.adapters.local_queue import LocalQueue
    from writeback.adapters.relay import RelayDirectory
    from writeback.adapters.servicebus import ServiceBusQueue

#: How long a single-machine worker may hold a session before it is given back.
LOCAL_LOCK_DURATION = 300.0


def build_directory(settings: Settings) -> LdapDirectory | RelayDirectory:
    """AD as ``WRITEBACK_DIRECTORY`` says: over LDAP, or through the relay agent."""
    if settings.relay is not None:
        return build_relay_directory(settings.relay, settings.target_ou)
    return build_ldap_directory(settings)


def build_relay_directory(relay: RelaySettings, target_ou: str) -> RelayDirectory:
    from writeback.adapters.hybrid_connection import HybridConnectionSender
    from writeback.adapters.relay import RelayDirectory

    sender = HybridConnectionSender(
        relay_endpoint(relay), relay.key_name, relay.key, timeout=relay.timeout
    )
    return RelayDirectory(sender, relay.caller_key, target_ou=target_ou)


def relay_endpoint(relay: RelaySettings) -> RelayEndpoint:
    """Where both sides find the hybrid connection (the stand-in on loopback in tests)."""
    from writeback.adapters.hybrid_connection import RelayEndpoint

    return RelayEndpoint(namespace=relay.namespace, path=relay.path, ca_file=relay.ca_file)


def build_ldap_directory(settings: Settings) -> LdapDirectory:
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


def build_queue(pipeline: PipelineSettings) -> LocalQueue | ServiceBusQueue:
    """The event queue the settings name: the embedded SQLite queue or Service Bus.

    Service Bus is reached with ``WRITEBACK_SERVICEBUS_CONNECTION`` when set (the
    emulator, local tools), else at ``WRITEBACK_SERVICEBUS_NAMESPACE`` with the
    azure-identity credential of ``WRITEBACK_GRAPH_AUTH`` (a managed identity in
    Azure). Close the queue after use.
    """
    if pipeline.queue is QueueKind.LOCAL:
        from writeback.adapters.local_queue import LocalQueue

        return LocalQueue(
            pipeline.queue_path,
            lock_duration=LOCAL_LOCK_DURATION,
            max_delivery_count=pipeline.max_delivery_count,
        )
    from writeback.adapters.servicebus import ServiceBusQueue

    if pipeline.servicebus_connection:
        return ServiceBusQueue.from_connection_string(
            pipeline.servicebus_connection,
            pipeline.servicebus_queue,
            max_delivery_count=pipeline.max_delivery_count,
        )
    if not pipeline.servicebus_namespace:
        raise ConfigError(
            "WRITEBACK_SERVICEBUS_NAMESPACE is not set (or set WRITEBACK_QUEUE=local)"
        )
    auth = _graph_auth_from_env()
    return ServiceBusQueue.from_namespace(
        pipeline.servicebus_namespace,
        pipeline.servicebus_queue,
        sync_credential(auth),
        max_delivery_count=pipeline.max_delivery_count,
    )


def sync_credential(auth: GraphAuth) -> Any:
    """A synchronous azure-identity credential (Service Bus's sync client needs one)."""
    if auth is GraphAuth.NONE:
        raise ConfigError(
            "Service Bus needs a credential: set WRITEBACK_SERVICEBUS_CONNECTION "
            "or a WRITEBACK_GRAPH_AUTH other than none"
        )
    import azure.identity

    if auth is GraphAuth.MANAGED_IDENTITY:
        return azure.identity.ManagedIdentityCredential(client_id=os.environ.get("AZURE_CLIENT_ID"))
    tenant, client = _required("AZURE_TENANT_ID"), _required("AZURE_CLIENT_ID")
    if auth is GraphAuth.CLIENT_CERTIFICATE:
        return azure.identity.CertificateCredential(
            tenant, client, certificate_path=_required("AZURE_CLIENT_CERTIFICATE_PATH")
        )
    return azure.identity.ClientSecretCredential(tenant, client, _required("AZURE_CLIENT_SECRET"))


def _graph_auth_from_env() -> GraphAuth:
    raw = os.environ.get("WRITEBACK_GRAPH_AUTH", "").strip().lower()
    try:
        return GraphAuth(raw) if raw else GraphAuth.MANAGED_IDENTITY
    except ValueError:
        raise ConfigError(f"WRITEBACK_GRAPH_AUTH={raw!r} is not a known mode") from None
