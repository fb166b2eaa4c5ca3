"""A local stand-in for the few Microsoft Graph v1.0 calls writeback makes.

It serves, on loopback, an in-memory tenant with the response shapes Graph
documents, so the real msgraph-sdk can be driven end to end in tests and
benchmarks without a tenant. It models the inconvenient parts too: latency,
replicas that lag, throttling, refused delta links and JSON batching. Modules:
:mod:`.tenant` (the directory and its history), :mod:`.server` (HTTP, reads,
``$batch``, latency, lag, faults, request log), :mod:`.subscriptions`
(subscriptions and change notifications), :mod:`.wire` (error shape, JSON).

Reads
-----
* ``GET /groups/delta`` and ``GET /users/delta``: full and incremental rounds,
  ``@odata.nextLink`` with an opaque ``$skiptoken``, ``@odata.deltaLink`` with
  a ``$deltatoken`` (which carries the ``$select`` of the first call, as Graph
  does), ``$deltatoken=latest``, ``members@delta`` with ``@removed`` entries,
  removed objects as ``{"id", "@removed": {"reason": "changed"|"deleted"}}``,
  a large group's members split over several pages (the group reappears on a
  later page with the rest of its ``members@delta``), 410 Gone for an unknown
  or expired token; ``$filter=id eq '{id}'`` (up to 50 joined by ``or``)
  narrows a round, and the delta token it ends with, to those groups;
* ``GET /users?$filter=id in ('{id}', ...)`` (or ``id eq``; at most 15 ids, as
  Graph allows in one ``in``) with ``$select``;
* ``GET /groups/{id}`` (404 ``Request_ResourceNotFound`` when missing or in the
  recycle bin);
* ``GET /groups/{id}/members/microsoft.graph.user`` (also ``graph.user``, the
  form msgraph-sdk sends), paged by ``$top`` (1..999, default 100);
* ``GET /directory/deletedItems/microsoft.graph.group`` (also ``graph.group``)
  and ``GET /directory/deletedItems/{id}`` (the group if it is in the bin, else
  404);
* ``GET /groups/{id}/members/microsoft.graph.group`` (the member groups) and
  ``GET /groups/{id}/memberOf/microsoft.graph.group`` (the groups it is in);
* ``GET /beta/groups`` (``$select``, ``$filter=id in (...)``, ``$top``, paged) and
  ``GET /beta/groups/{id}``: the beta endpoint, the only one where
  ``writebackConfiguration`` exists (v1.0 answers 400 for it in ``$select``).

Groups carry ``securityEnabled``, ``mailEnabled``, ``onPremisesSyncEnabled``
(null unless synced from AD), ``isAssignableToRole`` and ``visibility`` as
Graph returns them by default; ``hideFromAddressLists`` only on ``GET
/groups/{id}`` with a ``$select`` naming it (Graph: "Supported only on the Get
group API"; elsewhere it is left out, and a delta ``$select`` naming it is 400).

Permissions (``app_roles``, or the ``roles`` claim of a bearer token such as
:class:`StandInCredential` mints)
    Graph reads an app's application permissions from its token. Without
    ``Member.Read.Hidden`` it hides the members of ``visibility=HiddenMembership``
    groups: their member lists come back empty, their ``members@delta`` are left
    out of delta rounds, and they are missing from a member's ``memberOf``
    (microsoft-graph-docs issue 12285, docs-contrib issue 3575; "To list the
    members of a hidden membership group, the Member.Read.Hidden permission is
    required"), all with 200, so a client cannot tell from the answer. The
    stand-in does the same. A request without a token gets ``app_roles`` (by
    default what writeback's docs ask for, Member.Read.Hidden included); a
    token that is not a JWT is 401. Differs: no other permission is enforced
    and no signature is checked.

Latency (``latency=`` seconds, settable while serving)
    Graph documents no figure; round trips to it are tens of milliseconds from
    Azure and more from elsewhere, which is why JSON batching exists ("reducing
    network roundtrips", concepts/json-batching.md). The stand-in sleeps
    ``latency`` before answering each HTTP exchange (a ``$batch`` is one
    exchange). The server is a ``ThreadingHTTPServer`` (one thread per
    connection), so concurrent requests on separate connections overlap their
    latency as they do at Graph (a test shows 20 concurrent requests at 0.2 s
    finishing in well under twice that). Differs: the latency is constant, with
    no jitter, no slow tail and no server-side processing time; HTTP/2 is not
    spoken (clients fall back to HTTP/1.1 and open more connections).

Replica lag (``lag=``, ``deleted_items_lag=``, :meth:`GraphStandIn.freeze_replica`)
    Entra ID is replicated and eventually consistent: a read right after a
    write may not reflect it, and a just-created object can answer 404
    ``Request_ResourceNotFound`` for a while (Microsoft identity developer blog,
    "Designing for eventual consistency for Microsoft Entra"); delta results
    can be delayed too ("processing delays", concepts/delta-query-overview.md).
    Here every read of groups, members, users and every delta round is served
    from the tenant as it was ``lag`` seconds ago (its history is kept): a
    group created since answers 404 with Graph's error body, a changed one its
    old properties and members, a deleted one still answers; a user created
    since is missing from ``$filter=id in (...)``. The recycle bin
    (``/directory/deletedItems``) has its own replica, ``deleted_items_lag``
    (default 0, i.e. fresher), so a group just restored can be 404 on
    ``/groups/{id}`` *and* absent from the bin. ``freeze_replica()`` pins the
    read replica at the current state until ``release_replica()`` (optionally
    the bin's too), for tests that must not depend on timing. A delta round
    from a token returns the changes up to the replica's position and a token
    there (never moving back); ``$deltatoken=latest`` is issued at the
    *primary's* position, so a full read from a lagging replica followed by a
    ``latest`` link skips the changes in between, as the event path has to
    assume. Differs: one replica per kind of read, consistently lagging by the
    same amount; at Graph, consecutive requests may hit replicas at different
    positions (a later read can be older than an earlier one).

One-shot faults (:meth:`GraphStandIn.inject`, ``inject_not_found``, ``refuse_delta_link``)
    Graph answers 429 with ``Retry-After`` when throttling, and 503/5xx when
    unavailable (concepts/throttling.md); an expired or invalid delta token is
    a 4xx: 410 ``syncStateNotFound``/``resyncRequired`` with a ``Location``
    header (concepts/delta-query-overview.md), and expired page tokens of
    directory queries come back as 400 ``Directory_ExpiredPageToken`` (Microsoft
    Graph support samples, "Directory_ExpiredPageToken error when working with
    users API"); delta tokens for directory objects last about 7 days.
    ``inject`` fails the next N matching requests (or a seeded share of them)
    with any 4xx/5xx, Graph's error body (``code``/``message`` choosable) and an
    optional ``Retry-After``;
    ``inject_not_found`` answers the next read(s) of a live group with the 404 a
    lagging replica gives; ``refuse_delta_link`` refuses the next use of a
    delta link (optionally only one group's) with 400
    ``Directory_ExpiredPageToken``, 410 ``syncStateNotFound``/``resyncRequired``
    or any other 4xx; ``Tenant.expire_delta_tokens`` invalidates every token
    issued so far (410). Also ``inject_delay`` and ``inject_disconnect``.
    Differs: tokens do not age out by themselves.

JSON batching (``POST /$batch``)
    Graph takes up to 20 requests in one JSON object; each has an ``id``
    (unique, case-insensitive), ``method``, a ``url`` relative to the version,
    optional ``headers``/``body``/``dependsOn``; the answer is 200 with
    ``responses``, each with the step's ``id``, ``status``, ``headers`` and
    ``body``, "in a different order than the requests"; a malformed batch is
    400; a step whose dependency failed is 424 (concepts/json-batching.md).
    "Requests in a batch are evaluated individually against throttling limits
    and if any request exceeds the limits, it fails with a status code of 429
    ... The batch itself succeeds with a status code of 200", and each failed
    step is to be retried after the ``Retry-After`` in its own headers
    (concepts/throttling.md, "Throttling and batching"). Here every step goes
    through the same faults, replica lag and request log as a request sent on
    its own (``inject(..., path_contains="/groups/g1")`` hits that step only),
    the envelope itself can be failed (``path_contains="/$batch"``: the whole
    batch is throttled), more than 20 steps or an absolute ``url`` is refused
    (400), and the responses come back shuffled (seeded by ``seed=``). A batch
    costs one ``latency``. Differs: steps run one after another in this
    process (Graph runs them in parallel); ``dependsOn`` must name steps listed
    earlier; non-JSON bodies are not base64-encoded; ``disconnect`` faults do
    not apply inside a batch.

Request log
    :attr:`GraphStandIn.log` holds every answered request (``LoggedRequest``:
    method, URL-decoded target, status, the batch that carried it, whether it
    is a batch envelope); :attr:`GraphStandIn.requests` the same as
    ``(method, target, status)`` tuples. :meth:`GraphStandIn.count` counts Graph
    requests (each step inside a batch on its own, envelopes not at all),
    :meth:`GraphStandIn.round_trips` HTTP exchanges, so tests can assert both.

Subscriptions and change notifications, as Graph runs them for groups
    ``POST /subscriptions`` (resource ``groups`` or ``groups/{id}``; changeType;
    notification and lifecycle URLs https, or http on loopback; expiry at most
    41,760 minutes ahead; clientState at most 128 characters), after the
    validation handshake against both URLs (``?validationToken=`` answered with
    a 200 ``text/plain`` echo within 10 s, else 400); ``GET /subscriptions``
    (expired ones are gone), ``GET``/``PATCH``/``DELETE /subscriptions/{id}``,
    ``POST /subscriptions/{id}/reauthorize``. Every group change in the
    :class:`Tenant` (create, update, members, soft delete, restore: ``updated``;
    permanent delete: ``deleted``) is POSTed as a changeNotificationCollection
    to each matching subscription's URL by a background thread, retried after a
    non-2xx or no answer in time, optionally several items per POST; test
    hooks: ``deliveries``, ``send_lifecycle``, ``pause_delivery``/
    ``resume_delivery``, ``redeliver_last``, ``wait_idle``. Notifications go out
    as soon as the primary changes, so with ``lag`` set they arrive before the
    replica can show the change (which is the inconvenient order at Graph too).

Everything else answers with Graph's error shape. Pure stdlib. A round is
materialised once, on its first page, into serialised pages held under a
server-side cursor, so paging is O(page) and a round is a consistent snapshot.
"""

from writeback_sandbox.graph_standin.credential import StandInCredential, app_token
from writeback_sandbox.graph_standin.server import (
    DEFAULT_APP_ROLES,
    MAX_BATCH_REQUESTS,
    GraphStandIn,
    LoggedRequest,
)
from writeback_sandbox.graph_standin.subscriptions import MAX_GROUP_SUBSCRIPTION_MINUTES, Delivery
from writeback_sandbox.graph_standin.tenant import (
    CONTACT_TYPE,
    DEVICE_TYPE,
    GROUP_PROPERTIES,
    GROUP_TYPE,
    MEMBER_READ_HIDDEN,
    USER_PROPERTIES,
    USER_TYPE,
    Tenant,
)
from writeback_sandbox.graph_standin.wire import API_VERSION

__all__ = [
    "API_VERSION",
    "CONTACT_TYPE",
    "DEFAULT_APP_ROLES",
    "DEVICE_TYPE",
    "GROUP_PROPERTIES",
    "GROUP_TYPE",
    "MAX_BATCH_REQUESTS",
    "MAX_GROUP_SUBSCRIPTION_MINUTES",
    "MEMBER_READ_HIDDEN",
    "USER_PROPERTIES",
    "USER_TYPE",
    "Delivery",
    "GraphStandIn",
    "LoggedRequest",
    "StandInCredential",
    "Tenant",
    "app_token",
]
