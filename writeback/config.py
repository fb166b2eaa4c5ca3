"""Settings from environment variables (the same names are Function app settings).

Everything is validated up front so a bad setting fails with a message that
names it, before any LDAP or Graph call. Secrets come only from the
environment (where Key Vault references land in Azure) and are kept out of
``repr`` so they cannot reach a log line or the CLI's output.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from typing import TypeVar
from urllib.parse import urlsplit

from writeback.domain.guard import (
    MEMBER_DENY_SETTING,
    PROTECTED_GROUPS_SETTING,
    GuardRules,
    canonical_sid,
    is_sid,
)
from writeback.domain.mapping import (
    DEFAULT_MEMBER_LIMIT,
    MAX_MEMBER_LIMIT,
    GroupType,
    MappingOptions,
    OutOfScope,
)
from writeback.domain.naming import DnFormat
from writeback.domain.rules import RulesError, RuleSet, parse_rules
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


class HiddenMembers(StrEnum):
    """Whether the Graph app holds Member.Read.Hidden (auto: its token's roles say)."""

    AUTO = "auto"
    TRUE = "true"
    FALSE = "false"


class DirectoryKind(StrEnum):
    """How AD is reached: over LDAP directly, or through the relay to the agent."""

    LDAP = "ldap"
    RELAY = "relay"


@dataclass(frozen=True)
class RelaySettings:
    """One side of the Hybrid Connection: which rule's key it uses, and the caller key.

    The cloud side holds a Send key, the agent a Listen key; both hold the caller
    key that signs every request (:mod:`writeback.agent_protocol`).
    """

    namespace: str
    path: str
    key_name: str
    key: str = field(repr=False)
    caller_key: str = field(repr=False)
    ca_file: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class Credentials:
    """The Entra app (or user-assigned identity) the Graph and Service Bus clients
    authenticate as: azure-identity's own variable names, read here like every
    other setting. Which ones are needed depends on ``WRITEBACK_GRAPH_AUTH``."""

    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    certificate_path: str | None = None

    def required(self, name: str) -> str:
        """One of them, or a ConfigError naming the variable (checked when used)."""
        value = {
            "AZURE_TENANT_ID": self.tenant_id,
            "AZURE_CLIENT_ID": self.client_id,
            "AZURE_CLIENT_SECRET": self.client_secret,
            "AZURE_CLIENT_CERTIFICATE_PATH": self.certificate_path,
        }[name]
        if not value:
            raise ConfigError(f"{name} is not set (needed by WRITEBACK_GRAPH_AUTH)")
        return value


def load_credentials(env: Mapping[str, str] | None = None) -> Credentials:
    env = os.environ if env is None else env
    return Credentials(
        tenant_id=env.get("AZURE_TENANT_ID", "").strip() or None,
        client_id=env.get("AZURE_CLIENT_ID", "").strip() or None,
        client_secret=env.get("AZURE_CLIENT_SECRET", "").strip() or None,
        certificate_path=env.get("AZURE_CLIENT_CERTIFICATE_PATH", "").strip() or None,
    )


def load_graph_auth(env: Mapping[str, str] | None = None) -> GraphAuth:
    """``WRITEBACK_GRAPH_AUTH`` alone (the queue tools need it without the rest)."""
    return _Reader(os.environ if env is None else env).choice(
        "WRITEBACK_GRAPH_AUTH", GraphAuth, GraphAuth.MANAGED_IDENTITY
    )


def load_directory_kind(env: Mapping[str, str] | None = None) -> DirectoryKind:
    return _Reader(os.environ if env is None else env).choice(
        "WRITEBACK_DIRECTORY", DirectoryKind, DirectoryKind.LDAP
    )


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
    directory: DirectoryKind = DirectoryKind.LDAP
    #: Set when ``directory`` is RELAY: the Send side of the Hybrid Connection.
    relay: RelaySettings | None = None
    credentials: Credentials = field(default_factory=Credentials)
    #: WRITEBACK_RULES: the scoping and placement rules; None is V1's scope.
    rules: RuleSet | None = field(default=None, compare=False)
    #: Without rules: write cloud security and mail-enabled security groups too.
    security_groups: bool = False
    out_of_scope: OutOfScope = OutOfScope.KEEP
    #: Read Graph's beta writebackConfiguration (rules that name it need this).
    writeback_configuration: bool = False
    hide_from_address_lists: bool = False
    member_read_hidden: HiddenMembers = HiddenMembers.AUTO
    #: The member guard's deny list and the nesting guard's extra protected groups
    #: (SIDs; domain/guard.py). On the agent, its own.
    member_deny: frozenset[str] = frozenset()
    protected_groups: frozenset[str] = frozenset()

    @property
    def guard_rules(self) -> GuardRules:
        return GuardRules(deny=self.member_deny, protected=self.protected_groups)

    def mapping(self, schema_attributes: frozenset[str] = frozenset()) -> MappingOptions:
        return MappingOptions(
            target_ou=self.target_ou,
            dn_format=self.dn_format,
            group_type=self.group_type,
            schema_attributes=schema_attributes,
            member_limit=self.member_limit,
            rules=self.rules,
            security_groups=self.security_groups,
            out_of_scope=self.out_of_scope,
            hide_from_address_lists=self.hide_from_address_lists,
        )

    @property
    def reads_hidden_members(self) -> bool | None:
        """The setting as the Graph adapter takes it (None: find out from the token)."""
        if self.member_read_hidden is HiddenMembers.AUTO:
            return None
        return self.member_read_hidden is HiddenMembers.TRUE


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting; raises ConfigError naming the first bad one."""
    env = os.environ if env is None else env
    reader = _Reader(env)
    directory = reader.choice("WRITEBACK_DIRECTORY", DirectoryKind, DirectoryKind.LDAP)
    relay = _relay(env, listen=False) if directory is DirectoryKind.RELAY else None
    # With the relay, the AD credential lives on the agent only.
    ldap_url, ldap_user, ldap_password, ldap_ca_file = (
        _ldap(env) if relay is None else ("", "", "", None)
    )
    settings = Settings(
        target_ou=reader.required("WRITEBACK_TARGET_OU"),
        ldap_url=ldap_url,
        ldap_user=ldap_user,
        ldap_password=ldap_password,
        ldap_ca_file=ldap_ca_file,
        directory=directory,
        relay=relay,
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
        credentials=load_credentials(env),
        security_groups=reader.boolean("WRITEBACK_SECURITY_GROUPS", default=False),
        out_of_scope=reader.choice("WRITEBACK_OUT_OF_SCOPE", OutOfScope, OutOfScope.KEEP),
        writeback_configuration=reader.boolean(
            "WRITEBACK_GRAPH_WRITEBACK_CONFIGURATION", default=False
        ),
        hide_from_address_lists=reader.boolean("WRITEBACK_HIDE_FROM_ADDRESS_LISTS", default=False),
        member_read_hidden=reader.choice(
            "WRITEBACK_MEMBER_READ_HIDDEN", HiddenMembers, HiddenMembers.AUTO
        ),
        member_deny=_sids(MEMBER_DENY_SETTING, env.get(MEMBER_DENY_SETTING, "")),
        protected_groups=_sids(PROTECTED_GROUPS_SETTING, env.get(PROTECTED_GROUPS_SETTING, "")),
    )
    _check_target_ou(settings.target_ou)
    _check_graph(settings.graph_url, settings.graph_auth)
    rules_path = env.get("WRITEBACK_RULES", "").strip()
    if rules_path:
        settings = replace(settings, rules=load_rules(rules_path, settings))
    return settings


def load_rules(path: str, settings: Settings) -> RuleSet:
    """The rules file ``path`` (WRITEBACK_RULES), checked: ConfigError naming the
    file and the line of the first problem."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError(f"WRITEBACK_RULES={path!r} cannot be read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"WRITEBACK_RULES={path!r} is not UTF-8 text") from None
    try:
        rules = parse_rules(
            text,
            target_ou=settings.target_ou,
            source=path,
            writeback_configuration=settings.writeback_configuration,
        )
    except RulesError as error:
        raise ConfigError(f"WRITEBACK_RULES={path!r} {error}") from None
    if settings.security_groups:
        raise ConfigError(
            "WRITEBACK_SECURITY_GROUPS is for deployments without a rules file; with "
            f"WRITEBACK_RULES={path!r} the rules' kinds decide which groups are written"
        )
    return rules


def _ldap(env: Mapping[str, str]) -> tuple[str, str, str, str | None]:
    """URL, user, password and CA file of the direct LDAP connection."""
    reader = _Reader(env)
    return (
        _ldap_url(reader.required("WRITEBACK_LDAP_URL")),
        reader.required("WRITEBACK_LDAP_USER"),
        reader.required("WRITEBACK_LDAP_PASSWORD"),
        _existing_file("WRITEBACK_LDAP_CA_FILE", env.get("WRITEBACK_LDAP_CA_FILE")),
    )


def _relay(env: Mapping[str, str], *, listen: bool) -> RelaySettings:
    """The relay settings of the cloud side (Send) or of the agent (``listen``)."""
    reader = _Reader(env)
    key_setting = "WRITEBACK_AGENT_LISTEN_KEY" if listen else "WRITEBACK_RELAY_SEND_KEY"
    namespace = reader.required("WRITEBACK_RELAY_NAMESPACE").removeprefix("sb://")
    namespace = namespace.removeprefix("https://").rstrip("/")
    caller_key = reader.required("WRITEBACK_RELAY_CALLER_KEY")
    if len(caller_key) < 32:  # 256 bits of base64 or more
        raise ConfigError("WRITEBACK_RELAY_CALLER_KEY must be at least 32 characters")
    return RelaySettings(
        namespace=namespace,
        path=reader.required("WRITEBACK_RELAY_PATH"),
        key_name=env.get(key_setting + "_NAME", "").strip() or ("listen" if listen else "send"),
        key=reader.required(key_setting),
        caller_key=caller_key,
        ca_file=_existing_file("WRITEBACK_RELAY_CA_FILE", env.get("WRITEBACK_RELAY_CA_FILE")),
        timeout=float(reader.integer("WRITEBACK_RELAY_TIMEOUT", 30, 1, 300)),
    )


@dataclass(frozen=True)
class AgentSettings:
    """The on-premises agent: direct LDAP settings, the Listen side of the relay,
    and its own limits."""

    directory: Settings
    relay: RelaySettings
    #: SQLite file for the request nonces and the delete budget (survive restarts).
    state_path: str = ""
    #: Domains the groups' mail and proxyAddresses may use (lower case).
    mail_domains: frozenset[str] = frozenset()
    delete_limit: int = 500
    concurrency: int = 4


def load_agent_settings(env: Mapping[str, str] | None = None) -> AgentSettings:
    """The agent always talks LDAP itself, whatever WRITEBACK_DIRECTORY says."""
    env = dict(os.environ if env is None else env)
    env["WRITEBACK_DIRECTORY"] = DirectoryKind.LDAP.value
    reader = _Reader(env)
    return AgentSettings(
        directory=load_settings(env),
        relay=_relay(env, listen=True),
        state_path=reader.required("WRITEBACK_AGENT_STATE_PATH"),
        mail_domains=_domains(reader.required("WRITEBACK_AGENT_MAIL_DOMAINS")),
        delete_limit=reader.integer("WRITEBACK_AGENT_DELETE_LIMIT", 500, 0, 10_000_000),
        concurrency=reader.integer("WRITEBACK_AGENT_CONCURRENCY", 4, 1, 64),
    )


def _sids(name: str, value: str) -> frozenset[str]:
    """A list of SIDs (commas, semicolons or spaces between them), upper case."""
    sids = frozenset(canonical_sid(s) for s in re.split(r"[,;\s]+", value) if s.strip())
    bad = sorted(s for s in sids if not is_sid(s))
    if bad:
        raise ConfigError(f"{name}: {', '.join(bad)} is not a SID (S-1-5-21-...)")
    return sids


def _domains(value: str) -> frozenset[str]:
    """A comma-separated list of mail domains, lower case."""
    domains = frozenset(d.strip().lower() for d in value.split(",") if d.strip())
    bad = sorted(d for d in domains if "@" in d or "." not in d or " " in d)
    if bad:
        raise ConfigError(f"WRITEBACK_AGENT_MAIL_DOMAINS: {', '.join(bad)} is not a domain")
    return domains


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


def _servicebus_endpoint(value: str | None) -> str | None:
    """``sb://host[:port]``, the form the SDK's ``custom_endpoint_address`` takes."""
    value = (value or "").strip()
    if not value:
        return None
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme.lower() != "sb" or not parts.hostname or port == -1 or parts.path.strip("/"):
        raise ConfigError(
            f"WRITEBACK_SERVICEBUS_ENDPOINT={value!r} must be sb://host or sb://host:port"
        )
    return value.rstrip("/")


def _check_target_ou(dn: str) -> None:
    """An OU of the domain's own, never a default container (domain/target.py says why)."""
    from writeback.domain.target import TargetRefused, check_target_ou

    try:
        check_target_ou(dn)
    except TargetRefused as refused:
        raise ConfigError(
            f"WRITEBACK_TARGET_OU={dn!r} {refused}; it must be the DN of an OU of your own, "
            "e.g. OU=M365 Groups,DC=corp,DC=example"
        ) from None


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


class Host(StrEnum):
    """Who reads the pipeline settings: the defaults differ, the names do not."""

    #: Single-machine mode: the local queue and a state file by default.
    SERVE = "serve"
    #: The Function app: Service Bus; state only where WRITEBACK_STATE_PATH says.
    FUNCTIONS = "functions"
    #: ``replay`` and ``status``: Service Bus when one is configured, else local.
    TOOL = "tool"


DEFAULT_STATE_PATH = "writeback-state.json"
DEFAULT_QUEUE_PATH = "writeback-queue.sqlite3"


@dataclass(frozen=True)
class PipelineSettings:
    """What the event path needs beyond :class:`Settings` (webhook, queue, timers)."""

    #: The clientState of our subscriptions; old values kept during a rotation.
    client_states: tuple[str, ...] = field(repr=False)
    queue: QueueKind = QueueKind.SERVICEBUS
    queue_path: str = DEFAULT_QUEUE_PATH
    servicebus_namespace: str | None = None
    servicebus_queue: str = "group-events"
    notification_url: str | None = None
    lifecycle_url: str | None = None
    #: The pause switch: events wait in the queue, nothing is written.
    paused: bool = False
    max_delivery_count: int = 100
    #: Single-machine mode (``serve``): full sync every so many seconds.
    reconcile_interval: int = 1800
    #: Single-machine mode: reconcile reads only what changed since the last run (the
    #: groups delta link), with a full sync every ``full_sync_every`` runs.
    reconcile_incremental: bool = True
    full_sync_every: int = 48
    #: Single-machine mode: subscription upkeep every so many seconds.
    subscription_interval: int = 6 * 3600
    #: JSON file with the last reconcile, its delta link, a pending reconcile request,
    #: the subscription and the pause switch; None keeps them in memory (a Function
    #: app without WRITEBACK_STATE_PATH: every reconcile is then a full sync).
    state_path: str | None = DEFAULT_STATE_PATH
    #: Single-machine mode: where the webhook listens (loopback by default).
    listen_address: str = "127.0.0.1"
    listen_port: int = 7071
    #: Single-machine mode: worker threads taking sessions from the queue. Four
    #: keep enough groups in flight to hide Graph's round trips (bench/pipeline).
    workers: int = 4
    #: Seconds between an event's read and its confirmation read; a group must stay
    #: gone this long before its object is deleted (Graph is eventually consistent).
    settle_seconds: int = 60
    #: Single-machine mode: the function-key-like ``?code=`` the webhook demands, if set
    #: (required when listening off loopback).
    webhook_key: str | None = field(default=None, repr=False)
    #: Single-machine mode: connections the webhook serves at once (one more: 503).
    max_connections: int = 64
    #: Connection string for Service Bus (the emulator, local tools) instead of a namespace.
    servicebus_connection: str | None = field(default=None, repr=False)
    #: PEM file of the CA that issued the namespace's certificate (an emulator's own
    #: CA); certificates are always validated, against the system store by default.
    servicebus_ca_file: str | None = None
    #: ``sb://host:port`` the AMQP connection goes to instead of the namespace's
    #: host (an emulator's AMQP port, an application gateway); the administration
    #: API keeps the namespace's endpoint.
    servicebus_endpoint: str | None = None
    #: How Service Bus is reached when no connection string is set.
    graph_auth: GraphAuth = GraphAuth.MANAGED_IDENTITY
    credentials: Credentials = field(default_factory=Credentials)


def load_pipeline_settings(
    env: Mapping[str, str] | None = None,
    *,
    require_client_state: bool = True,
    host: Host = Host.FUNCTIONS,
) -> PipelineSettings:
    """The event path's settings, with ``host``'s defaults. ``require_client_state=False``
    is for what only touches the queue (``replay``, ``status``, the trigger).

    The Service Bus trigger's identity-based connection is
    ``WRITEBACK_SERVICEBUS__fullyQualifiedNamespace`` (read by the Functions host);
    our own client uses ``WRITEBACK_SERVICEBUS_NAMESPACE`` and falls back to it, so
    the namespace is set once."""
    env = os.environ if env is None else env
    reader = _Reader(env)
    states = tuple(
        s
        for s in (env.get("WRITEBACK_CLIENT_STATE"), env.get("WRITEBACK_CLIENT_STATE_PREVIOUS"))
        if s
    )
    if not states and require_client_state:
        raise ConfigError("WRITEBACK_CLIENT_STATE is not set")
    if any(len(s) > 128 for s in states):
        raise ConfigError("WRITEBACK_CLIENT_STATE must be at most 128 characters (Graph's limit)")
    namespace = (
        env.get("WRITEBACK_SERVICEBUS_NAMESPACE")
        or env.get("WRITEBACK_SERVICEBUS__fullyQualifiedNamespace")
        or None
    )
    connection = env.get("WRITEBACK_SERVICEBUS_CONNECTION") or None
    default_queue = {
        Host.SERVE: QueueKind.LOCAL,
        Host.FUNCTIONS: QueueKind.SERVICEBUS,
        Host.TOOL: QueueKind.SERVICEBUS if namespace or connection else QueueKind.LOCAL,
    }[host]
    queue = reader.choice("WRITEBACK_QUEUE", QueueKind, default_queue)
    if queue is QueueKind.SERVICEBUS and not (namespace or connection):
        raise ConfigError(
            "WRITEBACK_SERVICEBUS_NAMESPACE is not set (or set WRITEBACK_QUEUE=local)"
        )
    webhook_key = env.get("WRITEBACK_WEBHOOK_KEY") or None
    if webhook_key is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{16,256}", webhook_key):
        raise ConfigError(
            "WRITEBACK_WEBHOOK_KEY must be 16 to 256 URL-safe characters (A-Z a-z 0-9 . _ ~ -)"
        )
    listen_address = env.get("WRITEBACK_LISTEN_ADDRESS", "").strip() or "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(listen_address).is_loopback
    except ValueError:
        raise ConfigError(
            f"WRITEBACK_LISTEN_ADDRESS={listen_address!r} is not an IP address"
        ) from None
    if host is Host.SERVE and not loopback and webhook_key is None:
        raise ConfigError(
            f"WRITEBACK_WEBHOOK_KEY must be set when WRITEBACK_LISTEN_ADDRESS={listen_address} "
            "is not a loopback address (anyone who can reach it could post to the webhook)"
        )
    return PipelineSettings(
        client_states=states,
        queue=queue,
        # Absolute, so the file a tool reads is the one serve writes whatever the cwd was.
        queue_path=os.path.abspath(env.get("WRITEBACK_QUEUE_PATH") or DEFAULT_QUEUE_PATH),
        servicebus_namespace=namespace,
        servicebus_queue=env.get("WRITEBACK_SERVICEBUS_QUEUE") or "group-events",
        notification_url=env.get("WRITEBACK_NOTIFICATION_URL") or None,
        lifecycle_url=env.get("WRITEBACK_LIFECYCLE_URL") or None,
        paused=reader.boolean("WRITEBACK_PAUSED", default=False),
        max_delivery_count=reader.integer("WRITEBACK_MAX_DELIVERY_COUNT", 100, 1, 2000),
        reconcile_interval=reader.integer("WRITEBACK_RECONCILE_INTERVAL", 1800, 60, 6 * 86400),
        reconcile_incremental=reader.boolean("WRITEBACK_RECONCILE_INCREMENTAL", default=True),
        full_sync_every=reader.integer("WRITEBACK_FULL_SYNC_EVERY", 48, 1, 10_000),
        subscription_interval=reader.integer(
            "WRITEBACK_SUBSCRIPTION_INTERVAL", 6 * 3600, 60, 7 * 86400
        ),
        state_path=env.get("WRITEBACK_STATE_PATH")
        or (None if host is Host.FUNCTIONS else DEFAULT_STATE_PATH),
        listen_address=listen_address,
        listen_port=reader.integer("WRITEBACK_LISTEN_PORT", 7071, 0, 65535),
        workers=reader.integer("WRITEBACK_WORKERS", 4, 1, 64),
        settle_seconds=reader.integer("WRITEBACK_SETTLE_SECONDS", 60, 1, 3600),
        webhook_key=webhook_key,
        max_connections=reader.integer("WRITEBACK_MAX_CONNECTIONS", 64, 1, 4096),
        servicebus_connection=connection,
        servicebus_ca_file=_existing_file(
            "WRITEBACK_SERVICEBUS_CA_FILE", env.get("WRITEBACK_SERVICEBUS_CA_FILE")
        ),
        servicebus_endpoint=_servicebus_endpoint(env.get("WRITEBACK_SERVICEBUS_ENDPOINT")),
        graph_auth=reader.choice("WRITEBACK_GRAPH_AUTH", GraphAuth, GraphAuth.MANAGED_IDENTITY),
        credentials=load_credentials(env),
    )


@dataclass(frozen=True)
class PermissionsSettings:
    """What ``permissions`` reads besides its arguments."""

    target_ou: str | None
    ldap_url: str | None
    ldap_ca_file: str | None


def load_permissions_settings(env: Mapping[str, str] | None = None) -> PermissionsSettings:
    env = os.environ if env is None else env
    return PermissionsSettings(
        target_ou=env.get("WRITEBACK_TARGET_OU", "").strip() or None,
        ldap_url=env.get("WRITEBACK_LDAP_URL", "").strip() or None,
        ldap_ca_file=env.get("WRITEBACK_LDAP_CA_FILE") or None,
    )


@dataclass(frozen=True)
class LoggingSettings:
    """How writeback logs: its level, whether the Functions host runs it (its worker's
    handler then carries the lines), and whether to export to Application Insights."""

    level: str = "INFO"
    under_functions_host: bool = False
    application_insights: bool = False


def load_logging_settings(env: Mapping[str, str] | None = None) -> LoggingSettings:
    env = os.environ if env is None else env
    return LoggingSettings(
        level=env.get("WRITEBACK_LOG_LEVEL", "").strip().upper() or "INFO",
        under_functions_host=bool(env.get("FUNCTIONS_WORKER_RUNTIME")),
        application_insights=bool(env.get("APPLICATIONINSIGHTS_CONNECTION_STRING")),
    )
