"""The AMQP 1.0 side of the emulator: a proton event handler over the broker model.

What a Service Bus namespace does on the wire, as far as the SDK uses it:

* connections over TLS with SASL ANONYMOUS, then a token put on ``$cbs`` for each
  entity (``status-code`` 202 on success, 401 for a token the namespace refuses);
  a link to an entity no token covers is refused with ``amqp:unauthorized-access``;
* a sender link to a queue (max-message-size from the queue's limit); each
  transfer is stored (or dropped as a duplicate) and then accepted, or rejected
  with the broker's error condition;
* a receiver link from a queue or its ``$DeadLetterQueue``: peek-lock (the link's
  rcv-settle-mode second; the SDK settles with accepted, modified for abandon and
  defer, rejected with ``com.microsoft:dead-letter`` for dead-letter, released
  for prefetched messages it gives back) or receive-and-delete (pre-settled). The
  broker answers each settlement with the outcome it applied, or rejected with
  ``com.microsoft:message-lock-lost`` / ``session-lock-lost`` when the lock is
  gone. On a session queue the link's source carries
  ``com.microsoft:session-filter``: a session id, or null for the next session
  with a message ready. The attach is answered once a session is locked, with
  the chosen id in the filter and ``com.microsoft:locked-until-utc`` in the link
  properties; within the link's ``com.microsoft:timeout`` (ms) or refused with
  ``com.microsoft:timeout``; a named session held elsewhere is refused at once
  with ``com.microsoft:session-cannot-be-locked``;
* request/response links on ``<entity>/$management`` (``management.py``).

Everything runs on proton's reactor thread; the broker model is shared with the
test's thread under its lock. A timer ticks every ``tick`` seconds so that time
alone (lock expiry, scheduled messages, TTL, session-accept timeouts) has effect.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, cast

from proton import Condition, Delivery, Event, Handler, Link, Message, symbol
from proton.reactor import Container

from writeback_sandbox.servicebus_emulator import auth, codec, management
from writeback_sandbox.servicebus_emulator.model import (
    Broker,
    BrokerError,
    Entity,
    Receiver,
    Stored,
)

log = logging.getLogger("writeback_sandbox.servicebus_emulator")


class _ClientHangups(logging.Filter):
    """proton logs an ERROR when a client closes its socket without an AMQP close,
    which the SDK does on every close; that is not an emulator fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Couldn't send" in text or "Connection reset" in text)


logging.getLogger("proton").addFilter(_ClientHangups())

SESSION_FILTER: Final = symbol("com.microsoft:session-filter")
LOCKED_UNTIL_UTC: Final = symbol("com.microsoft:locked-until-utc")
LINK_TIMEOUT: Final = symbol("com.microsoft:timeout")
DEAD_LETTER: Final = "com.microsoft:dead-letter"
_DEFAULT_ACCEPT_WAIT: Final = 60.0
_CREDIT: Final = 500


@dataclass(eq=False)
class _Conn:
    grants: list[auth.Grant] = field(default_factory=list)


@dataclass(eq=False)
class _Out:
    """A link the broker sends on: to a receiver of an entity, or a reply link."""

    link: Link
    kind: str  # "entity", "reply"
    node: str
    receiver: Receiver | None = None
    replies: deque[bytes] = field(default_factory=deque)
    #: delivery -> the message it carries (peek-lock). Keyed by the delivery, not its
    #: tag: proton's Python binding reads tags as UTF-8 text, and lock tokens are not.
    unsettled: dict[Delivery, tuple[int, uuid.UUID]] = field(default_factory=dict)


@dataclass(eq=False)
class _PendingAccept:
    out: _Out
    wanted: str | None
    deadline: float


class AmqpHandler(Handler):
    def __init__(self, broker: Broker, host: str, rules: dict[str, auth.SasRule], tick: float):
        super().__init__()
        self.broker = broker
        self.host = host
        self.rules = rules
        self.tick_interval = tick
        self.stopping = False
        self._conns: dict[Any, _Conn] = {}
        self._outs: dict[Any, _Out] = {}
        self._pending: list[_PendingAccept] = []
        self.stats: dict[str, int] = {"connections": 0, "put_tokens": 0, "refused_tokens": 0}

    # -- plumbing ----------------------------------------------------------------

    def on_reactor_init(self, event: Event) -> None:
        event.container.schedule(self.tick_interval, self)

    def on_timer_task(self, event: Event) -> None:
        container: Container = event.container
        if self.stopping:
            container.stop()
            return
        self.pump()
        container.schedule(self.tick_interval, self)

    def _conn(self, connection: Any) -> _Conn:
        state = self._conns.get(connection)
        if state is None:
            state = self._conns[connection] = _Conn()
        return state

    # -- connections and sessions -------------------------------------------------

    def on_connection_remote_open(self, event: Event) -> None:
        connection = event.connection
        assert connection is not None
        self.stats["connections"] += 1
        self._conn(connection)
        connection.container = f"writeback-emulator-{self.host}"
        connection.open()

    def on_session_remote_open(self, event: Event) -> None:
        session = event.session
        assert session is not None
        session.incoming_capacity = 16 * 1024 * 1024
        session.open()

    def on_connection_remote_close(self, event: Event) -> None:
        connection = event.connection
        assert connection is not None
        self._drop_connection(connection)
        connection.close()

    def on_session_remote_close(self, event: Event) -> None:
        if event.session is not None:
            event.session.close()

    def on_transport_closed(self, event: Event) -> None:
        if event.connection is not None:
            self._drop_connection(event.connection)

    def _drop_connection(self, connection: Any) -> None:
        with self.broker.lock:
            for link_key, out in list(self._outs.items()):
                if out.link.connection == connection:
                    self._forget_out(link_key, out)
            self._conns.pop(connection, None)

    # -- links ---------------------------------------------------------------------

    def on_link_remote_open(self, event: Event) -> None:
        link = event.link
        assert link is not None
        if link.is_sender:
            node = link.remote_source.address or ""
        else:
            node = link.remote_target.address or ""
        path = _entity_path(node, self.host)
        with self.broker.lock:
            try:
                if path == "$cbs" or path.lower().endswith("/$management"):
                    self._open_control(link, path)
                elif link.is_receiver:
                    self._open_entity_sender(link, path)
                else:
                    self._open_entity_receiver(link, path)
            except BrokerError as error:
                self._refuse(link, error)
        self.pump()

    def _open_control(self, link: Link, path: str) -> None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if path != "$cbs":
            self.broker.entity(path.rsplit("/", 1)[0])
        if link.is_sender:
            self._outs[link] = _Out(link, "reply", path.lower())
        link.open()
        if link.is_receiver:
            link.flow(_CREDIT)

    def _open_entity_sender(self, link: Link, path: str) -> None:
        """A client's sender: messages into a queue."""
        entity = self.broker.entity(path)
        if entity.is_dead_letter_queue:
            raise BrokerError("amqp:not-allowed", "Cannot send to a dead-letter queue.", 400)
        auth.require(self._conn(link.connection).grants, self.host, path, auth.SEND, self._now())
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.max_message_size = entity.settings.max_message_size
        link.open()
        link.flow(_CREDIT)

    def _open_entity_receiver(self, link: Link, path: str) -> None:
        """A client's receiver: messages out of a queue or its dead-letter queue."""
        entity = self.broker.entity(path)
        now = self._now()
        auth.require(self._conn(link.connection).grants, self.host, path, auth.LISTEN, now)
        filters = _filters(link)
        peek_lock = link.remote_snd_settle_mode != Link.SND_SETTLED
        receiver = Receiver(entity, peek_lock=peek_lock)
        out = _Out(link, "entity", path, receiver)
        if entity.sessions:
            if SESSION_FILTER not in filters:
                raise BrokerError(
                    "amqp:not-allowed",
                    "It is not possible for an entity that requires sessions to create a "
                    "non-sessionful message receiver.",
                )
            wanted = filters[SESSION_FILTER]
            wait = _DEFAULT_ACCEPT_WAIT
            timeout = (link.remote_properties or {}).get(LINK_TIMEOUT)
            if timeout:
                wait = float(timeout) / 1000
            pending = _PendingAccept(out, None if wanted is None else str(wanted), now + wait)
            if not self._try_accept(pending, now):
                self._pending.append(pending)
            return
        if SESSION_FILTER in filters:
            raise BrokerError(
                "amqp:not-allowed",
                f"The entity {path} does not have sessions enabled; a session receiver "
                "cannot be created.",
            )
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        self._outs[link] = out
        link.open()

    def _try_accept(self, pending: _PendingAccept, now: float) -> bool:
        out, receiver = pending.out, pending.out.receiver
        assert receiver is not None
        link = out.link
        session_id = receiver.entity.accept_session(receiver, pending.wanted, now)
        if session_id is None:
            if now < pending.deadline:
                return False
            self._refuse(
                link,
                BrokerError(
                    "com.microsoft:timeout",
                    "The operation did not complete within the allocated time: no session "
                    "with messages became available.",
                ),
            )
            return True
        assert receiver.session is not None
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.source.filter.clear()
        link.source.filter.put_dict({SESSION_FILTER: session_id})
        link.properties = {LOCKED_UNTIL_UTC: codec.ticks(receiver.session.locked_until)}
        self._outs[link] = out
        link.open()
        return True

    def _refuse(self, link: Link, error: BrokerError) -> None:
        log.info("refusing link %s: %s %s", link.name, error.condition, error.description)
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.open()
        link.condition = Condition(error.condition, error.description)
        link.close()

    def on_link_remote_close(self, event: Event) -> None:
        link = event.link
        assert link is not None
        with self.broker.lock:
            out = self._outs.get(link)
            if out is not None:
                self._forget_out(link, out)
            self._pending = [p for p in self._pending if p.out.link != link]
        link.close()
        self.pump()

    def _forget_out(self, link_key: Any, out: _Out) -> None:
        self._outs.pop(link_key, None)
        receiver = out.receiver
        if receiver is None:
            return
        receiver.closed = True
        session = receiver.session
        if session is not None and session.holder is receiver:
            receiver.entity.release_session(session, self._now())
        # Outside sessions a lock outlives its link (it can still be settled through
        # $management): the messages come back when their locks lapse.

    def on_link_flow(self, event: Event) -> None:
        self.pump()

    # -- deliveries ------------------------------------------------------------------

    def on_delivery(self, event: Event) -> None:
        delivery = event.delivery
        assert delivery is not None
        link = delivery.link
        with self.broker.lock:
            if link.is_receiver:
                self._incoming(link, delivery)
            else:
                self._settled_by_peer(link, delivery)
        self.pump()

    def _incoming(self, link: Link, delivery: Delivery) -> None:
        if not delivery.readable or delivery.partial:
            return
        encoded = link.recv(delivery.pending)
        link.advance()
        node = _entity_path(link.remote_target.address or "", self.host)
        try:
            if node == "$cbs":
                self._put_token(link, _decode_message(encoded))
            elif node.lower().endswith("/$management"):
                self._management(link, node, _decode_message(encoded))
            else:
                self._store(link, node, encoded)
            delivery.update(Delivery.ACCEPTED)
        except BrokerError as error:
            delivery.local.condition = Condition(error.condition, error.description)
            delivery.update(Delivery.REJECTED)
        delivery.settle()
        if link.credit < _CREDIT // 2:
            link.flow(_CREDIT - link.credit)

    def _store(self, link: Link, path: str, encoded: bytes) -> None:
        entity = self.broker.entity(path)
        now = self._now()
        auth.require(self._conn(link.connection).grants, self.host, path, auth.SEND, now)
        batch = codec.decode_transfer(encoded)
        # A batch is one transfer: its whole size counts against the limit, and it is
        # stored whole or not at all.
        entity.check_sendable(None, "batch" if entity.sessions else None, len(encoded))
        for incoming in batch:
            entity.check_sendable(incoming.message_id, incoming.session_id, incoming.size)
        for incoming in batch:
            entity.enqueue(
                incoming.message,
                message_id=incoming.message_id,
                session_id=incoming.session_id,
                size=incoming.size,
                ttl=incoming.ttl,
                scheduled_for=incoming.scheduled_for,
                now=now,
            )

    def _put_token(self, link: Link, request: Message) -> None:
        properties: dict[str, Any] = dict(request.properties or {})
        token = request.body
        status, description = 202, "Accepted"
        if isinstance(token, bytes):
            token = token.decode()
        try:
            if properties.get("operation") != "put-token" or not isinstance(token, str):
                raise BrokerError("amqp:not-implemented", "Only put-token is supported.", 400)
            grant = auth.check_token(token, self.rules, self.host, self._now())
            self._conn(link.connection).grants.append(grant)
            self.stats["put_tokens"] += 1
        except BrokerError as error:
            self.stats["refused_tokens"] += 1
            status, description = error.status, error.description
        reply = Message(
            correlation_id=request.id,
            properties={"status-code": status, "status-description": description},
        )
        self._reply(link, "$cbs", request, reply)

    def _management(self, link: Link, node: str, request: Message) -> None:
        properties: dict[str, Any] = dict(request.properties or {})
        operation = str(properties.get("operation") or "")
        entity_path = node.rsplit("/", 1)[0]
        now = self._now()
        try:
            entity = self.broker.entity(entity_path)
            body = request.body if isinstance(request.body, dict) else {}
            answer = management.execute(
                operation,
                management.Request(
                    entity=entity,
                    body={str(k): v for k, v in body.items()},
                    receiver=self._associated(link, properties.get("associated-link-name")),
                    grants=self._conn(link.connection).grants,
                    host=self.host,
                    now=now,
                ),
            )
        except BrokerError as error:
            answer = management.Answer(error.status, error.description, {}, error.condition)
        application = {"statusCode": answer.status, "statusDescription": answer.description}
        if answer.condition:
            application["errorCondition"] = symbol(answer.condition)
        reply = Message(correlation_id=request.id, properties=application, body=answer.value or {})
        self._reply(link, node.lower(), request, reply)

    def _associated(self, link: Link, name: object) -> Receiver | None:
        if not name:
            return None
        for out in self._outs.values():
            if (
                out.receiver is not None
                and out.link.connection == link.connection
                and out.link.name == str(name)
            ):
                return out.receiver
        return None

    def _reply(self, link: Link, node: str, request: Message, reply: Message) -> None:
        target = None
        for out in self._outs.values():
            if out.kind == "reply" and out.node == node.lower():
                if out.link.session == link.session:
                    target = out
                    break
                if out.link.connection == link.connection and target is None:
                    target = out
        if target is None:
            log.info("no reply link for %s on this connection", node)
            return
        if request.reply_to:
            reply.address = request.reply_to
        target.replies.append(bytes(reply.encode()))

    def _settled_by_peer(self, link: Link, delivery: Delivery) -> None:
        out = self._outs.get(link)
        if out is None or out.receiver is None:
            if delivery.remote_state or delivery.settled:
                delivery.settle()
            return
        if not delivery.updated and not delivery.settled:
            return
        held = out.unsettled.pop(delivery, None)
        if held is None:
            delivery.settle()
            return
        _seq, token = held
        entity = out.receiver.entity
        now = self._now()
        state = delivery.remote_state
        try:
            stored = entity.locked(token, out.receiver, now)
            if state == Delivery.ACCEPTED:
                entity.complete(stored)
                delivery.update(Delivery.ACCEPTED)
            elif state == Delivery.RELEASED:
                entity.release(stored)
                delivery.update(Delivery.RELEASED)
            elif state == Delivery.MODIFIED:
                if delivery.remote.undeliverable:
                    entity.defer(stored)
                else:
                    entity.abandon(stored, now)
                delivery.local.failed = bool(delivery.remote.failed)
                delivery.local.undeliverable = bool(delivery.remote.undeliverable)
                delivery.update(Delivery.MODIFIED)
            elif state == Delivery.REJECTED:
                reason, description = _dead_letter_details(delivery.remote.condition)
                entity.dead_letter(stored, reason, description, now)
                delivery.update(Delivery.REJECTED)
            else:
                out.unsettled[delivery] = held
                return
        except BrokerError as error:
            delivery.local.condition = Condition(error.condition, error.description)
            delivery.update(Delivery.REJECTED)
        delivery.settle()

    # -- sending -----------------------------------------------------------------------

    def pump(self) -> None:
        """Deliver what can be delivered; answer session accepts; flush replies."""
        with self.broker.lock:
            now = self._now()
            self.broker.tick(now)
            if self._pending:
                still = []
                for pending in self._pending:
                    try:
                        done = self._try_accept(pending, now)
                    except BrokerError as error:
                        self._refuse(pending.out.link, error)
                        done = True
                    if not done:
                        still.append(pending)
                self._pending = still
            for out in list(self._outs.values()):
                link = out.link
                if link.state & Link.LOCAL_CLOSED:
                    continue
                if out.kind == "reply":
                    while out.replies and link.credit > 0:
                        self._send(link, out.replies.popleft(), settled=True)
                    continue
                self._deliver(out, now)

    def _deliver(self, out: _Out, now: float) -> None:
        link, receiver = out.link, out.receiver
        assert receiver is not None
        entity = receiver.entity
        while link.credit > 0:
            stored = entity.next_delivery(receiver, now)
            if stored is None:
                break
            if receiver.peek_lock:
                token = stored.lock_token
                assert token is not None
                locked_until = None if entity.sessions else stored.locked_until
                encoded = codec.encode_delivery(stored, locked_until=locked_until)
                delivery = self._send(link, encoded, tag=token.bytes_le)
                out.unsettled[delivery] = (stored.seq, token)
            else:
                self._send(link, codec.encode_delivery(stored, locked_until=None), settled=True)
        if link.drain_mode and link.credit > 0:
            link.drained()

    @staticmethod
    def _send(
        link: Link, encoded: bytes, *, tag: bytes | None = None, settled: bool = False
    ) -> Delivery:
        # proton types the tag as str, but hands bytes to the C API as they are.
        delivery = link.delivery(cast(str, tag or uuid.uuid4().bytes))
        link.send(encoded)
        link.advance()
        if settled:
            delivery.settle()
        return delivery

    def _now(self) -> float:
        return self.broker.clock()

    def entity_of(self, stored: Stored) -> Entity | None:  # pragma: no cover - debugging aid
        for queue in self.broker.queues.values():
            if stored.seq in queue.messages:
                return queue
        return None


def _decode_message(encoded: bytes) -> Message:
    message = Message()
    message.decode(encoded)
    return message


def _filters(link: Link) -> dict[Any, Any]:
    data = link.remote_source.filter
    if data is None:
        return {}
    data.rewind()
    if not data.next():
        return {}
    value = data.get_object()
    return dict(value) if isinstance(value, dict) else {}


def _dead_letter_details(condition: Condition | None) -> tuple[str, str]:
    if condition is None:
        return "", ""
    info = condition.info if isinstance(condition.info, dict) else {}
    values = {str(k): v for k, v in info.items()}
    reason = values.get("DeadLetterReason")
    description = values.get("DeadLetterErrorDescription", condition.description)
    return (
        "" if reason is None else str(reason),
        "" if description is None else str(description),
    )


def _entity_path(address: str, host: str) -> str:
    """``amqps://host/queue/$DeadLetterQueue`` or ``queue/$management`` -> the path."""
    if "://" in address:
        address = address.split("://", 1)[1]
        address = address.split("/", 1)[1] if "/" in address else ""
    return address.strip("/")
