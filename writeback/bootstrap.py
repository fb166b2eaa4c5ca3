"""The composition root: settings in, adapters and the pipeline out.

Every entry point (the CLI verbs, ``serve``, the Function app, the relay agent)
builds what it uses here and nowhere else, so every path gets the same
security defaults (TLS validation, the scope guard, credentials from the
settings only). Imports are local because the Graph SDK alone takes about a
second to import, which a cold start or ``--help`` should not pay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from writeback.config import (
    Credentials,
    GraphAuth,
    PipelineSettings,
    QueueKind,
    RelaySettings,
    Settings,
)
from writeback.errors import ConfigError

if TYPE_CHECKING:
    from writeback.adapters.directory import LdapDirectory, ObjectGuids
    from writeback.adapters.graph import GraphCloud, GraphReads
    from writeback.adapters.hybrid_connection import RelayEndpoint
    from writeback.adapters.local_queue import LocalQueue
    from writeback.adapters.relay import RelayDirectory
    from writeback.adapters.servicebus import ServiceBusQueue
    from writeback.adapters.thread_local import ThreadLocalDirectory
    from writeback.ports import MessageSender, StateStore
    from writeback.service.pipeline import Pipeline, PipelineConfig

#: How long a single-machine worker may hold a session before it is given back.
LOCAL_LOCK_DURATION = 300.0


# =========================================================================== the directory


def build_directory(
    settings: Settings, guids: ObjectGuids | None = None
) -> LdapDirectory | RelayDirectory:
    """AD as ``WRITEBACK_DIRECTORY`` says: over LDAP, or through the relay agent."""
    if settings.relay is not None:
        return build_relay_directory(settings.relay, settings.target_ou)
    return build_ldap_directory(settings, guids)


def directory_factory(settings: Settings) -> Callable[[], LdapDirectory | RelayDirectory]:
    """New adapters for a multi-threaded host's threads, sharing one set of
    objectGUID hints (each thread's own would miss whenever another thread
    read the group last)."""
    from writeback.adapters.directory import ObjectGuids

    guids = ObjectGuids()
    return lambda: build_directory(settings, guids)


def build_thread_local_directory(settings: Settings) -> ThreadLocalDirectory:
    """The directory for a multi-threaded host: one adapter (one LDAP connection) per
    thread, each opened on first use."""
    from writeback.adapters.thread_local import ThreadLocalDirectory

    return ThreadLocalDirectory(directory_factory(settings))


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


def build_ldap_directory(settings: Settings, guids: ObjectGuids | None = None) -> LdapDirectory:
    from writeback.adapters.directory import LdapDirectory

    return LdapDirectory(
        url=settings.ldap_url,
        user=settings.ldap_user,
        password=settings.ldap_password,
        target_ou=settings.target_ou,
        ca_file=settings.ldap_ca_file,
        chunk_size=settings.member_chunk,
        guids=guids,
    )


# =========================================================================== the cloud


def require_extra(extra: str, *modules: str) -> None:
    """Refuse with a clear message when an optional part of the install is missing.

    The core install (``pip install writeback``) is what the on-premises agent
    runs on; Graph, Service Bus and serve's metrics come with extras."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ModuleNotFoundError:  # its parent package is missing too
            return True

    missing = [name for name in modules if absent(name)]
    if missing:
        raise ConfigError(
            f"this needs the {extra} extra, which is not installed ({', '.join(missing)} "
            f"missing): pip install 'writeback[{extra}]'"
        )


def build_cloud(settings: Settings) -> GraphCloud:
    require_extra("graph", "msgraph", "azure.identity")
    from writeback.adapters.graph import GraphCloud

    return GraphCloud(
        base_url=settings.graph_url,
        credential=graph_credential(settings.graph_auth, settings.credentials),
        reads=graph_reads(settings),
    )


def graph_reads(settings: Settings) -> GraphReads:
    """What the Graph adapter reads beyond V1's, as the settings and rules ask."""
    from writeback.adapters.graph import GraphReads

    options = settings.mapping()
    return GraphReads(
        all_groups=options.wants_all_groups,
        nested=options.nesting,
        hide_from_address_lists=settings.hide_from_address_lists,
        writeback_configuration=settings.writeback_configuration,
        member_read_hidden=settings.reads_hidden_members,
    )


def graph_credential(auth: GraphAuth, credentials: Credentials) -> object | None:
    """An async azure-identity credential for the chosen mode (None for loopback tests)."""
    if auth is GraphAuth.NONE:
        return None
    from azure.identity import aio

    if auth is GraphAuth.MANAGED_IDENTITY:
        return aio.ManagedIdentityCredential(client_id=credentials.client_id)
    tenant, client = (
        credentials.required("AZURE_TENANT_ID"),
        credentials.required("AZURE_CLIENT_ID"),
    )
    if auth is GraphAuth.CLIENT_CERTIFICATE:
        return aio.CertificateCredential(
            tenant,
            client,
            certificate_path=credentials.required("AZURE_CLIENT_CERTIFICATE_PATH"),
        )
    return aio.ClientSecretCredential(tenant, client, credentials.required("AZURE_CLIENT_SECRET"))


def sync_credential(auth: GraphAuth, credentials: Credentials) -> Any:
    """A synchronous azure-identity credential (Service Bus's sync client needs one)."""
    if auth is GraphAuth.NONE:
        raise ConfigError(
            "Service Bus needs a credential: set WRITEBACK_SERVICEBUS_CONNECTION "
            "or a WRITEBACK_GRAPH_AUTH other than none"
        )
    import azure.identity

    if auth is GraphAuth.MANAGED_IDENTITY:
        return azure.identity.ManagedIdentityCredential(client_id=credentials.client_id)
    tenant, client = (
        credentials.required("AZURE_TENANT_ID"),
        credentials.required("AZURE_CLIENT_ID"),
    )
    if auth is GraphAuth.CLIENT_CERTIFICATE:
        return azure.identity.CertificateCredential(
            tenant,
            client,
            certificate_path=credentials.required("AZURE_CLIENT_CERTIFICATE_PATH"),
        )
    return azure.identity.ClientSecretCredential(
        tenant, client, credentials.required("AZURE_CLIENT_SECRET")
    )


# =========================================================================== the queue


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
    require_extra("functions", "azure.servicebus", "azure.identity")
    from writeback.adapters.servicebus import ServiceBusQueue

    client_options, admin_options = servicebus_options(pipeline)
    if pipeline.servicebus_connection:
        return ServiceBusQueue.from_connection_string(
            pipeline.servicebus_connection,
            pipeline.servicebus_queue,
            max_delivery_count=pipeline.max_delivery_count,
            client_options=client_options,
            admin_options=admin_options,
        )
    return ServiceBusQueue.from_namespace(
        _namespace(pipeline),
        pipeline.servicebus_queue,
        sync_credential(pipeline.graph_auth, pipeline.credentials),
        max_delivery_count=pipeline.max_delivery_count,
        client_options=client_options,
        admin_options=admin_options,
    )


def servicebus_options(pipeline: PipelineSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for the AMQP clients and the administration client:
    WRITEBACK_SERVICEBUS_ENDPOINT and WRITEBACK_SERVICEBUS_CA_FILE, as the SDK takes them."""
    client: dict[str, Any] = {}
    admin: dict[str, Any] = {}
    if pipeline.servicebus_endpoint:
        from azure.servicebus import TransportType

        client["custom_endpoint_address"] = pipeline.servicebus_endpoint
        # Named, or the SDK takes a custom endpoint for AMQP over WebSockets.
        client["transport_type"] = TransportType.Amqp
    if pipeline.servicebus_ca_file:
        client["connection_verify"] = admin["connection_verify"] = pipeline.servicebus_ca_file
    return client, admin


def servicebus_client(pipeline: PipelineSettings) -> Any:
    """A Service Bus client of our own (the Functions settlement sends copies with it)."""
    from azure.servicebus import ServiceBusClient

    from writeback.adapters.servicebus import translated_errors

    client_options, _ = servicebus_options(pipeline)
    with translated_errors("connect"):
        if pipeline.servicebus_connection:
            return ServiceBusClient.from_connection_string(
                pipeline.servicebus_connection, **client_options
            )
        return ServiceBusClient(
            _namespace(pipeline),
            sync_credential(pipeline.graph_auth, pipeline.credentials),
            **client_options,
        )


def _namespace(pipeline: PipelineSettings) -> str:
    if not pipeline.servicebus_namespace:
        raise ConfigError(
            "WRITEBACK_SERVICEBUS_NAMESPACE is not set (or set WRITEBACK_QUEUE=local)"
        )
    return pipeline.servicebus_namespace


# =========================================================================== state and pipeline


def build_state(pipeline: PipelineSettings) -> StateStore:
    """The state file WRITEBACK_STATE_PATH names, else state kept in memory."""
    from writeback.adapters.state import MemoryState, StateFile

    if pipeline.state_path:
        return StateFile(pipeline.state_path)
    return MemoryState()


def pipeline_config(settings: Settings, pipeline: PipelineSettings) -> PipelineConfig:
    """The pipeline's configuration, the same for both hosts."""
    from writeback.service.pipeline import PipelineConfig
    from writeback.service.reconcile import SyncPolicy

    return PipelineConfig(
        options=settings.mapping(),
        policy=SyncPolicy.from_settings(settings),
        reconcile_interval=float(pipeline.reconcile_interval),
        # Incremental reconcile needs its delta link kept between runs.
        incremental=pipeline.reconcile_incremental and pipeline.state_path is not None,
        full_every=pipeline.full_sync_every,
        notification_url=pipeline.notification_url,
        lifecycle_url=pipeline.lifecycle_url,
        client_state=pipeline.client_states[0] if pipeline.client_states else None,
        paused=pipeline.paused,
        settle=float(pipeline.settle_seconds),
    )


def build_pipeline(
    settings: Settings,
    pipeline: PipelineSettings,
    *,
    sender: MessageSender | None = None,
    **overrides: Any,
) -> Pipeline:
    """The pipeline with real adapters: Graph, the directory (per thread), the state;
    confirmations go to ``sender`` (the host's queue).

    ``overrides`` replace fields of the :class:`PipelineConfig` (a host's own knobs)."""
    from dataclasses import replace

    from writeback.service.pipeline import Pipeline

    cloud = build_cloud(settings)
    try:
        return Pipeline(
            cloud=cloud,
            directory=build_thread_local_directory(settings),
            config=replace(pipeline_config(settings, pipeline), **overrides),
            state=build_state(pipeline),
            sender=sender,
        )
    except BaseException:
        cloud.close()
        raise
