"""One exception tree for the whole product.

Whether a fault is worth retrying is decided here, once: adapters raise only
these types, so the worker, the reconcile service and the CLI never have to
guess from a library's exception what to do next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from writeback.domain.model import DirectoryGroup


class WritebackError(Exception):
    """Base of every error writeback raises on purpose."""


class TransientError(WritebackError):
    """Retrying later may succeed: the service was down, slow or throttling."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(WritebackError):
    """Retrying the same input cannot succeed; a person has to look."""


class LdapUnavailable(TransientError):
    """The domain controller could not be reached or dropped the connection."""


class GraphUnavailable(TransientError):
    """Graph answered 5xx, timed out or could not be reached."""


class GraphThrottled(GraphUnavailable):
    """Graph answered 429 or 503 with Retry-After."""


class ConfigError(PermanentError):
    """A setting is missing or invalid; the message names the setting."""


class PolicyRefused(PermanentError):
    """A write would touch an object outside the target OU or without our anchor."""


class DirectoryRefused(PermanentError):
    """The directory rejected a write for a reason retrying cannot fix."""


class DuplicateAnchor(DirectoryRefused):
    """More than one object under the target OU claims one group's anchor (a decoy, a
    copy an admin made, or an object whose anchor differs from ours only in case).

    None of them is written: which one is the group's is for a person to decide.
    ``duplicates`` maps each such group id to the DNs claiming its anchor; ``found``
    holds what the same read found for the other ids, so a caller reading many
    groups at once can go on with them.
    """

    def __init__(
        self,
        duplicates: Mapping[str, tuple[str, ...]],
        found: Mapping[str, DirectoryGroup] | None = None,
        *,
        message: str | None = None,
    ) -> None:
        text = message or "; ".join(
            f"{len(dns)} {'object carries' if len(dns) == 1 else 'objects carry'} the anchor "
            f"of group {gid}: {'; '.join(dns)}"
            for gid, dns in duplicates.items()
        )
        super().__init__(text)
        self.duplicates = dict(duplicates)
        self.found = dict(found or {})


class GraphRefused(PermanentError):
    """Graph rejected a request (4xx other than 429): permissions, bad request."""


class GraphNotFound(GraphRefused):
    """Graph answered 404: the object does not exist (or is in the recycle bin)."""


class DeltaExpired(GraphRefused):
    """A delta or skip token is unknown or expired (410 Gone, syncStateNotFound,
    resyncRequired, 400 Directory_ExpiredPageToken; for a per-group delta link,
    any 4xx but 429).

    The caller drops its stored delta link and restarts with a full read.
    """


class PoisonEvent(PermanentError):
    """An event body that cannot be parsed or does not describe a group."""


# -- the event queue (Service Bus or the embedded SQLite queue) --------------------


class QueueUnavailable(TransientError):
    """The queue could not be reached or was busy; the operation did not happen."""


class LockLost(TransientError):
    """The session or message lock expired or was released before settling.

    The message was not settled and will be delivered again, so the handler has to
    be idempotent; nothing else is to be done about it.
    """


class MessageRejected(PermanentError):
    """A message the queue cannot take: id or session id invalid, body too large."""


class DeadLetterNotFound(PermanentError):
    """The dead letter is no longer there (already resubmitted or removed)."""


class QueueRefused(PermanentError):
    """Service Bus refused us: no such queue, no rights, wrong key or no credential."""


# -- the hybrid relay (Azure Relay Hybrid Connection to the on-premises agent) ------


class RelayUnavailable(TransientError):
    """The relay, or every agent listening on it, could not be reached in time.

    The agent may be restarting or the relay dropping connections; the operation
    did not reach AD, or its outcome is unknown, so the state-based handler can
    simply run again.
    """


class RelayRefused(PermanentError):
    """The relay or the agent refused our credentials (SAS token or caller key)."""
