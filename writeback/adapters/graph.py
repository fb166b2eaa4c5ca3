"""The cloud side: Microsoft Graph v1.0 through msgraph-sdk, behind a sync API.

``GraphCloud`` implements :class:`writeback.ports.CloudSource`. It makes only
these calls (application permissions ``Group.Read.All``, ``User.Read.All`` for
the users delta, and ``Member.Read.Hidden``, without which Graph silently
leaves the members of ``visibility=HiddenMembership`` groups out of every member
list: such groups are then marked ``members_hidden`` and never lose a member):

* ``GET /users/delta?$select=id,onPremisesSecurityIdentifier,onPremisesSyncEnabled``
* ``GET /groups/delta?$select=id,displayName,description,mail,mailNickname,
  proxyAddresses,groupTypes,visibility,members``
* ``GET /groups/{id}?$select=id,displayName,...,visibility``
* ``GET /groups/{id}/members/microsoft.graph.user?$select=id,onPremisesSecurityIdentifier,
  onPremisesSyncEnabled&$top=999`` (the SDK spells the cast ``graph.user``)
* ``GET /directory/deletedItems/microsoft.graph.group?$select=id&$top=999``
* per-group member deltas: ``GET /groups/delta?$filter=id eq '{id}'&$select=<as above,
  members>&$deltatoken=latest`` (a link as of now), then that link (only what changed
  since); ``GET /users?$filter=id in ('...')&$select=id,onPremisesSecurityIdentifier,
  onPremisesSyncEnabled`` for the SIDs of the members a delta names (15 ids a request,
  Graph's limit for one ``in``)
* ``GET /directory/deletedItems/{id}?$select=id`` for a group that answered 404
* only as :class:`GraphReads` asks: ``GET /groups/{id}/members/microsoft.graph.group
  ?$select=id`` and ``GET /groups/{id}/memberOf/microsoft.graph.group?$select=id``
  (nesting, beside a group's own reads); ``hideFromAddressLists`` in the ``$select``
  of ``GET /groups/{id}`` (Graph returns it on no other call); ``GET
  /beta/groups?$select=id,writebackConfiguration`` (a snapshot) or with ``$filter=id
  in (...)`` (the worker), the one property V2 migrants need that v1.0 lacks
* ``POST /$batch`` carrying up to 20 of the GETs above (JSON batching), for the
  batched reads :meth:`GraphCloud.get_groups`, :meth:`GraphCloud.group_deltas`
  and :meth:`GraphCloud.resolve_users`

and, to keep the change-notification subscription alive (same permission):

* ``POST /subscriptions``, ``GET /subscriptions``, ``PATCH /subscriptions/{id}``,
  ``POST /subscriptions/{id}/reauthorize``, ``DELETE /subscriptions/{id}``

Notes on the SDK that shaped this module:

* The SDK is async; this adapter owns one event loop in a daemon thread and
  runs every coroutine there, so the httpx client and an async credential stay
  on one loop.
* Requests are built by the SDK's request builders and sent through its
  adapter and middleware (auth, redirects, telemetry, ``ODataError`` mapping),
  but bodies are read as JSON, not as SDK models: model deserialisation costs
  about 12 ms per user or group (``Entity``'s field-deserialiser map runs some
  2,400 import statements per object), which would make a 100,000-user read
  take minutes. It would also put ``members@delta``/``@removed`` in
  ``additional_data`` with GUID strings turned into ``uuid.UUID``.
* Paging is followed by hand with ``with_url(next_link)``: msgraph-core's
  ``PageIterator`` loses ``@odata.deltaLink``.
* The SDK's ``RetryHandler`` is left out of the middleware: retries happen
  here, bounded by ``max_attempts`` and ``max_wait``, so they never multiply.
* Batched reads: the coroutines of one call (one per group, per page, per
  recycle-bin check) queue their GETs; what is queued within a few loop
  iterations goes out as ``POST /$batch`` requests of up to 20, all at once
  (a lone GET is sent on its own), through the same request adapter and
  middleware, so a call for 20 groups costs about two round trips instead of
  60. Each GET keeps its own retries: a step answered 429 waits its own
  ``Retry-After`` (Graph evaluates the steps of a batch one by one and expects
  the failed ones to be retried, concepts/throttling.md) and goes into a later
  batch; a batch that fails as a whole fails each of its steps, which retry
  together. msgraph-core's ``BatchRequestContent`` is not used: its modules
  import ``deprecated``, which msgraph-core 1.5 does not declare, and it
  deserialises the answers into models, which this module avoids (above).
* msgraph is imported lazily (``importlib``) in the constructor: importing it
  takes about a second, and keeping it out of mypy's import graph keeps type
  checking of the project fast (mypy would otherwise analyse the whole
  generated SDK, over a minute uncached). Its objects are ``Any`` here.

Errors come out as writeback's own types only: 429/503 ->
:class:`GraphThrottled` (``retry_after`` from ``Retry-After``), other 5xx,
timeouts and connection errors -> :class:`GraphUnavailable`, an expired delta
or skip token (410, ``syncStateNotFound``, ``resyncRequired``, 400
``Directory_ExpiredPageToken``) -> :class:`DeltaExpired`, other 4xx ->
:class:`GraphRefused`. A per-group delta link refused with any 4xx but 429 is
dropped (:meth:`GraphCloud.group_delta` answers None; the caller reads in full).
In a batched read these are each item's own result, so one group's failure
never fails the others. Messages name the operation, never a URL, token or secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import email.utils
import functools
import importlib
import inspect
import json
import logging
import random
import re
import threading
import time
import warnings
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.stop import stop_base

from writeback.domain.model import CloudGroup, CloudMember, MemberKind, WritebackConfiguration
from writeback.errors import (
    ConfigError,
    DeltaExpired,
    GraphNotFound,
    GraphRefused,
    GraphThrottled,
    GraphUnavailable,
    WritebackError,
)
from writeback.ports import (
    CloudSnapshot,
    GroupChanges,
    GroupDelta,
    GroupGone,
    GroupRead,
    Subscription,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

GRAPH_URL = "https://graph.microsoft.com/v1.0"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"

GROUP_SELECT = (
    "id",
    "displayName",
    "description",
    "mail",
    "mailNickname",
    "proxyAddresses",
    "groupTypes",
    "visibility",
    "securityEnabled",
    "mailEnabled",
    "onPremisesSyncEnabled",
    "isAssignableToRole",
)
#: Returned only by a GET of one group that names it in $select (Graph's rule).
HIDE_FROM_ADDRESS_LISTS = "hideFromAddressLists"
#: The beta-only property Entra Connect's group writeback V2 read.
_WRITEBACK_PROPERTY = "writebackConfiguration"
#: The application permission without which Graph leaves out the members of
#: HiddenMembership groups (silently: the list just comes back shorter).
MEMBER_READ_HIDDEN = "Member.Read.Hidden"
GROUP_DELTA_SELECT = (*GROUP_SELECT, "members")
USER_SELECT = ("id", "onPremisesSecurityIdentifier", "onPremisesSyncEnabled")
MAX_PAGE_SIZE = 999
_GROUP_SELECT_QUERY = ",".join(GROUP_SELECT)
_USER_SELECT_QUERY = ",".join(USER_SELECT)
#: Graph accepts at most 15 values in one ``in`` of a directory-object ``$filter``.
MAX_IN_VALUES = 15
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})

_MEMBER_KINDS = {
    "#microsoft.graph.user": MemberKind.USER,
    "#microsoft.graph.group": MemberKind.GROUP,
    "#microsoft.graph.device": MemberKind.DEVICE,
    "#microsoft.graph.orgcontact": MemberKind.CONTACT,
}
#: Graph error codes that mean "this delta/skip token is no longer usable".
_EXPIRED_TOKEN_CODES = frozenset(
    {"syncstatenotfound", "syncstateinvalid", "resyncrequired", "directory_expiredpagetoken"}
)
#: Graph takes at most 20 requests in one JSON batch.
MAX_BATCH = 20
#: Loop iterations a batch waits for more requests made at the same moment
#: (coroutines woken by one batch's answers submit their next request within these).
_GATHER_TICKS = 3
#: Seconds a batch of retried requests waits for the others retried at about the
#: same time (their waits end a little apart), so they go out together again.
_RETRY_GATHER = 0.005
_SECRETISH = re.compile(
    r"(?i)(\$?(?:skiptoken|deltatoken|code|sig|client_secret|access_token)=)[^&\s'\"]+"
    r"|(bearer\s+)[A-Za-z0-9._~+/=-]+"
)


@dataclass
class _GroupParts:
    """One group as assembled from its (possibly several) delta appearances."""

    fields: dict[str, Any] = field(default_factory=dict)
    members: dict[str, MemberKind] = field(default_factory=dict)
    removed: str | None = None


@dataclass(frozen=True)
class _Answer:
    """One request's answer, from a JSON batch or sent on its own: status,
    headers (lower-case names) and the body as JSON."""

    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass
class _Step:
    """A GET waiting to be sent: ``url`` relative to the version (batchable) or
    absolute (a link outside the base URL, sent on its own)."""

    url: str
    future: asyncio.Future[_Answer]
    retry: bool = False


@dataclass
class _Gathering:
    """The GETs one public call has queued for its next JSON batch.

    Each call gathers its own: calls made by different threads at about the
    same time would otherwise share batches and so finish together, which ties
    the workers into one rhythm (all reading Graph, then all writing to AD) and
    makes a small call wait for a large one's answers."""

    pending: list[_Step] = field(default_factory=list)
    flusher: asyncio.Future[None] | None = None


#: The gathering of the public call the running coroutine belongs to (its tasks
#: inherit it); set by ``GraphCloud._run`` on the loop thread.
_GATHERING: contextvars.ContextVar[_Gathering] = contextvars.ContextVar("graph_gathering")


async def _gathered(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` (one public call) with a gathering of its own."""
    _GATHERING.set(_Gathering())
    return await coroutine


#: Request builders reached on the way to the calls above; imported up front so
#: their import-time deprecation warnings are silenced in one place.
_BUILDER_MODULES = (
    "msgraph.generated.users.users_request_builder",
    "msgraph.generated.groups.groups_request_builder",
    "msgraph.generated.groups.item.members.members_request_builder",
    "msgraph.generated.groups.item.member_of.member_of_request_builder",
    "msgraph.generated.directory.directory_request_builder",
    "msgraph.generated.directory.deleted_items.deleted_items_request_builder",
    "msgraph.generated.directory.deleted_items.item.directory_object_item_request_builder",
)


class _Sdk:
    """The msgraph/kiota names this adapter uses, imported on first construction."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # msgraph's generated builders warn about their own deprecated
            # request-configuration classes while being imported.
            warnings.simplefilter("ignore", DeprecationWarning)
            self._load()
            for module in _BUILDER_MODULES:
                importlib.import_module(module)

    def _load(self) -> None:
        def load(module: str) -> Any:
            return importlib.import_module(module)

        self.httpx = load("httpx")
        self.APIError = load("kiota_abstractions.api_error").APIError
        self.AnonymousAuthenticationProvider = load(
            "kiota_abstractions.authentication"
        ).AnonymousAuthenticationProvider
        self.RequestConfiguration = load(
            "kiota_abstractions.base_request_configuration"
        ).RequestConfiguration
        self.RequestInformation = load("kiota_abstractions.request_information").RequestInformation
        self.Method = load("kiota_abstractions.method").Method
        self.KiotaClientFactory = load("kiota_http.kiota_client_factory").KiotaClientFactory
        self.RetryHandler = load("kiota_http.middleware").RetryHandler
        self.AzureIdentityAuthenticationProvider = load(
            "kiota_authentication_azure.azure_identity_authentication_provider"
        ).AzureIdentityAuthenticationProvider
        core = load("msgraph_core")
        self.APIVersion = core.APIVersion
        self.GraphClientFactory = core.GraphClientFactory
        core_middleware = load("msgraph_core.middleware")
        self.GraphTelemetryHandler = core_middleware.GraphTelemetryHandler
        self.GraphTelemetryHandlerOption = load(
            "msgraph_core.middleware.options"
        ).GraphTelemetryHandlerOption
        self.sdk_version = load("msgraph._version").VERSION
        self.GraphRequestAdapter = load("msgraph.graph_request_adapter").GraphRequestAdapter
        self.GraphServiceClient = load("msgraph.graph_service_client").GraphServiceClient
        self.ODataError = load("msgraph.generated.models.o_data_errors.o_data_error").ODataError
        self.GroupsDelta = load(
            "msgraph.generated.groups.delta.delta_request_builder"
        ).DeltaRequestBuilder
        self.Users = load("msgraph.generated.users.users_request_builder").UsersRequestBuilder
        self.UsersDelta = load(
            "msgraph.generated.users.delta.delta_request_builder"
        ).DeltaRequestBuilder
        self.GroupItem = load(
            "msgraph.generated.groups.item.group_item_request_builder"
        ).GroupItemRequestBuilder
        self.MemberUsers = load(
            "msgraph.generated.groups.item.members.graph_user.graph_user_request_builder"
        ).GraphUserRequestBuilder
        self.MemberGroups = load(
            "msgraph.generated.groups.item.members.graph_group.graph_group_request_builder"
        ).GraphGroupRequestBuilder
        self.MemberOfGroups = load(
            "msgraph.generated.groups.item.member_of.graph_group.graph_group_request_builder"
        ).GraphGroupRequestBuilder
        self.DeletedItem = load(
            "msgraph.generated.directory.deleted_items.item.directory_object_item_request_builder"
        ).DirectoryObjectItemRequestBuilder
        self.DeletedGroups = load(
            "msgraph.generated.directory.deleted_items.graph_group.graph_group_request_builder"
        ).GraphGroupRequestBuilder
        azure_exceptions = load("azure.core.exceptions")
        self.ClientAuthenticationError = azure_exceptions.ClientAuthenticationError
        self.AzureTransportErrors = (
            azure_exceptions.ServiceRequestError,
            azure_exceptions.ServiceResponseError,
        )


@dataclass(frozen=True)
class GraphReads:
    """What the reads include beyond V1's (each costs requests of its own, so each is
    asked for by a setting).

    ``all_groups``: the snapshot keeps security groups (not only Unified ones).
    ``nested``: a group read one by one (the worker, the incremental reconcile)
    lists its member groups and the groups it is a member of. ``hide_from_address_lists``:
    read ``hideFromAddressLists`` (one GET per mail-enabled group in a snapshot).
    ``writeback_configuration``: read ``writebackConfiguration`` from the beta
    endpoint. ``member_read_hidden``: whether the app holds Member.Read.Hidden;
    None reads it from the access token's ``roles`` claim (a token that cannot
    be read counts as without; no credential, the loopback stand-in, as with).
    """

    all_groups: bool = False
    nested: bool = False
    hide_from_address_lists: bool = False
    writeback_configuration: bool = False
    member_read_hidden: bool | None = None


class GraphCloud:
    """Read Microsoft 365 and security groups and their members from Graph (sync API)."""

    def __init__(
        self,
        *,
        base_url: str = GRAPH_URL,
        credential: object | None = None,
        timeout: float = 30.0,
        max_attempts: int = 6,
        max_wait: float = 60.0,
        backoff: float = 0.5,
        reads: GraphReads | None = None,
    ) -> None:
        """``credential`` is an azure-identity credential (sync or ``aio``), or
        None for no authentication (the loopback stand-in). An async credential
        is closed by :meth:`close`, on the loop it was used on. ``backoff`` is
        the first retry delay; it doubles per attempt, with jitter, and is
        raised to ``Retry-After`` when Graph sends one; no single wait exceeds
        ``max_wait``, and a ``Retry-After`` beyond ``max_wait`` is not waited
        out here but raised (as :class:`GraphThrottled` with ``retry_after``)
        so the caller can reschedule."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout <= 0 or max_wait < 0 or backoff < 0:
            raise ValueError("timeout must be positive; max_wait and backoff not negative")
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError("the Graph base URL must be an http(s) URL")
        if credential is not None and url.scheme != "https" and url.hostname not in _LOOPBACK:
            raise ConfigError("the Graph base URL must use https when a credential is used")
        self._reads = reads or GraphReads()
        self._beta_url = _beta_url(base_url) if self._reads.writeback_configuration else ""
        self._hidden_readable: bool | None = self._reads.member_read_hidden
        self._sdk = _Sdk()
        self._max_attempts = max_attempts
        self._max_wait = max_wait
        self._backoff = backoff
        self._credential = credential
        self._error_map = {"XXX": self._sdk.ODataError}
        self._closed = False
        self._close_lock = threading.Lock()

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="graph-cloud-loop", daemon=True)
        self._thread.start()
        try:
            self._http, self._adapter, self._client = self._run(
                self._build(base_url, credential, timeout)
            )
        except BaseException:
            self._stop_loop()
            raise

    # ----------------------------------------------------------------- set-up

    async def _build(
        self, base_url: str, credential: object | None, timeout: float
    ) -> tuple[Any, Any, Any]:
        sdk = self._sdk
        if credential is None:
            auth = sdk.AnonymousAuthenticationProvider()
        else:
            host = urlsplit(base_url).hostname or ""
            auth = sdk.AzureIdentityAuthenticationProvider(
                credential, scopes=[GRAPH_SCOPE], allowed_hosts=[host] if host else []
            )
        # The SDK's default middleware minus RetryHandler (we retry ourselves),
        # plus Graph's telemetry header; redirects, parameter-name decoding and
        # the user agent stay as the SDK sets them. httpx handles gzip itself.
        middleware = [
            handler
            for handler in sdk.KiotaClientFactory.get_default_middleware(None)
            if not isinstance(handler, sdk.RetryHandler)
        ]
        telemetry = sdk.GraphTelemetryHandlerOption(
            api_version=sdk.APIVersion.v1, sdk_version=sdk.sdk_version
        )
        middleware.append(sdk.GraphTelemetryHandler(options=telemetry))
        http = sdk.httpx.AsyncClient(
            timeout=sdk.httpx.Timeout(timeout), http2=True, follow_redirects=False
        )
        http = sdk.GraphClientFactory.create_with_custom_middleware(middleware, client=http)
        adapter = sdk.GraphRequestAdapter(auth, client=http)
        adapter.base_url = base_url.rstrip("/")  # before the client freezes it
        return http, adapter, sdk.GraphServiceClient(request_adapter=adapter)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("GraphCloud's sync API called from its own event loop")
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("GraphCloud is closed")
        return asyncio.run_coroutine_threadsafe(_gathered(coroutine), self._loop).result()

    # ----------------------------------------------------------------- public API

    def snapshot(self) -> CloudSnapshot:
        """Every Unified group with members resolved, from full delta rounds."""
        self._check_open()
        return self._run(self._snapshot())

    def get_group(self, group_id: str) -> CloudGroup | None:
        """One group with its user members, or None when Graph has no such live
        group. Non-Unified groups are returned too (check ``is_unified``).

        Members come from the users-only cast, so nested groups, devices and
        contacts do not appear here (they do in :meth:`snapshot`)."""
        self._check_open()
        if not group_id:
            return None
        if self._reads != GraphReads(all_groups=self._reads.all_groups):
            # What V1 never read comes with the batched read (and its extras).
            read = self._run(self._get_groups([group_id]))[group_id]
            if isinstance(read, WritebackError):
                raise read
            return read if isinstance(read, CloudGroup) else None
        return self._run(self._get_group(group_id))

    def get_groups(self, group_ids: Sequence[str]) -> dict[str, GroupRead]:
        """Each group as :meth:`get_group` reads it, many at once: every group's
        properties, user-member pages and (after a 404) its recycle-bin entry go
        out in JSON batches of up to 20 requests, sent concurrently, so 20
        groups cost about two round trips. One group's 404 is
        :class:`GroupGone` (``soft_deleted`` from ``GET
        /directory/deletedItems/{id}``); an error that outlasts its retries is
        that group's entry only. Every id is in the result."""
        self._check_open()
        ids = list(dict.fromkeys(group_ids))
        if not ids:
            return {}
        return self._run(self._get_groups(ids))

    def soft_deleted_group_ids(self) -> frozenset[str]:
        """Ids of the groups in the recycle bin (deleted, restorable for 30 days)."""
        self._check_open()
        return self._run(self._soft_deleted())

    def group_changes(self, delta_link: str) -> GroupChanges:
        """What changed since ``delta_link`` (from a snapshot or an earlier call).

        Raises :class:`DeltaExpired` when Graph no longer knows the token."""
        self._check_open()
        return self._run(self._group_changes(delta_link))

    def group_delta_link(self, group_id: str) -> str | None:
        """A delta link for just this group, as of now (``$deltatoken=latest``:
        nothing is read). Later :meth:`group_delta` calls with it report only
        what changed for the group since."""
        self._check_open()
        return self._run(self._group_delta_link(group_id))

    def group_delta_links(self, group_ids: Sequence[str]) -> dict[str, str | WritebackError]:
        """:meth:`group_delta_link` for many groups, in JSON batches; a group whose
        answer carried no link, or failed, has the error as its entry."""
        self._check_open()
        ids = list(dict.fromkeys(group_ids))
        if not ids:
            return {}
        return self._run(self._group_delta_links(ids))

    def group_delta(self, group_id: str, delta_link: str) -> GroupDelta | None:
        """The group's properties now plus its member changes since ``delta_link``
        (the group read and the delta round run concurrently). None when Graph
        refuses the link (any 4xx but 429: expired, unknown, or anything else):
        the caller reads the group in full instead."""
        self._check_open()
        try:
            return self._run(self._group_delta(group_id, delta_link))
        except DeltaExpired as error:
            log.info(
                "group %s: Graph refused its delta link (%s); a full read follows", group_id, error
            )
            return None

    def group_deltas(
        self, links: Mapping[str, str]
    ) -> dict[str, GroupDelta | WritebackError | None]:
        """:meth:`group_delta` for many groups at once (the groups' reads and the
        delta pages go out in JSON batches, concurrently). None for a link Graph
        refuses with any 4xx but 429 (expired, unknown, or anything else: the
        caller reads that group in full); one group's error is its own entry."""
        self._check_open()
        if not links:
            return {}
        return self._run(self._group_deltas(dict(links)))

    def resolve_users(self, user_ids: Iterable[str]) -> dict[str, CloudMember]:
        """SID and sync state of the existing users among ``user_ids``, by
        ``GET /users?$filter=id in (...)`` (15 ids a request, Graph's limit for
        one ``in``), the requests in JSON batches of 20, run concurrently."""
        self._check_open()
        ids = list(dict.fromkeys(i for i in user_ids if i))
        if not ids:
            return {}
        return self._run(self._resolve_users(ids))

    # ----------------------------------------------------------------- subscriptions

    def create_subscription(
        self,
        notification_url: str,
        lifecycle_url: str | None,
        client_state: str,
        expiration: datetime,
        *,
        resource: str = "groups",
        change_type: str = "updated,deleted",
    ) -> Subscription:
        """Subscribe ``notification_url`` to changes of ``resource``.

        Graph validates both URLs (the handshake) before answering. Retried
        like every call: a create retried after a timeout may leave a second
        subscription behind, which :func:`ensure_subscription` removes."""
        self._check_open()
        model = _subscription_model()(
            change_type=change_type,
            notification_url=notification_url,
            lifecycle_notification_url=lifecycle_url,
            resource=resource,
            expiration_date_time=_utc(expiration),
            client_state=client_state,
        )
        return self._run(self._create_subscription(model))

    def list_subscriptions(self) -> list[Subscription]:
        """Every subscription this application has in the tenant."""
        self._check_open()
        return self._run(self._list_subscriptions())

    def renew_subscription(self, subscription_id: str, expiration: datetime) -> Subscription:
        """Move the expiry (this also reauthorizes). :class:`GraphNotFound` when gone."""
        self._check_open()
        model = _subscription_model()(expiration_date_time=_utc(expiration))
        return self._run(self._renew_subscription(subscription_id, model))

    def reauthorize_subscription(self, subscription_id: str) -> None:
        """Answer a ``reauthorizationRequired`` lifecycle event."""
        self._check_open()
        self._run(self._reauthorize_subscription(subscription_id))

    def delete_subscription(self, subscription_id: str) -> None:
        """Delete a subscription; :class:`GraphNotFound` when it does not exist."""
        self._check_open()
        self._run(self._delete_subscription(subscription_id))

    def close(self) -> None:
        """Close the HTTP client (and an async credential), stop the loop thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), self._loop).result(timeout=10)
        except Exception as error:  # closing is best effort
            log.debug("closing the Graph client failed: %s", type(error).__name__)
        finally:
            self._stop_loop()

    def __enter__(self) -> GraphCloud:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("GraphCloud is closed")

    async def _aclose(self) -> None:
        await self._http.aclose()
        close = getattr(self._credential, "close", None)
        if close is not None and inspect.iscoroutinefunction(close):
            await close()

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    # ----------------------------------------------------------------- reads

    def _query(self, parameters: Any, *, select: Iterable[str], top: int | None = None) -> Any:
        query = parameters(select=list(select))
        if top is not None:
            query.top = top
        return self._sdk.RequestConfiguration(query_parameters=query)

    async def _get_json(
        self,
        what: str,
        builder: Any,
        config: Any = None,
        *,
        delta: bool = False,
        link: bool = False,
    ) -> dict[str, Any]:
        """GET through the SDK's request builder and pipeline; the body as JSON.

        The SDK's model deserialisation is bypassed on purpose: it runs about
        2,400 import statements per directory object (``Entity`` field
        deserialisers), some 12 ms per user or group, which would make a
        100,000-user read take minutes. Errors still go through the SDK's
        ``ODataError`` mapping."""

        def request() -> Awaitable[Any]:
            info = builder.to_get_request_information(config)
            sent: Awaitable[Any] = self._adapter.send_primitive_async(
                info, "bytes", self._error_map
            )
            return sent

        raw = await self._call(what, request, delta=delta, link=link)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise GraphUnavailable(f"Graph {what} returned a body that is not JSON") from None
        if not isinstance(body, dict):
            raise GraphUnavailable(f"Graph {what} returned an unexpected JSON document")
        return body

    async def _pages(
        self,
        what: str,
        builder: Any,
        config: Any = None,
        *,
        delta: bool = False,
        link: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        """The first page and every page after it through ``@odata.nextLink``."""
        page = await self._get_json(what, builder, config, delta=delta, link=link)
        while True:
            yield page
            next_link = page.get("@odata.nextLink")
            if not next_link:
                return
            builder = builder.with_url(str(next_link))
            page = await self._get_json(what, builder, delta=delta, link=link)

    async def _snapshot(self) -> CloudSnapshot:
        for attempt in (1, 2):
            try:
                (users, users_link), (parts, groups_link), soft_deleted = await _all(
                    self._read_users(),
                    self._read_groups(),
                    self._soft_deleted(),
                )
            except DeltaExpired:
                # A skip token expired in the middle of a full round: start over once.
                if attempt == 2:
                    raise
                log.warning("Graph delta paging token expired during a full read; restarting")
                continue
            hidden_ok = await self._can_read_hidden()
            shared: dict[tuple[str, MemberKind], CloudMember] = {}
            everything = [
                _to_group(group_id, part, users, hidden_ok=hidden_ok, shared=shared)
                for group_id, part in parts.items()
                if part.removed is None
            ]
            groups = [g for g in everything if self._reads.all_groups or g.is_unified]
            return CloudSnapshot(
                groups=tuple(await self._with_extras(groups, listed=True)),
                soft_deleted=soft_deleted,
                groups_delta_link=groups_link,
                users_delta_link=users_link,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_users(self) -> tuple[dict[str, tuple[str | None, bool]], str | None]:
        users: dict[str, tuple[str | None, bool]] = {}
        config = self._query(
            self._sdk.UsersDelta.DeltaRequestBuilderGetQueryParameters, select=USER_SELECT
        )
        delta_link: str | None = None
        async for page in self._pages("users delta", self._client.users.delta, config, delta=True):
            for item in _items(page):
                user_id = _opt_str(item.get("id"))
                if user_id is None:
                    continue
                if item.get("@removed") is not None:
                    users.pop(user_id, None)
                    continue
                users[user_id] = _user_facts(item)
            delta_link = _opt_str(page.get("@odata.deltaLink"))
        return users, delta_link

    async def _read_groups(self) -> tuple[dict[str, _GroupParts], str | None]:
        config = self._query(
            self._sdk.GroupsDelta.DeltaRequestBuilderGetQueryParameters, select=GROUP_DELTA_SELECT
        )
        return await self._follow_groups(self._client.groups.delta, config)

    async def _follow_groups(
        self, builder: Any, config: Any = None
    ) -> tuple[dict[str, _GroupParts], str | None]:
        parts: dict[str, _GroupParts] = {}
        delta_link: str | None = None
        async for page in self._pages("groups delta", builder, config, delta=True):
            for item in _items(page):
                group_id = _opt_str(item.get("id"))
                if group_id is not None:
                    _merge(parts.setdefault(group_id, _GroupParts()), item)
            delta_link = _opt_str(page.get("@odata.deltaLink"))
        return parts, delta_link

    async def _group_changes(self, delta_link: str) -> GroupChanges:
        parts, link = await self._follow_groups(self._client.groups.delta.with_url(delta_link))
        return GroupChanges(
            changed=tuple(gid for gid, part in parts.items() if part.removed is None),
            soft_deleted=frozenset(g for g, p in parts.items() if p.removed == "changed"),
            hard_deleted=frozenset(
                g for g, p in parts.items() if p.removed not in (None, "changed")
            ),
            delta_link=link,
        )

    def _group_delta_url(self, group_id: str) -> str:
        base = str(self._adapter.base_url).rstrip("/")
        clause = quote(f"id eq '{_odata_quote(group_id)}'", safe="'")
        select = ",".join(GROUP_DELTA_SELECT)
        return f"{base}/groups/delta?$filter={clause}&$select={select}&$deltatoken=latest"

    async def _group_delta_link(self, group_id: str) -> str | None:
        builder = self._client.groups.delta.with_url(self._group_delta_url(group_id))
        page = await self._get_json("group delta link", builder, delta=True)
        return _opt_str(page.get("@odata.deltaLink"))

    async def _group_delta_links(self, ids: list[str]) -> dict[str, str | WritebackError]:
        async def one(group_id: str) -> str | WritebackError:
            try:
                url = self._relative(self._group_delta_url(group_id))
                page = await self._batched_get("group delta link", url, delta=True)
            except WritebackError as error:
                return error
            link = _opt_str(page.get("@odata.deltaLink"))
            if link is None:
                return GraphUnavailable("Graph answered a group delta link request without one")
            return link

        links = await asyncio.gather(*(one(group_id) for group_id in ids))
        return dict(zip(ids, links, strict=True))

    async def _group_delta(self, group_id: str, delta_link: str) -> GroupDelta:
        sdk = self._sdk
        config = self._query(
            sdk.GroupItem.GroupItemRequestBuilderGetQueryParameters, select=GROUP_SELECT
        )

        async def read_group() -> dict[str, Any] | None:
            try:
                return await self._get_json(
                    "get group", self._client.groups.by_group_id(group_id), config
                )
            except GraphNotFound:
                return None

        async def read_delta() -> _DeltaRead:
            added: dict[str, MemberKind] = {}
            removed: dict[str, MemberKind] = {}
            gone = False
            link: str | None = None
            builder = self._client.groups.delta.with_url(delta_link)
            async for page in self._pages("group delta", builder, delta=True, link=True):
                for item in _items(page):
                    if _opt_str(item.get("id")) != group_id:
                        continue
                    if item.get("@removed") is not None:
                        gone = True
                        continue
                    _fold_members(item, added, removed)
                link = _opt_str(page.get("@odata.deltaLink")) or link
            return added, removed, gone, link

        body, delta = await _all(read_group(), read_delta())
        return await self._delta_answer(group_id, body, delta)

    async def _get_group(self, group_id: str) -> CloudGroup | None:
        sdk = self._sdk
        item = self._client.groups.by_group_id(group_id)
        config = self._query(
            sdk.GroupItem.GroupItemRequestBuilderGetQueryParameters, select=GROUP_SELECT
        )
        members_config = self._query(
            sdk.MemberUsers.GraphUserRequestBuilderGetQueryParameters,
            select=USER_SELECT,
            top=MAX_PAGE_SIZE,
        )
        members: dict[str, CloudMember] = {}
        try:
            body = await self._get_json("get group", item, config)
            pages = self._pages("list group members", item.members.graph_user, members_config)
            async for page in pages:
                for user in _items(page):
                    user_id = _opt_str(user.get("id"))
                    if user_id is not None:
                        sid, synced = _user_facts(user)
                        members[user_id] = CloudMember(
                            user_id, MemberKind.USER, sid=sid, synced=synced
                        )
        except GraphNotFound:
            return None
        part = _GroupParts()
        _merge(part, body)
        group_id = _opt_str(body.get("id")) or group_id
        return _to_group(
            group_id,
            part,
            {},
            members=tuple(members.values()),
            hidden_ok=await self._can_read_hidden(),
        )

    async def _soft_deleted(self) -> frozenset[str]:
        config = self._query(
            self._sdk.DeletedGroups.GraphGroupRequestBuilderGetQueryParameters,
            select=("id",),
            top=MAX_PAGE_SIZE,
        )
        ids: set[str] = set()
        builder = self._client.directory.deleted_items.graph_group
        async for page in self._pages("list deleted groups", builder, config):
            ids.update(i for i in (_opt_str(item.get("id")) for item in _items(page)) if i)
        return frozenset(ids)

    # ----------------------------------------------------------------- batched reads

    async def _get_groups(self, ids: list[str]) -> dict[str, GroupRead]:
        reads = await asyncio.gather(*(self._read_group(group_id) for group_id in ids))
        result: dict[str, GroupRead] = dict(zip(ids, reads, strict=True))
        groups = [read for read in reads if isinstance(read, CloudGroup)]
        if groups and self._reads.writeback_configuration:
            try:
                extended = await self._with_extras(groups, listed=False, hide_read=True)
            except WritebackError as error:
                return {gid: error if isinstance(r, CloudGroup) else r for gid, r in result.items()}
            result.update((g.id, g) for g in extended)
        return result

    async def _read_group(self, group_id: str) -> GroupRead:
        """One group's properties and user members through the batcher (with
        ``nested``, its member groups and the groups it is in too); on a 404 its
        recycle-bin entry. Errors are returned, not raised."""
        if not group_id:
            return GroupGone(soft_deleted=False)
        steps = [
            ("get group", _group_url(group_id, self._group_select())),
            ("list group members", _members_url(group_id)),
        ]
        if self._reads.nested:
            steps.extend(self._nesting_steps(group_id))
        first = await self._batched_gets(steps)
        if any(isinstance(result, GraphNotFound) for result in first):
            return await self._gone(group_id)
        for result in first:
            if isinstance(result, BaseException):
                if isinstance(result, WritebackError):
                    return result
                raise result
        body = first[0]
        assert isinstance(body, dict)
        try:
            members, parents = await self._members_and_parents(first[1:])
        except GraphNotFound:
            return await self._gone(group_id)
        except WritebackError as error:
            return error
        part = _GroupParts()
        _merge(part, body)
        group = _to_group(
            _opt_str(body.get("id")) or group_id,
            part,
            {},
            members=tuple(members.values()),
            hidden_ok=await self._can_read_hidden(),
        )
        return replace(group, member_of=tuple(parents))

    async def _members_and_parents(
        self, first: Sequence[object]
    ) -> tuple[dict[str, CloudMember], list[str]]:
        """The user members from their first page on (and with ``nested`` the member
        groups and the groups it is in), following every next page."""
        users_page = first[0]
        assert isinstance(users_page, dict)
        members: dict[str, CloudMember] = {}
        async for page in self._batched_pages("list group members", users_page):
            for user in _items(page):
                user_id = _opt_str(user.get("id"))
                if user_id is not None:
                    sid, synced = _user_facts(user)
                    members[user_id] = CloudMember(user_id, MemberKind.USER, sid=sid, synced=synced)
        if not self._reads.nested:
            return members, []
        groups_page, parents_page = first[1], first[2]
        assert isinstance(groups_page, dict) and isinstance(parents_page, dict)
        for member_id in await self._ids_of("list member groups", groups_page):
            members[member_id] = CloudMember(member_id, MemberKind.GROUP)
        return members, await self._ids_of("list groups it is a member of", parents_page)

    def _group_select(self) -> tuple[str, ...]:
        """A single group's $select: with hideFromAddressLists when asked for (Graph
        returns it only this way)."""
        if self._reads.hide_from_address_lists:
            return (*GROUP_SELECT, HIDE_FROM_ADDRESS_LISTS)
        return GROUP_SELECT

    def _nesting_steps(self, group_id: str) -> list[tuple[str, str]]:
        """The first pages of a group's member groups and of the groups it is a
        direct member of (ids only), as (what, url) for :meth:`_batched_gets`."""
        return [
            ("list member groups", _member_groups_url(group_id)),
            ("list groups it is a member of", _member_of_url(group_id)),
        ]

    async def _ids_of(self, what: str, first: dict[str, Any]) -> list[str]:
        ids: list[str] = []
        async for page in self._batched_pages(what, first):
            ids.extend(i for i in (_opt_str(item.get("id")) for item in _items(page)) if i)
        return ids

    # ----------------------------------------------------------------- what V1 never read

    async def _can_read_hidden(self) -> bool:
        """Whether Graph shows this app the members of HiddenMembership groups: the
        setting, else the ``roles`` claim of the app's access token (decoded, not
        verified: it is our own token, read only to know what Graph will do)."""
        if self._hidden_readable is not None:
            return self._hidden_readable
        credential = self._credential
        if credential is None:
            self._hidden_readable = True  # the loopback stand-in: it shows what it is told
            return True
        try:
            token = credential.get_token(GRAPH_SCOPE)  # type: ignore[attr-defined]
            if inspect.isawaitable(token):
                token = await token
            roles = token_roles(str(token.token))
        except Exception as error:  # any failure to get or read it: not proven held
            log.warning(
                "could not read the app's roles from its Graph token (%s): members of "
                "HiddenMembership groups are added but never removed; set "
                "WRITEBACK_MEMBER_READ_HIDDEN=true once %s is granted",
                type(error).__name__,
                MEMBER_READ_HIDDEN,
            )
            roles = None
        self._hidden_readable = roles is not None and MEMBER_READ_HIDDEN in roles
        if roles is not None and not self._hidden_readable:
            log.warning(
                "the Graph application lacks %s: members of HiddenMembership groups are "
                "added but never removed (Graph leaves them out of member lists)",
                MEMBER_READ_HIDDEN,
            )
        return self._hidden_readable

    async def _with_extras(
        self, groups: list[CloudGroup], *, listed: bool, hide_read: bool = False
    ) -> list[CloudGroup]:
        """``groups`` with what costs requests of its own, when asked for:
        hideFromAddressLists (a GET of each mail-enabled group, unless ``hide_read``:
        the group's own GET carried it) and the beta writebackConfiguration (the
        whole list when ``listed``, else by id)."""
        wants_hide = self._reads.hide_from_address_lists and not hide_read
        if not groups or not (wants_hide or self._reads.writeback_configuration):
            return groups
        hide: dict[str, bool | None] = {}
        configs: dict[str, WritebackConfiguration] = {}
        jobs: list[Coroutine[Any, Any, None]] = []
        if wants_hide:
            mailed = [g.id for g in groups if g.is_unified or g.mail_enabled]

            async def read_hide() -> None:
                hide.update(await self._hide_from_address_lists(mailed))

            jobs.append(read_hide())
        if self._reads.writeback_configuration:

            async def read_configs() -> None:
                ids = None if listed else [g.id for g in groups]
                configs.update(await self._writeback_configurations(ids))

            jobs.append(read_configs())
        await _all(*jobs)
        return [
            replace(
                g,
                hide_from_address_lists=hide.get(g.id, g.hide_from_address_lists),
                writeback=configs.get(g.id, g.writeback),
            )
            for g in groups
        ]

    async def _hide_from_address_lists(self, ids: list[str]) -> dict[str, bool | None]:
        """``hideFromAddressLists`` of each group, one batched GET per group."""

        async def one(group_id: str) -> bool | None:
            url = _group_url(group_id, ("id", HIDE_FROM_ADDRESS_LISTS))
            try:
                body = await self._batched_get("get group hideFromAddressLists", url)
            except GraphNotFound:
                return None
            value = body.get(HIDE_FROM_ADDRESS_LISTS)
            return value if isinstance(value, bool) else None

        found = await _all(*(one(group_id) for group_id in ids))
        return dict(zip(ids, found, strict=True))

    async def _writeback_configurations(
        self, ids: list[str] | None
    ) -> dict[str, WritebackConfiguration]:
        """``writebackConfiguration`` from the beta endpoint: every group's (paged
        list) or those of ``ids`` (``$filter=id in (...)``, 15 ids a request)."""
        select = f"$select=id,{_WRITEBACK_PROPERTY}"
        urls: list[str]
        if ids is None:
            urls = [f"{self._beta_url}/groups?{select}&$top={MAX_PAGE_SIZE}"]
        else:
            urls = []
            for start in range(0, len(ids), MAX_IN_VALUES):
                chunk = ids[start : start + MAX_IN_VALUES]
                quoted = ",".join(f"'{_odata_quote(i)}'" for i in chunk)
                clause = quote(f"id in ({quoted})", safe="'(),")
                urls.append(f"{self._beta_url}/groups?$filter={clause}&{select}")

        async def one(url: str) -> dict[str, WritebackConfiguration]:
            found: dict[str, WritebackConfiguration] = {}
            builder = self._client.groups.with_url(url)
            async for page in self._pages("list groups writebackConfiguration (beta)", builder):
                for item in _items(page):
                    group_id = _opt_str(item.get("id"))
                    if group_id is not None:
                        found[group_id] = _writeback_configuration(item.get(_WRITEBACK_PROPERTY))
            return found

        merged: dict[str, WritebackConfiguration] = {}
        for part in await _all(*(one(url) for url in urls)):
            merged.update(part)
        return merged

    async def _gone(self, group_id: str) -> GroupGone | WritebackError:
        """A group Graph answered 404 for: is it in the recycle bin?"""
        try:
            body = await self._batched_get(
                "get deleted group", f"/directory/deletedItems/{_segment(group_id)}?$select=id"
            )
        except GraphNotFound:
            return GroupGone(soft_deleted=False)
        except WritebackError as error:
            return error
        odata_type = str(body.get("@odata.type") or "#microsoft.graph.group").lower()
        return GroupGone(soft_deleted=odata_type == "#microsoft.graph.group")

    async def _group_deltas(
        self, links: dict[str, str]
    ) -> dict[str, GroupDelta | WritebackError | None]:
        ids = list(links)
        reads = await asyncio.gather(*(self._read_delta(gid, links[gid]) for gid in ids))
        return dict(zip(ids, reads, strict=True))

    async def _read_delta(
        self, group_id: str, delta_link: str
    ) -> GroupDelta | WritebackError | None:
        """:meth:`_group_delta` through the batcher; a refused link is None."""

        async def read_group() -> dict[str, Any] | None:
            try:
                return await self._batched_get("get group", _group_url(group_id))
            except GraphNotFound:
                return None

        async def read_delta() -> _DeltaRead:
            added: dict[str, MemberKind] = {}
            removed: dict[str, MemberKind] = {}
            gone = False
            link: str | None = None
            first = await self._batched_get(
                "group delta", self._relative(delta_link), delta=True, link=True
            )
            async for page in self._batched_pages("group delta", first, delta=True, link=True):
                for entry in _items(page):
                    if _opt_str(entry.get("id")) != group_id:
                        continue
                    if entry.get("@removed") is not None:
                        gone = True
                        continue
                    _fold_members(entry, added, removed)
                link = _opt_str(page.get("@odata.deltaLink")) or link
            return added, removed, gone, link

        group_read, delta_read = await asyncio.gather(
            read_group(), read_delta(), return_exceptions=True
        )
        if isinstance(delta_read, DeltaExpired):
            log.info(
                "group %s: Graph refused its delta link (%s); a full read follows",
                group_id,
                delta_read,
            )
            return None
        for result in (group_read, delta_read):
            if isinstance(result, BaseException):
                if isinstance(result, WritebackError):
                    return result
                raise result
        assert not isinstance(group_read, BaseException)
        assert not isinstance(delta_read, BaseException)
        return await self._delta_answer(group_id, group_read, delta_read)

    async def _delta_answer(
        self, group_id: str, body: dict[str, Any] | None, delta: _DeltaRead
    ) -> GroupDelta:
        """A group's properties and its member delta, as one answer."""
        added, removed, gone, link = delta
        group: CloudGroup | None = None
        if body is not None and not gone:
            part = _GroupParts()
            _merge(part, body)
            group = _to_group(
                group_id, part, {}, members=(), hidden_ok=await self._can_read_hidden()
            )
        return GroupDelta(
            group=group,
            added=tuple(CloudMember(m, kind) for m, kind in added.items()),
            removed=tuple(CloudMember(m, kind) for m, kind in sorted(removed.items())),
            delta_link=link,
        )

    async def _resolve_users(self, ids: list[str]) -> dict[str, CloudMember]:
        chunks = [ids[i : i + MAX_IN_VALUES] for i in range(0, len(ids), MAX_IN_VALUES)]
        found: dict[str, CloudMember] = {}
        for page in await _all(*(self._users_by_id(chunk) for chunk in chunks)):
            found.update(page)
        return found

    async def _users_by_id(self, ids: list[str]) -> dict[str, CloudMember]:
        quoted = ",".join(f"'{_odata_quote(i)}'" for i in ids)
        clause = quote(f"id in ({quoted})", safe="'(),")
        url = f"/users?$filter={clause}&$select={_USER_SELECT_QUERY}&$top={MAX_PAGE_SIZE}"
        first = await self._batched_get("list users by id", url)
        found: dict[str, CloudMember] = {}
        async for page in self._batched_pages("list users by id", first):
            for item in _items(page):
                user_id = _opt_str(item.get("id"))
                if user_id is not None:
                    sid, synced = _user_facts(item)
                    found[user_id] = CloudMember(user_id, MemberKind.USER, sid=sid, synced=synced)
        return found

    async def _batched_pages(
        self, what: str, page: dict[str, Any], *, delta: bool = False, link: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """``page`` and every page after it, each next page through the batcher."""
        while True:
            yield page
            next_link = page.get("@odata.nextLink")
            if not next_link:
                return
            page = await self._batched_get(
                what, self._relative(str(next_link)), delta=delta, link=link
            )

    async def _batched_gets(self, steps: Sequence[tuple[str, str]]) -> list[object]:
        """GET each ``(what, url)`` in the next JSON batch; the answers in order,
        each the JSON or its error (returned, not raised), as :meth:`_batched_get`
        would give them. The GETs are queued at once and awaited as futures, with
        no task or retry state of their own; only a step that did not succeed goes
        on to :meth:`_batched_get`, its answer counting as the first attempt."""
        futures = [self._submit(url) for _, url in steps]
        try:
            if futures:
                await asyncio.wait(futures)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()  # not sent, or its answer dropped
            raise
        results: list[object] = []
        retried: dict[int, Coroutine[Any, Any, dict[str, Any]]] = {}
        for n, ((what, url), future) in enumerate(zip(steps, futures, strict=True)):
            answer = None if future.cancelled() or future.exception() else future.result()
            if answer is not None and 200 <= answer.status < 300 and isinstance(answer.body, dict):
                results.append(answer.body)
            else:
                results.append(None)
                retried[n] = self._batched_get(what, url, first=future)
        if retried:
            again = await asyncio.gather(*retried.values(), return_exceptions=True)
            for n, result in zip(retried, again, strict=True):
                results[n] = result
        return results

    async def _batched_get(
        self,
        what: str,
        url: str,
        *,
        delta: bool = False,
        link: bool = False,
        first: asyncio.Future[_Answer] | None = None,
    ) -> dict[str, Any]:
        """GET ``url`` (relative to the version) in the next JSON batch, with the
        same bounded retries as a request sent alone: a step answered 429 waits
        its own ``Retry-After`` and goes into a later batch; the answer as JSON.
        ``first``: the first attempt's answer, already asked for."""

        attempts = 0

        async def request() -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            if attempts == 1 and first is not None:
                answer = await first
            else:
                answer = await self._submit(url, retry=attempts > 1)
            if 200 <= answer.status < 300:
                if not isinstance(answer.body, dict):
                    raise GraphUnavailable(f"Graph {what} returned an unexpected JSON document")
                return answer.body
            code, message = _body_error(answer.body)
            retry_after = _parse_retry_after(answer.headers.get("retry-after"))
            raise _map_status(
                answer.status, code, message, retry_after, what, delta=delta, link=link
            )

        result: dict[str, Any] = await self._call(what, request, delta=delta, link=link)
        return result

    def _submit(self, url: str, *, retry: bool = False) -> asyncio.Future[_Answer]:
        """Queue one GET for the calling public call's next batch (on the loop thread)."""
        future: asyncio.Future[_Answer] = self._loop.create_future()
        gathering = _GATHERING.get()  # every coroutine that reads runs under _run
        gathering.pending.append(_Step(url, future, retry))
        if gathering.flusher is None:
            gathering.flusher = asyncio.ensure_future(self._flush_soon(gathering))
        return future

    async def _flush_soon(self, gathering: _Gathering) -> None:
        """Send what the call queued, after a few loop iterations in which its
        other coroutines woken at the same moment queue theirs: in batches of 20,
        all at once; a lone request (or one outside the base URL) is sent alone."""
        try:
            for _ in range(_GATHER_TICKS):
                await asyncio.sleep(0)
            if any(step.retry for step in gathering.pending):
                await asyncio.sleep(_RETRY_GATHER)
        finally:
            gathering.flusher = None
        steps, gathering.pending = gathering.pending, []
        steps = [step for step in steps if not step.future.done()]
        alone = [step for step in steps if not step.url.startswith("/")]
        batchable = [step for step in steps if step.url.startswith("/")]
        chunks = [batchable[i : i + MAX_BATCH] for i in range(0, len(batchable), MAX_BATCH)]
        alone.extend(chunk[0] for chunk in chunks if len(chunk) == 1)
        sends = [self._send_alone(step) for step in alone]
        sends.extend(self._send_batch(chunk) for chunk in chunks if len(chunk) > 1)
        await asyncio.gather(*sends)

    async def _send_alone(self, step: _Step) -> None:
        sdk = self._sdk
        info = sdk.RequestInformation(sdk.Method.GET)
        base = str(self._adapter.base_url).rstrip("/")
        info.url = base + step.url if step.url.startswith("/") else step.url
        info.headers.try_add("Accept", "application/json")
        try:
            raw = await self._adapter.send_primitive_async(info, "bytes", self._error_map)
        except sdk.APIError as error:
            code, message = _odata_error(error)
            headers = _lower_headers(error.response_headers)
            body = {"error": {"code": code, "message": message}}
            _settle(step, _Answer(int(error.response_status_code or 0), headers, body))
            return
        except asyncio.CancelledError:
            step.future.cancel()
            raise
        except Exception as error:
            _fail((step,), self._map_error(error, "batched read") or error)
            return
        _settle(step, _Answer(200, {}, _json_or_none(raw)))

    async def _send_batch(self, steps: list[_Step]) -> None:
        """One ``POST /$batch`` through the SDK's adapter and middleware (auth,
        telemetry); each step's answer to its future. A failure of the batch
        itself (throttled, unreachable) is every step's failure, retried by each."""
        sdk = self._sdk
        payload = {
            "requests": [
                {"id": str(n), "method": "GET", "url": step.url} for n, step in enumerate(steps)
            ]
        }
        info = sdk.RequestInformation(sdk.Method.POST, "{+baseurl}/$batch")
        info.headers.try_add("Accept", "application/json")
        info.set_stream_content(json.dumps(payload).encode("utf-8"), "application/json")
        try:
            raw = await self._adapter.send_primitive_async(info, "bytes", self._error_map)
        except asyncio.CancelledError:
            for step in steps:
                step.future.cancel()
            raise
        except Exception as error:
            _fail(steps, self._map_error(error, "batch") or error)
            return
        document = _json_or_none(raw)
        responses = document.get("responses") if isinstance(document, dict) else None
        if not isinstance(responses, list):
            _fail(steps, GraphUnavailable("Graph batch returned an unexpected JSON document"))
            return
        by_id = {str(r.get("id")).lower(): r for r in responses if isinstance(r, Mapping)}
        for n, step in enumerate(steps):
            found = by_id.get(str(n))
            if found is None:
                _fail((step,), GraphUnavailable("Graph batch returned no answer for a request"))
                continue
            lowered = _lower_headers(found.get("headers"))
            try:
                status = int(found.get("status") or 0)
            except (TypeError, ValueError):
                status = 0
            _settle(step, _Answer(status, lowered, _step_body(found.get("body"))))

    def _relative(self, link: str) -> str:
        """A link Graph returned (next or delta link) relative to the version, for
        a batch; unchanged when it points outside the base URL (sent alone)."""
        base, target = urlsplit(str(self._adapter.base_url).rstrip("/")), urlsplit(link)
        same_origin = (target.scheme, target.netloc.lower()) == (base.scheme, base.netloc.lower())
        if not same_origin or not target.path.startswith(base.path + "/"):
            return link
        relative = target.path[len(base.path) :]
        return f"{relative}?{target.query}" if target.query else relative

    async def _create_subscription(self, model: Any) -> Subscription:
        builder = self._client.subscriptions
        body = await self._send_json(
            "create subscription", lambda: builder.to_post_request_information(model)
        )
        return _to_subscription(body, "create subscription")

    async def _list_subscriptions(self) -> list[Subscription]:
        found: list[Subscription] = []
        async for page in self._pages("list subscriptions", self._client.subscriptions):
            found.extend(_to_subscription(item, "list subscriptions") for item in _items(page))
        return found

    async def _renew_subscription(self, subscription_id: str, model: Any) -> Subscription:
        builder = self._client.subscriptions.by_subscription_id(subscription_id)
        body = await self._send_json(
            "renew subscription", lambda: builder.to_patch_request_information(model)
        )
        return _to_subscription(body, "renew subscription")

    async def _reauthorize_subscription(self, subscription_id: str) -> None:
        builder = self._client.subscriptions.by_subscription_id(subscription_id).reauthorize
        await self._send_no_content("reauthorize subscription", builder.to_post_request_information)

    async def _delete_subscription(self, subscription_id: str) -> None:
        builder = self._client.subscriptions.by_subscription_id(subscription_id)
        await self._send_no_content("delete subscription", builder.to_delete_request_information)

    async def _send_json(self, what: str, build: Callable[[], Any]) -> dict[str, Any]:
        """Send a request built by ``build`` (a request builder's ``to_*_request_information``)
        through the SDK's pipeline; the answer as JSON."""

        def request() -> Awaitable[Any]:
            sent: Awaitable[Any] = self._adapter.send_primitive_async(
                build(), "bytes", self._error_map
            )
            return sent

        raw = await self._call(what, request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise GraphUnavailable(f"Graph {what} returned a body that is not JSON") from None
        if not isinstance(body, dict):
            raise GraphUnavailable(f"Graph {what} returned an unexpected JSON document")
        return body

    async def _send_no_content(self, what: str, build: Callable[[], Any]) -> None:
        """Like :meth:`_send_json` for calls answered with 204 No Content."""

        async def request() -> bool:
            await self._adapter.send_no_response_content_async(build(), self._error_map)
            return True

        await self._call(what, request)

    # ----------------------------------------------------------------- calls

    async def _call(
        self,
        what: str,
        request: Callable[[], Awaitable[Any]],
        *,
        delta: bool = False,
        link: bool = False,
    ) -> Any:
        """One Graph request with bounded retries of transient faults; the
        answer, or the mapped error after the last attempt.

        The first attempt runs outside tenacity: building its retry state costs
        more than a batched step's answer (a ``threading.local`` and inspection of
        every callback), and nearly every request succeeds first time. A failure
        is handed to tenacity as its first attempt, without being sent again, so
        the waits, stops and log lines are tenacity's from then on."""

        async def attempt() -> Any:
            try:
                result = await request()
            except Exception as error:
                mapped = self._map_error(error, what, delta=delta, link=link)
                if mapped is None:
                    raise
                raise mapped from None
            if result is None:
                raise GraphUnavailable(f"Graph {what} returned an empty response")
            return result

        try:
            return await attempt()
        except GraphUnavailable as error:
            first: GraphUnavailable | None = error
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts) | _RetryAfterBeyond(self._max_wait),
            wait=self._wait,
            retry=retry_if_exception_type(GraphUnavailable),
            before_sleep=self._log_retry,
            reraise=True,
            sleep=asyncio.sleep,
        )
        async for state in retrying:
            with state:
                if first is not None:
                    failed, first = first, None
                    raise failed
                return await attempt()
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, state: RetryCallState) -> float:
        # Exponential with jitter: backoff * 2**(n-1) plus up to one backoff of noise.
        # The noise is drawn per failure, not per waiter: the steps of a batch that
        # failed as a whole share one exception, wait alike and go out together again.
        exponent = min(state.attempt_number - 1, 30)
        failure = state.outcome.exception() if state.outcome is not None else None
        noise = random.Random(id(failure)).uniform(0, self._backoff)
        backoff = self._backoff * 2.0**exponent + noise
        retry_after = _retry_after_of(state)
        return min(max(backoff, retry_after or 0.0), self._max_wait)

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s; attempt %d, retrying in %.2f s", error, state.attempt_number, delay)

    def _map_error(
        self, error: Exception, what: str, *, delta: bool = False, link: bool = False
    ) -> Exception | None:
        sdk = self._sdk
        if isinstance(error, sdk.APIError):
            return _map_api_error(error, what, delta=delta, link=link)
        if isinstance(error, sdk.httpx.TimeoutException):
            return GraphUnavailable(f"Graph {what} timed out ({type(error).__name__})")
        if isinstance(error, sdk.httpx.TransportError):
            return GraphUnavailable(
                f"Graph {what} failed: {type(error).__name__}: {_scrub(str(error))}"
            )
        if isinstance(error, sdk.ClientAuthenticationError):
            return GraphRefused(
                f"Graph {what}: could not get a token: {_scrub(_first_line(error))}"
            )
        if isinstance(error, sdk.AzureTransportErrors):
            return GraphUnavailable(
                f"Graph {what}: token service unreachable: {type(error).__name__}"
            )
        return None


# --------------------------------------------------------------------------- helpers


class _RetryAfterBeyond(stop_base):
    """Stop when Graph asks for a longer pause than we are willing to wait."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, retry_state: RetryCallState) -> bool:
        retry_after = _retry_after_of(retry_state)
        return retry_after is not None and retry_after > self.limit


#: A member delta read: members added and removed (id → kind), whether the group
#: itself is gone, and the next delta link.
_DeltaRead = tuple[dict[str, MemberKind], dict[str, MemberKind], bool, str | None]


async def _all(*coroutines: Coroutine[Any, Any, Any]) -> list[Any]:
    """Run concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_GROUP_FIELDS = {
    "displayName": "display_name",
    "description": "description",
    "mail": "mail",
    "mailNickname": "mail_nickname",
    "proxyAddresses": "proxy_addresses",
    "groupTypes": "group_types",
    "visibility": "visibility",
    "securityEnabled": "security_enabled",
    "mailEnabled": "mail_enabled",
    "onPremisesSyncEnabled": "on_premises_sync_enabled",
    "isAssignableToRole": "is_assignable_to_role",
    HIDE_FROM_ADDRESS_LISTS: "hide_from_address_lists",
}


def _items(page: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    value = page.get("value")
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _user_facts(item: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(SID, synced) of a user object as Graph returns it."""
    return (
        _opt_str(item.get("onPremisesSecurityIdentifier")) or None,
        item.get("onPremisesSyncEnabled") is True,
    )


def _merge(part: _GroupParts, item: Mapping[str, Any]) -> None:
    """Fold one delta appearance of a group into what is known of it.

    A later appearance may carry only ``id`` and more ``members@delta``, so a
    property absent from it keeps its earlier value."""
    removed = item.get("@removed")
    if removed is not None:
        reason = removed.get("reason") if isinstance(removed, Mapping) else None
        part.removed = str(reason or "deleted")
        return
    part.removed = None
    for camel, name in _GROUP_FIELDS.items():
        if camel in item:
            part.fields[name] = item[camel]
    for entry in item.get("members@delta") or ():
        if not isinstance(entry, Mapping) or entry.get("id") is None:
            continue
        member_id = str(entry["id"])
        if entry.get("@removed") is not None:
            part.members.pop(member_id, None)
        else:
            odata_type = str(entry.get("@odata.type") or "").lower()
            part.members[member_id] = _MEMBER_KINDS.get(odata_type, MemberKind.OTHER)


def _fold_members(
    item: Mapping[str, Any], added: dict[str, MemberKind], removed: dict[str, MemberKind]
) -> None:
    """Fold one appearance's ``members@delta`` into adds and removes (last one wins)."""
    for entry in item.get("members@delta") or ():
        if not isinstance(entry, Mapping) or entry.get("id") is None:
            continue
        member_id = str(entry["id"])
        odata_type = str(entry.get("@odata.type") or "").lower()
        kind = _MEMBER_KINDS.get(odata_type, MemberKind.OTHER)
        if entry.get("@removed") is not None:
            added.pop(member_id, None)
            removed[member_id] = kind
        else:
            removed.pop(member_id, None)
            added[member_id] = kind


def _settle(step: _Step, answer: _Answer) -> None:
    if not step.future.done():
        step.future.set_result(answer)


def _fail(steps: Iterable[_Step], error: BaseException) -> None:
    for step in steps:
        if not step.future.done():
            step.future.set_exception(error)


def _json_or_none(raw: Any) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError, TypeError):
        return None


def _step_body(body: Any) -> Any:
    """A batch step's body: JSON inline, or (for other content types) base64 text."""
    if isinstance(body, str):
        try:
            return json.loads(base64.b64decode(body, validate=True))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
    return body


def _lower_headers(headers: Any) -> dict[str, str]:
    """Response headers as one string per lower-case name."""
    if not isinstance(headers, Mapping):
        return {}
    out: dict[str, str] = {}
    for name, value in headers.items():
        first = next(iter(value), "") if isinstance(value, _SEQUENCES) else value
        out[str(name).lower()] = str(first)
    return out


_SEQUENCES = (list, tuple, set)  # built once: a batch has a few headers per step


def _segment(value: str) -> str:
    """A path segment of a batch step's URL, quoted (ids are GUIDs; anything else too)."""
    return quote(value, safe="")


def _group_url(group_id: str, select: tuple[str, ...] = GROUP_SELECT) -> str:
    """A batch step reading a group's properties (what the SDK's builder would send,
    made without kiota's URI templates, which cost more than the request itself)."""
    query = _GROUP_SELECT_QUERY if select == GROUP_SELECT else ",".join(select)
    return f"/groups/{_segment(group_id)}?$select={query}"


def _members_url(group_id: str) -> str:
    """A batch step reading the first page of a group's user members."""
    return (
        f"/groups/{_segment(group_id)}/members/graph.user"
        f"?$select={_USER_SELECT_QUERY}&$top={MAX_PAGE_SIZE}"
    )


def _member_groups_url(group_id: str) -> str:
    """A batch step reading the first page of a group's member groups (ids only)."""
    return f"/groups/{_segment(group_id)}/members/graph.group?$select=id&$top={MAX_PAGE_SIZE}"


def _member_of_url(group_id: str) -> str:
    """A batch step reading the first page of the groups a group is a direct member of."""
    return f"/groups/{_segment(group_id)}/memberOf/graph.group?$select=id&$top={MAX_PAGE_SIZE}"


def _odata_quote(value: str) -> str:
    """A string literal's content in an OData filter (a quote is doubled)."""
    return value.replace("'", "''")


def _to_group(
    group_id: str,
    part: _GroupParts,
    users: Mapping[str, tuple[str | None, bool]],
    *,
    members: tuple[CloudMember, ...] | None = None,
    hidden_ok: bool = True,
    shared: dict[tuple[str, MemberKind], CloudMember] | None = None,
) -> CloudGroup:
    """A CloudGroup from what was read; ``hidden_ok``: the app can read hidden
    memberships, else a HiddenMembership group's member list is marked partial.

    ``shared``: members already built for other groups of the same read, reused
    (they are immutable): a full read names the same few thousand users in
    hundreds of thousands of memberships, and building each once is a third of
    the snapshot's CPU and most of its memory."""
    fields = part.fields
    if members is None:
        cache = shared if shared is not None else {}
        resolved: list[CloudMember] = []
        for key in part.members.items():
            member = cache.get(key)
            if member is None:
                member_id, kind = key
                if kind is MemberKind.USER:
                    sid, synced = users.get(member_id, (None, False))
                    member = CloudMember(member_id, kind, sid=sid, synced=synced)
                else:
                    member = CloudMember(member_id, kind)
                cache[key] = member
            resolved.append(member)
        members = tuple(resolved)
    return CloudGroup(
        id=group_id,
        display_name=str(fields.get("display_name") or ""),
        description=_opt_str(fields.get("description")),
        mail=_opt_str(fields.get("mail")),
        mail_nickname=_opt_str(fields.get("mail_nickname")),
        proxy_addresses=tuple(str(a) for a in fields.get("proxy_addresses") or ()),
        group_types=tuple(str(t) for t in fields.get("group_types") or ()),
        visibility=_opt_str(fields.get("visibility")),
        members=members,
        security_enabled=_opt_bool(fields.get("security_enabled")),
        mail_enabled=_opt_bool(fields.get("mail_enabled")),
        on_premises_sync_enabled=fields.get("on_premises_sync_enabled") is True,
        is_assignable_to_role=fields.get("is_assignable_to_role") is True,
        members_hidden=not hidden_ok
        and str(fields.get("visibility") or "").lower() == "hiddenmembership",
        hide_from_address_lists=_opt_bool(fields.get("hide_from_address_lists")),
    )


def _opt_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _writeback_configuration(value: Any) -> WritebackConfiguration:
    """Graph's (beta) writebackConfiguration object; nulls and oddities as None."""
    if not isinstance(value, Mapping):
        return WritebackConfiguration()
    group_type = value.get("onPremisesGroupType")
    return WritebackConfiguration(
        is_enabled=_opt_bool(value.get("isEnabled")),
        on_premises_group_type=str(group_type) if isinstance(group_type, str) else None,
    )


def _beta_url(base_url: str) -> str:
    """The beta endpoint next to the configured v1.0 one."""
    parts = urlsplit(base_url.rstrip("/"))
    head, _, version = parts.path.rpartition("/")
    if version != "v1.0":
        raise ConfigError(
            "WRITEBACK_GRAPH_WRITEBACK_CONFIGURATION needs a Graph URL ending in /v1.0 "
            "(the beta endpoint is found next to it)"
        )
    return f"{parts.scheme}://{parts.netloc}{head}/beta"


def token_roles(token: str) -> frozenset[str] | None:
    """The ``roles`` claim of a JWT access token (application permissions), without
    verifying it; None when the token is not a readable JWT (it may be opaque)."""
    pieces = token.split(".")
    if len(pieces) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(pieces[1] + "=" * (-len(pieces[1]) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    roles = payload.get("roles") if isinstance(payload, dict) else None
    if not isinstance(roles, list):
        return frozenset()
    return frozenset(str(r) for r in roles)


def _map_api_error(error: Any, what: str, *, delta: bool, link: bool = False) -> Exception:
    code, message = _odata_error(error)
    retry_after = _parse_retry_after(_header(error.response_headers, "retry-after"))
    status = int(error.response_status_code or 0)
    return _map_status(status, code, message, retry_after, what, delta=delta, link=link)


def _map_status(
    status: int,
    code: str | None,
    message: str | None,
    retry_after: float | None,
    what: str,
    *,
    delta: bool,
    link: bool = False,
) -> Exception:
    """Graph's answer as writeback's error. ``delta``: a delta or skip token was
    used (410 and the expired-token codes mean it is gone); ``link``: a
    per-group delta link, refused by any 4xx but 429 (the caller reads in full)."""
    detail = f"Graph {what} answered {status}"
    if code:
        detail += f" {code}"
    if message:
        detail += f": {message}"
    if status in (429, 503):
        return GraphThrottled(detail, retry_after=retry_after)
    if status >= 500:
        return GraphUnavailable(detail, retry_after=retry_after)
    if link and 400 <= status < 500:
        return DeltaExpired(detail)
    if delta and (status == 410 or (code or "").lower() in _EXPIRED_TOKEN_CODES):
        return DeltaExpired(detail)
    if status == 404:
        return GraphNotFound(detail)
    return GraphRefused(detail)


def _body_error(body: Any) -> tuple[str | None, str | None]:
    """(code, message) of Graph's error body in a batch answer, message scrubbed."""
    main = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(main, Mapping):
        return None, None
    code, message = main.get("code"), main.get("message")
    text = _scrub(str(message))[:300] if message else None
    return (str(code) if code else None), text


def _odata_error(error: Any) -> tuple[str | None, str | None]:
    main = getattr(error, "error", None)
    code = getattr(main, "code", None)
    message = getattr(main, "message", None)
    if message:
        message = _scrub(str(message))[:300]
    return (str(code) if code else None), message


def _header(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is None and isinstance(headers, Mapping):
        for key, candidate in headers.items():
            if str(key).lower() == name:
                value = candidate
                break
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return None if value is None else str(value)


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds (fractions too) or an HTTP date."""
    if value is None:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _retry_after_of(state: RetryCallState) -> float | None:
    if state.outcome is None or not state.outcome.failed:
        return None
    value = getattr(state.outcome.exception(), "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


@functools.cache
def _subscription_model() -> Any:
    """msgraph's ``Subscription`` model (request bodies only), imported on first use,
    with the subscription request builders (whose import warns about deprecations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for module in (
            "msgraph.generated.subscriptions.subscriptions_request_builder",
            "msgraph.generated.subscriptions.item.subscription_item_request_builder",
            "msgraph.generated.subscriptions.item.reauthorize.reauthorize_request_builder",
        ):
            importlib.import_module(module)
        return importlib.import_module("msgraph.generated.models.subscription").Subscription


def _utc(when: datetime) -> datetime:
    """An aware UTC datetime (a naive one is taken as UTC)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _to_subscription(item: Mapping[str, Any], what: str) -> Subscription:
    subscription_id = _opt_str(item.get("id"))
    try:
        expiration = _utc(datetime.fromisoformat(str(item.get("expirationDateTime"))))
    except ValueError:
        expiration = None
    if not subscription_id or expiration is None:
        raise GraphUnavailable(f"Graph {what} returned a subscription without id or expiry")
    return Subscription(
        id=subscription_id,
        resource=str(item.get("resource") or ""),
        change_type=str(item.get("changeType") or ""),
        notification_url=str(item.get("notificationUrl") or ""),
        lifecycle_url=_opt_str(item.get("lifecycleNotificationUrl")) or None,
        expiration=expiration,
        client_state=_opt_str(item.get("clientState")),
    )


def _scrub(text: str) -> str:
    return _SECRETISH.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", None) or error)
    return text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
