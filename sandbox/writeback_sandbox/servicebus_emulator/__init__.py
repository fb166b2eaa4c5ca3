"""An AMQP 1.0 Service Bus emulator for tests, spoken to by the real ``azure-servicebus`` SDK.

Microsoft's own emulator is a container image that cannot be pulled here, so this
one is built on Apache Qpid Proton (``python-qpid-proton``) from the Service Bus
documentation (AMQP 1.0 in Service Bus, the request/response operations, message
sessions, duplicate detection, dead-letter queues) and the SDK's own code. It
listens on loopback over TLS with its own CA, and the SDK validates the
certificate::

    with ServiceBusEmulator(queues={"group-events": QueueSettings(lock_duration=5)}) as sb:
        client = ServiceBusClient.from_connection_string(sb.connection_string, **sb.client_options)
        admin = ServiceBusAdministrationClient.from_connection_string(
            sb.connection_string, **sb.admin_options
        )
        queue = sb.queue_adapter("group-events", max_delivery_count=100)  # writeback's adapter

(``sb.client()`` and ``sb.admin()`` build the first two.)

``connection_string`` names the namespace ``127.0.0.1`` (port of the administration
endpoint, which the administration client keeps and the AMQP client drops) with
the ``RootManageSharedAccessKey`` rule; ``client_options`` point the AMQP client
at the AMQP port (``custom_endpoint_address`` with ``TransportType.Amqp``) and at
the CA (``connection_verify``); ``admin_options`` give the administration client
the CA. :meth:`connection_string_for` gives one for another rule (``rules`` maps
names to :class:`auth.SasRule`; by default also ``writeback-app`` with Send and
Listen, no Manage, like the app's role assignments) or a wrong key.

What it does (details in ``model.py``, ``amqp.py``, ``management.py``,
``admin_http.py``): CBS token put on ``$cbs`` (SAS tokens for the namespace,
checked by signature, expiry, audience and rights); queues with and without
sessions; the session filter (a named session, locked even when empty, or the
next session with a message ready, within the link's timeout); session locks
with expiry and renewal and ``com.microsoft:locked-until-utc``; peek-lock with
complete, abandon, dead-letter (reason and description) and defer, settled on the
receiver link or through ``$management`` by lock token; receive-and-delete;
delivery counts and dead-lettering at the maximum; lock expiry that bites (a
settlement after it is refused with ``message-lock-lost``/``session-lock-lost``,
which the SDK raises as MessageLockLostError/SessionLockLostError); scheduled
messages (annotation or schedule operation) that get a new sequence number and go
to the tail of their session when due, and their cancellation; peek; duplicate
detection on message id within the window (duplicates silently dropped); time to
live with dead-lettering on expiry; the 256 KB Standard message size limit; the
``$DeadLetterQueue`` sub-queue read with a non-session receiver; receive by
sequence number for deferred messages; session state; the administration API's
queue runtime properties (Manage rights only).

Where it differs from the real broker, knowingly:

* one process, in memory, no partitions, no topics/subscriptions, no
  transactions, no auto-forwarding, no message-count quota, no throttling (never
  ServerBusy), no Entra ID tokens (SAS only), no AMQP over WebSockets;
* time is checked on a ``tick`` (50 ms by default): a lock lapses, a scheduled
  message activates and a message expires up to one tick late;
* a batch is told from a single message by its content (see ``codec.py``);
* a dead-lettered message keeps its sequence number and enqueued time; the
  dead-letter queue is browsed in sequence order;
* locks are per message, and deliveries of a session are locked by the session
  lock; the emulator does not detach a receiver whose session lock lapsed: it
  delivers nothing more on it and refuses its settlements;
* ``get-message-sessions``, rule operations and the rest of the administration API
  (create, update, list, delete entities) are not served; queues are made by the
  test through :meth:`create_queue` or the ``queues`` argument.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from proton import SSLDomain
from proton.reactor import Container

from writeback_sandbox.servicebus_emulator.admin_http import AdminEndpoint
from writeback_sandbox.servicebus_emulator.amqp import AmqpHandler
from writeback_sandbox.servicebus_emulator.auth import LISTEN, MANAGE, SEND, SasRule
from writeback_sandbox.servicebus_emulator.model import (
    Broker,
    BrokerError,
    Entity,
    MessageState,
    QueueSettings,
    Stored,
)

if TYPE_CHECKING:
    from azure.servicebus import ServiceBusClient
    from azure.servicebus.management import ServiceBusAdministrationClient

    from writeback.adapters.servicebus import ServiceBusQueue

__all__ = [
    "APP_RULE",
    "ROOT_RULE",
    "BrokerError",
    "MessageState",
    "QueueSettings",
    "SasRule",
    "ServiceBusEmulator",
    "Stored",
    "running_emulator",
]

ROOT_RULE = "RootManageSharedAccessKey"
APP_RULE = "writeback-app"


class ServiceBusEmulator:
    """The emulated namespace; start it (or use it as a context manager) before connecting."""

    def __init__(
        self,
        queues: Mapping[str, QueueSettings] | None = None,
        *,
        rules: Mapping[str, SasRule] | None = None,
        tick: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = "127.0.0.1"
        self.broker = Broker(clock)
        if rules is None:
            rules = {
                ROOT_RULE: SasRule(ROOT_RULE, secrets.token_urlsafe(32), frozenset({MANAGE})),
                APP_RULE: SasRule(APP_RULE, secrets.token_urlsafe(32), frozenset({SEND, LISTEN})),
            }
        self.rules: dict[str, SasRule] = dict(rules)
        for name, settings in (queues or {}).items():
            self.broker.create_queue(name, settings)
        self._handler = AmqpHandler(self.broker, self.host, self.rules, tick)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._thread: threading.Thread | None = None
        self._admin: AdminEndpoint | None = None
        self.amqp_port = 0
        self.admin_port = 0
        self.ca_file = ""

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> ServiceBusEmulator:
        from writeback_sandbox.samba import _issue_tls

        self._tmp = tempfile.TemporaryDirectory(prefix="servicebus-emulator-")
        ca, cert, key = _issue_tls(Path(self._tmp.name), self.host, "localhost")
        self.ca_file = str(ca)
        domain = SSLDomain(SSLDomain.MODE_SERVER)
        domain.set_credentials(str(cert), str(key), None)
        container = Container(self._handler)
        container.container_id = "writeback-servicebus-emulator"
        container.allowed_mechs = "ANONYMOUS"  # type: ignore[assignment]
        acceptor = container.listen(f"amqps://{self.host}:0", ssl_domain=domain)
        listening = acceptor._selectable._delegate
        assert isinstance(listening, socket.socket)
        self.amqp_port = listening.getsockname()[1]
        self._thread = threading.Thread(
            target=container.run, name="servicebus-emulator", daemon=True
        )
        self._thread.start()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        self._admin = AdminEndpoint(self, context)
        self.admin_port = self._admin.port
        return self

    def close(self) -> None:
        self._handler.stopping = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ServiceBusEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- how clients reach it ---------------------------------------------------

    @property
    def connection_string(self) -> str:
        return self.connection_string_for(ROOT_RULE)

    def connection_string_for(self, rule: str, *, key: str | None = None) -> str:
        """For the named rule, with its key (or ``key``, to present a wrong one)."""
        secret = key if key is not None else self.rules[rule].key
        return (
            f"Endpoint=sb://{self.host}:{self.admin_port}/;"
            f"SharedAccessKeyName={rule};SharedAccessKey={secret}"
        )

    @property
    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for ``ServiceBusClient``: the AMQP port and the CA."""
        from azure.servicebus import TransportType

        return {
            "custom_endpoint_address": f"sb://{self.host}:{self.amqp_port}",
            "transport_type": TransportType.Amqp,
            "connection_verify": self.ca_file,
        }

    @property
    def admin_options(self) -> dict[str, Any]:
        """Keyword arguments for ``ServiceBusAdministrationClient``: the CA."""
        return {"connection_verify": self.ca_file}

    def client(self, rule: str = ROOT_RULE, **options: Any) -> ServiceBusClient:
        """An SDK client for ``rule`` (no retries unless ``retry_total`` is given)."""
        from azure.servicebus import ServiceBusClient

        return ServiceBusClient.from_connection_string(
            self.connection_string_for(rule), **{"retry_total": 0, **self.client_options, **options}
        )

    def admin(self, rule: str = ROOT_RULE) -> ServiceBusAdministrationClient:
        """An administration client for ``rule``."""
        from azure.servicebus.management import ServiceBusAdministrationClient

        return ServiceBusAdministrationClient.from_connection_string(
            self.connection_string_for(rule), **self.admin_options
        )

    def queue_adapter(self, name: str, rule: str = ROOT_RULE, **options: Any) -> ServiceBusQueue:
        """writeback's ``ServiceBusQueue`` on queue ``name``, built as the product builds
        it from a connection string (``options`` go to it: ``max_delivery_count``...)."""
        from writeback.adapters.servicebus import ServiceBusQueue

        return ServiceBusQueue.from_connection_string(
            self.connection_string_for(rule),
            name,
            client_options=self.client_options,
            admin_options=self.admin_options,
            **options,
        )

    # -- test hooks --------------------------------------------------------------

    def create_queue(self, name: str, settings: QueueSettings | None = None) -> None:
        self.broker.create_queue(name, settings or QueueSettings())

    def queue(self, name: str) -> Entity:
        """The queue's live state (read it under :attr:`lock`)."""
        return self.broker.entity(name)

    @property
    def lock(self) -> Any:
        return self.broker.lock

    def messages(self, path: str) -> list[Stored]:
        """A snapshot of an entity's messages (``queue`` or ``queue/$DeadLetterQueue``)."""
        with self.broker.lock:
            return list(self.broker.entity(path).iter_messages())

    def counts(self, name: str) -> dict[str, int]:
        """Active, scheduled, deferred and dead-lettered messages of a queue."""
        with self.broker.lock:
            queue = self.broker.entity(name)
            counts = queue.counts()
            counts["dead_lettered"] = (
                queue.dead_letters.counts()["active"] if queue.dead_letters else 0
            )
            return counts

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._handler.stats)

    def pending_accepts(self) -> int:
        """Session receivers whose attach waits for a session (none free with messages)."""
        with self.broker.lock:
            return len(self._handler._pending)


@contextmanager
def running_emulator(
    queues: Mapping[str, QueueSettings] | None = None, **options: Any
) -> Iterator[ServiceBusEmulator]:
    with ServiceBusEmulator(queues, **options) as emulator:
        yield emulator
