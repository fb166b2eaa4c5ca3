"""Keep the Graph change-notification subscription for groups alive.

Function-app-agnostic: a timer calls :func:`ensure_subscription` (daily is
plenty), and whatever consumes the lifecycle events recorded by the webhook
calls :func:`handle_lifecycle`. Both are idempotent, so a retry or two
instances racing converge on one subscription.

Ours means: resource ``groups`` and the configured notification URL (compared
without its query string, so a rotated ``?code=`` function key still finds the
old subscription and replaces it). A subscription of ours is *usable* when it
has not expired, its URL matches exactly (query included), its lifecycle URL
is the configured one (it can only be set at creation) and it covers
``updated`` and ``deleted``. The best usable one is kept (renewed when it
expires within ``renew_before``); when there is none a new one is created
first and the stale ones are deleted after, so there is no gap.

A new subscription means notifications may have been missed before it existed:
the caller should run the reconcile (``reconcile_needed``). Graph sends only
``reauthorizationRequired`` for groups; ``subscriptionRemoved`` and ``missed``
are handled anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from urllib.parse import urlsplit

from writeback.errors import GraphNotFound, GraphRefused
from writeback.ports import Subscription, SubscriptionClient
from writeback.service.notifications import (
    MISSED,
    REAUTHORIZATION_REQUIRED,
    SUBSCRIPTION_REMOVED,
    LifecycleEvent,
)

log = logging.getLogger(__name__)

RESOURCE = "groups"
CHANGE_TYPE = "updated,deleted"
#: Graph's limit for groups (and other directory resources).
MAX_LIFETIME = timedelta(minutes=41_760)
#: A day under the limit: our clock and Graph's may disagree.
DEFAULT_LIFETIME = timedelta(days=28)
#: With a daily timer, two weeks of failed runs before a subscription lapses.
DEFAULT_RENEW_BEFORE = timedelta(days=14)


class Action(StrEnum):
    UNCHANGED = "unchanged"
    CREATED = "created"
    RENEWED = "renewed"
    RECREATED = "recreated"
    REAUTHORIZED = "reauthorized"
    NONE = "none"


@dataclass(frozen=True)
class SubscriptionStatus:
    action: Action
    subscription: Subscription
    #: Ids of stale or duplicate subscriptions of ours that were deleted.
    deleted: tuple[str, ...] = ()

    @property
    def reconcile_needed(self) -> bool:
        """A new subscription: changes before it may never have been notified."""
        return self.action in (Action.CREATED, Action.RECREATED)


@dataclass(frozen=True)
class LifecycleOutcome:
    event: LifecycleEvent
    action: Action
    #: Run the reconcile (delta) now: notifications were or may have been lost.
    reconcile_needed: bool
    subscription: Subscription | None = None


def ensure_subscription(
    cloud: SubscriptionClient,
    *,
    notification_url: str,
    lifecycle_url: str | None,
    client_state: str,
    now: datetime,
    renew_before: timedelta = DEFAULT_RENEW_BEFORE,
    lifetime: timedelta = DEFAULT_LIFETIME,
) -> SubscriptionStatus:
    """Make sure exactly one usable subscription of ours exists and is not about to expire."""
    return _ensure(
        cloud,
        notification_url=notification_url,
        lifecycle_url=lifecycle_url,
        client_state=client_state,
        now=now,
        renew_before=renew_before,
        lifetime=lifetime,
    )


def _ensure(
    cloud: SubscriptionClient,
    *,
    notification_url: str,
    lifecycle_url: str | None,
    client_state: str,
    now: datetime,
    renew_before: timedelta,
    lifetime: timedelta,
    removed: str | None = None,
) -> SubscriptionStatus:
    """:func:`ensure_subscription`; ``removed`` names a subscription Graph said it
    removed, never kept even if still listed, and deleted (after its replacement
    exists) only when it is ours: listed by Graph with our notification URL."""
    _check(lifetime, renew_before)
    now = _aware(now)
    ours = [s for s in cloud.list_subscriptions() if _is_ours(s, notification_url)]
    usable = [
        s for s in ours if s.id != removed and _usable(s, notification_url, lifecycle_url, now)
    ]
    keep = max(usable, key=lambda s: s.expiration) if usable else None
    stale = [s for s in ours if s is not keep]
    if keep is None:
        action = Action.RECREATED if ours else Action.CREATED
        keep = _create(cloud, notification_url, lifecycle_url, client_state, now + lifetime)
    elif keep.expiration - now <= renew_before:
        try:
            keep = cloud.renew_subscription(keep.id, now + lifetime)
            action = Action.RENEWED
        except GraphNotFound:  # removed between the list and the renew
            keep = _create(cloud, notification_url, lifecycle_url, client_state, now + lifetime)
            action = Action.RECREATED
    else:
        action = Action.UNCHANGED
    deleted = tuple(s.id for s in stale if _delete(cloud, s.id))
    status = SubscriptionStatus(action, keep, deleted)
    log.info(
        "subscription %s: %s, expires %s, %d stale deleted",
        action.value,
        keep.id,
        keep.expiration.isoformat(),
        len(deleted),
        extra={
            "subscription_action": action.value,
            "subscription_id": keep.id,
            "subscription_endpoint": _endpoint(notification_url),
        },
    )
    return status


def handle_lifecycle(
    cloud: SubscriptionClient,
    event: LifecycleEvent,
    *,
    notification_url: str,
    lifecycle_url: str | None,
    client_state: str,
    now: datetime,
    renew_before: timedelta = DEFAULT_RENEW_BEFORE,
    lifetime: timedelta = DEFAULT_LIFETIME,
) -> LifecycleOutcome:
    """Act on one lifecycle event (already clientState-checked by the webhook).

    * ``reauthorizationRequired``: reauthorize; if Graph refuses, renew (a
      PATCH reauthorizes too); if the subscription is gone, ensure a new one.
    * ``subscriptionRemoved``: ensure a new subscription (the named one is deleted,
      after, only if it is ours); reconcile.
    * ``missed``: nothing to call; reconcile.

    Transient Graph errors propagate so the caller retries the event."""
    _check(lifetime, renew_before)
    now = _aware(now)

    def ensure() -> SubscriptionStatus:
        return ensure_subscription(
            cloud,
            notification_url=notification_url,
            lifecycle_url=lifecycle_url,
            client_state=client_state,
            now=now,
            renew_before=renew_before,
            lifetime=lifetime,
        )

    if event.event == MISSED:
        outcome = LifecycleOutcome(event, Action.NONE, reconcile_needed=True)
    elif event.event == SUBSCRIPTION_REMOVED:
        # Normally gone already. The id comes from a request body, so it is deleted
        # only if Graph lists it as ours (ensure's stale list); anyone else's stays.
        status = _ensure(
            cloud,
            notification_url=notification_url,
            lifecycle_url=lifecycle_url,
            client_state=client_state,
            now=now,
            renew_before=renew_before,
            lifetime=lifetime,
            removed=event.subscription_id,
        )
        if event.subscription_id not in status.deleted:
            log.info(
                "subscriptionRemoved names %s, which Graph does not list as ours "
                "(gone already, or someone else's): not deleted",
                event.subscription_id,
                extra={"subscription_id": event.subscription_id},
            )
        outcome = LifecycleOutcome(event, status.action, True, status.subscription)
    elif event.event == REAUTHORIZATION_REQUIRED:
        outcome = _reauthorize(cloud, event, now + lifetime, ensure)
    else:
        raise ValueError(f"unknown lifecycle event {event.event!r}")
    log.info(
        "lifecycle %s for subscription %s: %s%s",
        event.event,
        event.subscription_id,
        outcome.action.value,
        ", reconcile needed" if outcome.reconcile_needed else "",
        extra={
            "lifecycle_event": event.event,
            "subscription_id": event.subscription_id,
            "subscription_action": outcome.action.value,
            "reconcile_needed": outcome.reconcile_needed,
        },
    )
    return outcome


# --------------------------------------------------------------------------- helpers


def _reauthorize(
    cloud: SubscriptionClient,
    event: LifecycleEvent,
    expiration: datetime,
    ensure: Callable[[], SubscriptionStatus],
) -> LifecycleOutcome:
    try:
        cloud.reauthorize_subscription(event.subscription_id)
        return LifecycleOutcome(event, Action.REAUTHORIZED, reconcile_needed=False)
    except GraphNotFound:
        pass
    except GraphRefused as error:
        log.warning("reauthorize refused (%s); renewing instead", error)
        try:
            renewed = cloud.renew_subscription(event.subscription_id, expiration)
            return LifecycleOutcome(event, Action.RENEWED, False, renewed)
        except GraphNotFound:
            pass
    status = ensure()  # the subscription is gone
    return LifecycleOutcome(event, status.action, status.reconcile_needed, status.subscription)


def _create(
    cloud: SubscriptionClient,
    notification_url: str,
    lifecycle_url: str | None,
    client_state: str,
    expiration: datetime,
) -> Subscription:
    return cloud.create_subscription(
        notification_url,
        lifecycle_url,
        client_state,
        expiration,
        resource=RESOURCE,
        change_type=CHANGE_TYPE,
    )


def _delete(cloud: SubscriptionClient, subscription_id: str) -> bool:
    try:
        cloud.delete_subscription(subscription_id)
    except GraphNotFound:
        return False
    return True


def _is_ours(sub: Subscription, notification_url: str) -> bool:
    return sub.resource.strip("/").lower() == RESOURCE and _without_query(
        sub.notification_url
    ) == _without_query(notification_url)


def _usable(
    sub: Subscription, notification_url: str, lifecycle_url: str | None, now: datetime
) -> bool:
    changes = {c.strip().lower() for c in sub.change_type.split(",")}
    return (
        sub.expiration > now
        and sub.notification_url == notification_url
        and sub.lifecycle_url == lifecycle_url
        and {"updated", "deleted"} <= changes
    )


def _without_query(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")


def _endpoint(url: str) -> str:
    """The URL without query or fragment (a function key may be in the query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _aware(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now


def _check(lifetime: timedelta, renew_before: timedelta) -> None:
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise ValueError(f"lifetime must be positive and at most {MAX_LIFETIME}")
    if renew_before < timedelta(0):
        raise ValueError("renew_before must not be negative")
