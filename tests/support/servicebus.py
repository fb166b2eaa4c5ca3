"""The Service Bus emulator for tests: one per module, a fresh queue per test.

A test asks for ``sb`` (the running :class:`ServiceBusEmulator`) and ``queue_name``
(a new session queue with a short lock, made for it), and builds clients with
:func:`sdk_client` and :func:`admin_client`, or the product's adapter with
:func:`adapter`, all through the real SDK over TLS.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.management import ServiceBusAdministrationClient

from writeback.adapters.servicebus import ORIGINAL_MESSAGE_ID, ServiceBusQueue
from writeback.domain.events import HANDOFF_MARK, HANDOFF_SESSION_PROPERTY
from writeback_sandbox.servicebus_emulator import ROOT_RULE, QueueSettings, ServiceBusEmulator

_names = itertools.count(1)


@pytest.fixture(scope="module")
def sb() -> Iterator[ServiceBusEmulator]:
    with ServiceBusEmulator() as emulator:
        yield emulator


def new_queue(sb: ServiceBusEmulator, **settings: Any) -> str:
    name = f"q{next(_names)}"
    sb.create_queue(name, QueueSettings(**{"lock_duration": 5.0, **settings}))
    return name


@pytest.fixture
def queue_name(sb: ServiceBusEmulator) -> str:
    return new_queue(sb)


def sdk_client(
    sb: ServiceBusEmulator, *, rule: str = ROOT_RULE, **options: Any
) -> ServiceBusClient:
    return sb.client(rule, **options)


def admin_client(
    sb: ServiceBusEmulator, *, rule: str = ROOT_RULE
) -> ServiceBusAdministrationClient:
    return sb.admin(rule)


def adapter(
    sb: ServiceBusEmulator, queue_name: str, *, rule: str = ROOT_RULE, **options: Any
) -> ServiceBusQueue:
    """The product's Service Bus queue on the emulator, built the way wiring builds it."""
    return sb.queue_adapter(queue_name, rule, **options)


def dead_letter_directly(
    client: ServiceBusClient, queue: str, items: list[tuple[str, str]], reason: str
) -> None:
    """Send (message id, session) pairs and dead-letter each, as a worker would."""
    with client.get_queue_sender(queue) as sender:
        for start in range(0, len(items), 100):
            sender.send_messages(
                [
                    ServiceBusMessage(b'{"v":1}', message_id=m, session_id=s)
                    for m, s in items[start : start + 100]
                ]
            )
    for session in sorted({s for _, s in items}):
        with client.get_queue_receiver(queue, session_id=session, max_wait_time=1) as receiver:
            while batch := receiver.receive_messages(max_message_count=200, max_wait_time=0.5):
                for message in batch:
                    receiver.dead_letter_message(
                        message, reason=reason, error_description=f"{reason} here"
                    )


def hand_off_dead_letter(client: ServiceBusClient, queue: str, group: str, message_id: str) -> str:
    """Dead-letter the way the Functions host does: lock a fresh hand-off session,
    send a copy into it (the group's session in an application property), take it
    there and dead-letter it."""
    session = f"{group}{HANDOFF_MARK}{uuid.uuid4().hex[:12]}"
    with client.get_queue_receiver(queue, session_id=session, max_wait_time=2) as receiver:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(
                ServiceBusMessage(
                    b'{"v":1}',
                    message_id=f"{message_id}#x{session.rsplit(HANDOFF_MARK, 1)[1]}",
                    session_id=session,
                    application_properties={
                        HANDOFF_SESSION_PROPERTY: group,
                        ORIGINAL_MESSAGE_ID: message_id,
                    },
                )
            )
        [copy] = receiver.receive_messages(max_message_count=1, max_wait_time=2)
        receiver.dead_letter_message(copy, reason="PolicyRefused", error_description="not ours")
    return session
