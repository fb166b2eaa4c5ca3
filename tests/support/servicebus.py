"""The Service Bus emulator for tests: one per module, a fresh queue per test.

A test asks for ``sb`` (the running :class:`ServiceBusEmulator`) and ``queue_name``
(a new session queue with a short lock, made for it), and builds clients with
:func:`sdk_client` and :func:`admin_client`, or the product's adapter with
:func:`adapter`, all through the real SDK over TLS.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient
from azure.servicebus.management import ServiceBusAdministrationClient

from writeback.adapters.servicebus import ServiceBusQueue
from writeback_sandbox.servicebus_emulator import QueueSettings, ServiceBusEmulator

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
    sb: ServiceBusEmulator, *, rule: str | None = None, **options: Any
) -> ServiceBusClient:
    connection = sb.connection_string if rule is None else sb.connection_string_for(rule)
    return ServiceBusClient.from_connection_string(
        connection, **{"retry_total": 0, **sb.client_options, **options}
    )


def admin_client(
    sb: ServiceBusEmulator, *, rule: str | None = None
) -> ServiceBusAdministrationClient:
    connection = sb.connection_string if rule is None else sb.connection_string_for(rule)
    return ServiceBusAdministrationClient.from_connection_string(connection, **sb.admin_options)


def adapter(
    sb: ServiceBusEmulator, queue_name: str, *, rule: str | None = None, **options: Any
) -> ServiceBusQueue:
    """The product's Service Bus queue on the emulator, built the way wiring builds it."""
    connection = sb.connection_string if rule is None else sb.connection_string_for(rule)
    return ServiceBusQueue.from_connection_string(
        connection,
        queue_name,
        client_options=sb.client_options,
        admin_options=sb.admin_options,
        **options,
    )
