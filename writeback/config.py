"""Settings from environment variables (the same names are Function app settings).

Everything is validated up front so a bad setting fails with a message that
names it, before any LDAP or Graph call. Secrets come only from the
environment (where Key Vault references land in Azure) and are kept out of
``repr`` so they cannot reach a log line or the CLI's output.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TypeVar
from urllib.parse import urlsplit

from writeback.domain.mapping import (
    DEFAULT_MEMBER_LIMIT,
    MAX_MEMBER_LIMIT,
    GroupType,
    MappingOptions,
)
from writeback.domain.naming import DnFormat
from writeback.errors import ConfigError

PUBLIC_GRAPH_URL = "https://graph.microsoft.com/v1.0"
_LOOPBACK_NAMES = frozenset({"localhost"})
E = TypeVar("E", bound=Enum)


class GraphAuth(StrEnum):
    MANAGED_IDENTITY = "managed-identity"
    CLIENT_CERTIFICATE = "client-certificate"
    CLIENT_SECRET = "client-secret"  # noqa: S105 - the auth mode's name, not a secret
    NONE = "none"


class SoftDeletePolicy(StrEnum):
    KEEP = "keep"
    DELETE = "delete"


@dataclass(frozen=True)
class Settings:
    target_ou: str
    ldap_url: str
    ldap_user: str
    ldap_password: str = field(repr=False)
    ldap_ca_file: str | None = None
    dn_format: DnFormat = DnFormat.OBJECT_ID
    group_type: GroupType = GroupType.DISTRIBUTION
    member_limit: int = DEFAULT_MEMBER_LIMIT
    delete_threshold: int = 500
    enabled: bool = True
    soft_delete: SoftDeletePolicy = SoftDeletePolicy.KEEP
    member_chunk: int = 5000
    graph_url: str = PUBLIC_GRAPH_URL
    graph_auth: GraphAuth = GraphAuth.MANAGED_IDENTITY

    def mapping(self, schema_attributes: frozenset[str] = frozenset()) -> MappingOptions:
        return MappingOptions(
            target_ou=self.target_ou,
            dn_format=self.dn_format,
            group_type=self.group_type,
            schema_attributes=schema_attributes,
            member_limit=self.member_limit,
        )


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting; raises ConfigError naming the first bad one."""
    env = os.environ if env is None else env
    reader = _Reader(env)
    settings = Settings(
        target_ou=reader.required("WRITEBACK_TARGET_OU"),
        ldap_url=_ldap_url(reader.required("WRITEBACK_LDAP_URL")),
        ldap_user=reader.required("WRITEBACK_LDAP_USER"),
        ldap_password=reader.required("WRITEBACK_LDAP_PASSWORD"),
        ldap_ca_file=_existing_file("WRITEBACK_LDAP_CA_FILE", env.get("WRITEBACK_LDAP_CA_FILE")),
        dn_format=reader.choice("WRITEBACK_DN_FORMAT", DnFormat, DnFormat.OBJECT_ID),
        group_type=reader.choice("WRITEBACK_GROUP_TYPE", GroupType, GroupType.DISTRIBUTION),
        member_limit=reader.integer(
            "WRITEBACK_MEMBER_LIMIT", DEFAULT_MEMBER_LIMIT, 1, MAX_MEMBER_LIMIT
        ),
        delete_threshold=reader.integer("WRITEBACK_DELETE_THRESHOLD", 500, 0, 10_000_000),
        enabled=reader.boolean("WRITEBACK_ENABLED", default=True),
        soft_delete=reader.choice("WRITEBACK_SOFT_DELETE", SoftDeletePolicy, SoftDeletePolicy.KEEP),
        member_chunk=reader.integer("WRITEBACK_MEMBER_CHUNK", 5000, 1, 50_000),
        graph_url=env.get("WRITEBACK_GRAPH_URL") or PUBLIC_GRAPH_URL,
        graph_auth=reader.choice("WRITEBACK_GRAPH_AUTH", GraphAuth, GraphAuth.MANAGED_IDENTITY),
    )
    _check_target_ou(settings.target_ou)
    _check_graph(settings.graph_url, settings.graph_auth)
    return settings


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def required(self, name: str) -> str:
        value = self._env.get(name, "").strip()
        if not value:
            raise ConfigError(f"{name} is not set")
        return value

    def choice(self, name: str, enum: type[E], default: E) -> E:
        raw = self._env.get(name, "").strip().lower()
        if not raw:
            return default
        try:
            return enum(raw)
        except ValueError:
            allowed = ", ".join(str(member.value) for member in enum)
            raise ConfigError(f"{name}={raw!r} is not one of: {allowed}") from None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._env.get(name, "").strip().replace("_", "")
        if not raw:
            return default
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise ConfigError(f"{name}={raw!r} must be a whole number from {low} to {high}")
        return int(raw)

    def boolean(self, name: str, *, default: bool) -> bool:
        raw = self._env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in {"true", "1", "yes", "on"}:
            return True
        if raw in {"false", "0", "no", "off"}:
            return False
        raise ConfigError(f"{name}={raw!r} must be true or false")


def _ldap_url(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in {"ldaps", "ldap"} or not urlsplit(url).hostname:
        raise ConfigError(
            "WRITEBACK_LDAP_URL must be ldaps://host[:port] or ldap://host[:port] "
            "(ldap:// always uses StartTLS)"
        )
    return url


def _existing_file(name: str, path: str | None) -> str | None:
    if not path:
        return None
    if not os.path.isfile(path):
        raise ConfigError(f"{name}={path!r} is not a readable file")
    return path


def _check_target_ou(dn: str) -> None:
    first = dn.split(",", 1)[0].strip().lower()
    if not (first.startswith("ou=") or first.startswith("cn=")) or "dc=" not in dn.lower():
        raise ConfigError(
            f"WRITEBACK_TARGET_OU={dn!r} must be the DN of an OU, e.g. OU=Groups,DC=corp,DC=example"
        )


def _check_graph(url: str, auth: GraphAuth) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise ConfigError(f"WRITEBACK_GRAPH_URL={url!r} is not an http(s) URL")
    loopback = _is_loopback(parts.hostname)
    if parts.scheme == "http" and not loopback:
        raise ConfigError("WRITEBACK_GRAPH_URL must use https unless it points at loopback")
    if auth is GraphAuth.NONE and not loopback:
        raise ConfigError("WRITEBACK_GRAPH_AUTH=none is accepted only for a loopback Graph URL")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class QueueKind(StrEnum):
    SERVICEBUS = "servicebus"
    LOCAL = "local"


@dataclass(frozen=True)
class PipelineSettings:
    """What the event path needs beyond :class:`Settings` (webhook, queue, timers)."""

    #: The clientState of our subscriptions; old values kept during a rotation.
    client_states: tuple[str, ...] = field(repr=False)
    queue: QueueKind = QueueKind.SERVICEBUS
    queue_path: str = "writeback-queue.sqlite3"
    servicebus_namespace: str | None = None
    servicebus_queue: str = "group-events"
    notification_url: str | None = None
    lifecycle_url: str | None = None
    #: The pause switch: events wait in the queue, nothing is written.
    paused: bool = False
    max_delivery_count: int = 100


def load_pipeline_settings(env: Mapping[str, str] | None = None) -> PipelineSettings:
    env = os.environ if env is None else env
    reader = _Reader(env)
    states = tuple(
        s
        for s in (env.get("WRITEBACK_CLIENT_STATE"), env.get("WRITEBACK_CLIENT_STATE_PREVIOUS"))
        if s
    )
    if not states:
        raise ConfigError("WRITEBACK_CLIENT_STATE is not set")
    if any(len(s) > 128 for s in states):
        raise ConfigError("WRITEBACK_CLIENT_STATE must be at most 128 characters (Graph's limit)")
    queue = reader.choice("WRITEBACK_QUEUE", QueueKind, QueueKind.SERVICEBUS)
    namespace = env.get("WRITEBACK_SERVICEBUS_NAMESPACE") or None
    if queue is QueueKind.SERVICEBUS and not namespace:
        raise ConfigError(
            "WRITEBACK_SERVICEBUS_NAMESPACE is not set (or set WRITEBACK_QUEUE=local)"
        )
    return PipelineSettings(
        client_states=states,
        queue=queue,
        queue_path=env.get("WRITEBACK_QUEUE_PATH") or "writeback-queue.sqlite3",
        servicebus_namespace=namespace,
        servicebus_queue=env.get("WRITEBACK_SERVICEBUS_QUEUE") or "group-events",
        notification_url=env.get("WRITEBACK_NOTIFICATION_URL") or None,
        lifecycle_url=env.get("WRITEBACK_LIFECYCLE_URL") or None,
        paused=reader.boolean("WRITEBACK_PAUSED", default=False),
        max_delivery_count=reader.integer("WRITEBACK_MAX_DELIVERY_COUNT", 100, 1, 2000),
    )
