"""Subscriptions and change notifications, as Graph runs them for groups.

Mixed into :class:`~writeback_sandbox.graph_standin.server.GraphStandIn`: the
``/subscriptions`` endpoints with the validation handshake, and a delivery
thread that POSTs change notifications (batched, retried) and lifecycle events.
"""

from __future__ import annotations

import heapq
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

from writeback_sandbox.graph_standin.tenant import Tenant
from writeback_sandbox.graph_standin.wire import (
    GraphError,
    Response,
    dumps,
    graph_time,
    json_body,
    json_response,
    utc_now,
)

#: Longest subscription lifetime Graph allows for groups and other directory resources.
MAX_GROUP_SUBSCRIPTION_MINUTES = 41_760
_MAX_CLIENT_STATE = 128
_MAX_SUBSCRIPTIONS = 100
#: No proxy: notification URLs in tests are on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Delivery:
    """One notification POST attempt; ``status`` 0 means no answer in time."""

    kind: str  # "notification" or "lifecycle"
    url: str
    status: int
    items: int
    attempt: int
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class _Post:
    kind: str
    url: str
    body: bytes
    items: int
    attempt: int = 0


@dataclass
class _Subscription:
    id: str
    resource: str
    change_types: frozenset[str]
    change_type: str
    notification_url: str
    lifecycle_url: str | None
    expiration: datetime
    client_state: str | None = field(repr=False)
    needs_reauthorization: bool = False


def _subscription_body(sub: _Subscription, *, with_client_state: bool = False) -> dict[str, Any]:
    return {
        "id": sub.id,
        "resource": sub.resource,
        "applicationId": "00000000-0000-0000-0000-00000000a11d",
        "changeType": sub.change_type,
        "clientState": sub.client_state if with_client_state else None,
        "notificationUrl": sub.notification_url,
        "notificationQueryOptions": None,
        "lifecycleNotificationUrl": sub.lifecycle_url,
        "expirationDateTime": graph_time(sub.expiration),
        "creatorId": "00000000-0000-0000-0000-00000000c0de",
        "includeResourceData": False,
        "latestSupportedTlsVersion": "v1_2",
        "encryptionCertificate": None,
        "encryptionCertificateId": None,
        "notificationUrlAppId": None,
    }


def _webhook_url(value: object, what: str) -> str:
    """https, or http on loopback (the stand-in's one relaxation of Graph's rule)."""
    url = urlsplit(str(value or ""))
    loopback = url.hostname in ("127.0.0.1", "localhost", "::1")
    if not url.hostname or not (url.scheme == "https" or (url.scheme == "http" and loopback)):
        raise GraphError(
            400, "InvalidRequest", f"The {what} must be an https URL (http on loopback here)."
        )
    return str(value)


class Notifications:
    """Subscription endpoints and notification delivery (a mixin of the stand-in)."""

    tenant: Tenant
    clock: Callable[[], datetime]

    @property
    def url(self) -> str:
        raise NotImplementedError

    def _init_notifications(
        self,
        *,
        tenant_id: str,
        delivery_retry_delays: tuple[float, ...],
        delivery_timeout: float,
        delivery_batch_size: int,
        delivery_batch_window: float,
        validation_timeout: float,
    ) -> None:
        self.tenant_id = tenant_id
        self.delivery_retry_delays = delivery_retry_delays
        self.delivery_timeout = delivery_timeout
        self.delivery_batch_size = delivery_batch_size
        self.delivery_batch_window = delivery_batch_window
        self.validation_timeout = validation_timeout
        #: the stand-in's clock for expirations; tests may replace it
        self.clock = utc_now
        #: one entry per notification POST attempt (test hook)
        self.deliveries: list[Delivery] = []
        self._subscriptions: dict[str, _Subscription] = {}
        self._delivery = threading.Condition(threading.Lock())
        self._fresh: list[tuple[str, str, dict[str, Any]]] = []
        self._fresh_since = 0.0
        self._scheduled: list[tuple[float, int, _Post]] = []
        self._post_counter = 0
        self._in_flight = 0
        self._paused = False
        self._delivery_stop = False
        self._delivery_thread: threading.Thread | None = None

    # ----------------------------------------------------------------- endpoints

    def _subscriptions_endpoint(self, method: str, segments: list[str], body: bytes) -> Response:
        response = Response(204, b"")
        match method, segments:
            case "GET", ["subscriptions"]:
                response = self._list_subscriptions()
            case "POST", ["subscriptions"]:
                response = self._create_subscription(json_body(body))
            case "GET", ["subscriptions", subscription_id]:
                response = json_response(dumps(self._subscription_json(subscription_id)))
            case "PATCH", ["subscriptions", subscription_id]:
                response = self._renew_subscription(subscription_id, json_body(body))
            case "DELETE", ["subscriptions", subscription_id]:
                with self._delivery:
                    self._live_subscription(subscription_id)
                    del self._subscriptions[subscription_id]
            case "POST", ["subscriptions", subscription_id, "reauthorize"]:
                with self._delivery:
                    self._live_subscription(subscription_id).needs_reauthorization = False
            case _, ["subscriptions"] | ["subscriptions", _] | ["subscriptions", _, "reauthorize"]:
                raise GraphError(
                    405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed."
                )
            case _:
                raise GraphError(
                    400, "BadRequest", f"Resource not found for the segment '{segments[-1]}'."
                )
        return response

    def subscription_ids(self) -> list[str]:
        """Ids of the live (unexpired) subscriptions (test hook)."""
        with self._delivery:
            self._purge_expired()
            return list(self._subscriptions)

    def needs_reauthorization(self, subscription_id: str) -> bool:
        """Whether a ``reauthorizationRequired`` was sent and not yet answered (test hook)."""
        with self._delivery:
            return self._live_subscription(subscription_id).needs_reauthorization

    def _live_subscription(self, subscription_id: str) -> _Subscription:
        self._purge_expired()
        found = self._subscriptions.get(subscription_id)
        if found is None:
            raise GraphError(
                404,
                "ResourceNotFound",
                f"The object was not found. Subscription '{subscription_id}' does not exist.",
            )
        return found

    def _purge_expired(self) -> None:
        now = self.clock()
        for subscription_id in [k for k, v in self._subscriptions.items() if v.expiration <= now]:
            del self._subscriptions[subscription_id]

    def _subscription_json(
        self, subscription_id: str, *, with_client_state: bool = False
    ) -> dict[str, Any]:
        with self._delivery:
            sub = self._live_subscription(subscription_id)
            return {
                "@odata.context": f"{self.url}/$metadata#subscriptions/$entity",
                **_subscription_body(sub, with_client_state=with_client_state),
            }

    def _list_subscriptions(self) -> Response:
        with self._delivery:
            self._purge_expired()
            values = [_subscription_body(s) for s in self._subscriptions.values()]
        body = {"@odata.context": f"{self.url}/$metadata#subscriptions", "value": values}
        return json_response(dumps(body))

    def _create_subscription(self, body: dict[str, Any]) -> Response:
        resource = body.get("resource")
        normalized = str(resource or "").strip("/").lower()
        if not (normalized == "groups" or re.fullmatch(r"groups/[^/]+", normalized)):
            raise GraphError(
                400, "InvalidRequest", f"Subscriptions to resource '{resource}' are not supported."
            )
        change_type = body.get("changeType")
        changes = [c.strip() for c in str(change_type or "").split(",")]
        if not change_type or any(c not in ("created", "updated", "deleted") for c in changes):
            raise GraphError(400, "InvalidRequest", f"Invalid changeType '{change_type}'.")
        notification_url = _webhook_url(body.get("notificationUrl"), "notificationUrl")
        lifecycle = body.get("lifecycleNotificationUrl")
        lifecycle_url = None if lifecycle is None else _webhook_url(lifecycle, "lifecycle URL")
        client_state = body.get("clientState")
        if client_state is not None and (
            not isinstance(client_state, str) or len(client_state) > _MAX_CLIENT_STATE
        ):
            raise GraphError(
                400, "InvalidRequest", "clientState must be a string of at most 128 characters."
            )
        expiration = self._expiration(body)
        with self._delivery:
            self._purge_expired()
            if len(self._subscriptions) >= _MAX_SUBSCRIPTIONS:
                raise GraphError(
                    403, "ExtensionError", "Subscription quota for the application is exhausted."
                )
        # The handshake happens outside every lock: it waits on the webhook.
        for url in (notification_url, lifecycle_url):
            if url is not None:
                self._validate_endpoint(url)
        sub = _Subscription(
            id=str(uuid.uuid4()),
            resource=str(resource),
            change_types=frozenset(changes),
            change_type=",".join(changes),
            notification_url=notification_url,
            lifecycle_url=lifecycle_url,
            expiration=expiration,
            client_state=client_state,
        )
        with self._delivery:
            self._subscriptions[sub.id] = sub
        self._ensure_delivery()
        out = {
            "@odata.context": f"{self.url}/$metadata#subscriptions/$entity",
            **_subscription_body(sub, with_client_state=True),
        }
        return json_response(dumps(out), 201)

    def _renew_subscription(self, subscription_id: str, body: dict[str, Any]) -> Response:
        expiration = self._expiration(body)
        with self._delivery:
            sub = self._live_subscription(subscription_id)
            sub.expiration = expiration
            sub.needs_reauthorization = False
        return json_response(dumps(self._subscription_json(subscription_id)))

    def _expiration(self, body: dict[str, Any]) -> datetime:
        raw = body.get("expirationDateTime")
        try:
            when = datetime.fromisoformat(str(raw))
        except ValueError:
            raise GraphError(
                400, "InvalidRequest", "expirationDateTime is missing or invalid."
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        now = self.clock()
        if when <= now:
            raise GraphError(
                400, "InvalidRequest", "Subscription expiration must be in the future."
            )
        if when > now + timedelta(minutes=MAX_GROUP_SUBSCRIPTION_MINUTES):
            raise GraphError(
                400,
                "InvalidRequest",
                f"Subscription expiration can only be {MAX_GROUP_SUBSCRIPTION_MINUTES} "
                "minutes in the future.",
            )
        return when

    def _validate_endpoint(self, url: str) -> None:
        """Graph's handshake: POST ``?validationToken=...``; the answer must be a
        200 ``text/plain`` holding the decoded token, within the timeout."""
        token = (
            "Validation: Testing client application reachability for subscription "
            f"Request-Id: {uuid.uuid4()}"
        )
        separator = "&" if urlsplit(url).query else "?"
        request = urllib.request.Request(  # noqa: S310 - http(s) checked in _webhook_url
            f"{url}{separator}validationToken={quote(token, safe='')}",
            data=b"",
            method="POST",
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )
        ok = False
        try:
            with _OPENER.open(request, timeout=self.validation_timeout) as answer:
                content_type = answer.headers.get("Content-Type") or ""
                text = answer.read(64 * 1024).decode("utf-8", "replace")
                ok = (
                    answer.status == 200
                    and content_type.split(";")[0].strip().lower() == "text/plain"
                    and text == token
                )
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise GraphError(
                400,
                "ValidationError",
                "Subscription validation request failed. Notification endpoint must respond "
                "with 200 OK to validation request.",
            )

    # ----------------------------------------------------------------- delivery

    def pause_delivery(self) -> None:
        """Hold notification POSTs (they pile up and go out, batched, on resume)."""
        with self._delivery:
            self._paused = True

    def resume_delivery(self) -> None:
        with self._delivery:
            self._paused = False
            self._delivery.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every notification is delivered or given up on."""
        with self._delivery:
            return self._delivery.wait_for(
                lambda: not self._fresh and not self._scheduled and not self._in_flight,
                timeout,
            )

    def send_lifecycle(self, subscription_id: str, event: str) -> None:
        """POST a lifecycle notification to the subscription's lifecycle URL.

        ``subscriptionRemoved`` also removes the subscription, as Graph does;
        ``reauthorizationRequired`` marks it until it is reauthorized or renewed."""
        with self._delivery:
            sub = self._subscriptions.get(subscription_id)
            if sub is None:
                raise KeyError(f"no subscription {subscription_id!r}")
            if sub.lifecycle_url is None:
                raise ValueError("the subscription has no lifecycleNotificationUrl")
            item = {
                "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": graph_time(sub.expiration),
                "tenantId": self.tenant_id,
                "clientState": sub.client_state,
                "lifecycleEvent": event,
            }
            if event == "subscriptionRemoved":
                del self._subscriptions[subscription_id]
            elif event == "reauthorizationRequired":
                sub.needs_reauthorization = True
            self._add_fresh("lifecycle", sub.lifecycle_url, item)
        self._ensure_delivery()

    def redeliver_last(self) -> None:
        """POST the last delivered change notification body again, unchanged."""
        with self._delivery:
            for delivery in reversed(self.deliveries):
                if delivery.kind == "notification" and 200 <= delivery.status < 300:
                    post = _Post("notification", delivery.url, delivery.body, delivery.items)
                    self._schedule(post, time.monotonic())
                    break
            else:
                raise LookupError("no change notification has been delivered yet")
        self._ensure_delivery()

    def _on_tenant_change(self, group_id: str, change_type: str, seq: int) -> None:
        """Tenant listener (under the tenant's lock): queue one item per matching subscription."""
        with self._delivery:
            if not self._subscriptions:
                return
            now = self.clock()
            for sub in self._subscriptions.values():
                if sub.expiration <= now or change_type not in sub.change_types:
                    continue
                resource = sub.resource.strip("/").lower()
                if resource != "groups" and resource != f"groups/{group_id.lower()}":
                    continue
                item = {
                    "subscriptionId": sub.id,
                    "subscriptionExpirationDateTime": graph_time(sub.expiration),
                    "clientState": sub.client_state,
                    "changeType": change_type,
                    "resource": f"Groups/{group_id}",
                    "tenantId": self.tenant_id,
                    "resourceData": {
                        "@odata.type": "#Microsoft.Graph.Group",
                        "@odata.id": f"Groups/{group_id}",
                        "id": group_id,
                        "organizationId": self.tenant_id,
                        "eventTime": graph_time(now),
                        "sequenceNumber": seq,
                    },
                }
                self._add_fresh("notification", sub.notification_url, item)

    def _add_fresh(self, kind: str, url: str, item: dict[str, Any]) -> None:
        if not self._fresh:
            self._fresh_since = time.monotonic()
        self._fresh.append((kind, url, item))
        self._delivery.notify_all()

    def _schedule(self, post: _Post, due: float) -> None:
        self._post_counter += 1
        heapq.heappush(self._scheduled, (due, self._post_counter, post))
        self._delivery.notify_all()

    def _ensure_delivery(self) -> None:
        with self._delivery:
            if self._delivery_thread is not None:
                return
            self._delivery_stop = False
            thread = threading.Thread(
                target=self._deliver_forever, name="graph-standin-delivery", daemon=True
            )
            self._delivery_thread = thread
        # Outside the delivery lock: the tenant calls the listener under its own lock.
        self.tenant.add_listener(self._on_tenant_change)
        thread.start()

    def _stop_delivery(self) -> None:
        with self._delivery:
            thread, self._delivery_thread = self._delivery_thread, None
            self._delivery_stop = True
            self._delivery.notify_all()
        if thread is not None:
            self.tenant.remove_listener(self._on_tenant_change)
            thread.join(timeout=self.delivery_timeout + 5)

    def _deliver_forever(self) -> None:
        while True:
            with self._delivery:
                post = self._next_post()
                if post is None:
                    return
                self._in_flight += 1
            status = self._post(post)
            with self._delivery:
                self._in_flight -= 1
                self.deliveries.append(
                    Delivery(post.kind, post.url, status, post.items, post.attempt, post.body)
                )
                if not 200 <= status < 300 and post.attempt < len(self.delivery_retry_delays):
                    retry = _Post(post.kind, post.url, post.body, post.items, post.attempt + 1)
                    self._schedule(
                        retry, time.monotonic() + self.delivery_retry_delays[post.attempt]
                    )
                self._delivery.notify_all()

    def _next_post(self) -> _Post | None:
        """The next due POST (None when stopping); waits, holding the condition."""
        while not self._delivery_stop:
            timeout: float | None = None
            if not self._paused:
                now = time.monotonic()
                if self._fresh:
                    ready_at = self._fresh_since + self.delivery_batch_window
                    if now >= ready_at:
                        self._batch_fresh(now)
                    else:
                        timeout = ready_at - now
                if self._scheduled:
                    due = self._scheduled[0][0]
                    if due <= now:
                        return heapq.heappop(self._scheduled)[2]
                    timeout = due - now if timeout is None else min(timeout, due - now)
            self._delivery.wait(timeout)
        return None

    def _batch_fresh(self, now: float) -> None:
        """Pending items into POSTs: per URL, in order, at most ``delivery_batch_size`` each."""
        by_target: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for kind, url, item in self._fresh:
            by_target.setdefault((kind, url), []).append(item)
        self._fresh.clear()
        size = self.delivery_batch_size
        for (kind, url), items in by_target.items():
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                self._schedule(_Post(kind, url, dumps({"value": chunk}), len(chunk)), now)

    def _post(self, post: _Post) -> int:
        request = urllib.request.Request(  # noqa: S310 - http(s) checked in _webhook_url
            post.url,
            data=post.body,
            method="POST",
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        try:
            with _OPENER.open(request, timeout=self.delivery_timeout) as answer:
                answer.read()
                return int(answer.status)
        except urllib.error.HTTPError as error:
            error.close()
            return int(error.code)
        except (OSError, ValueError):
            return 0
