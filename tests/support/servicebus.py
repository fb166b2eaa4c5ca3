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
