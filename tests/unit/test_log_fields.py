"""The structured log fields the alerts and the workbook read, as Application Insights gets them.

The Function app exports the ``writeback`` loggers' records through OpenTelemetry
(``azure-monitor-opentelemetry``'s ``configure_azure_monitor``, see
writeback/logging_setup.py, which puts the ``LoggingHandler`` of
``opentelemetry-instrumentation-logging`` on them); each record's
``extra=`` fields become its custom dimensions, the ``Properties`` column of the
workspace's AppTraces, which infra/modules/alerts.bicep queries. Here the records
of real pipeline runs (on the in-memory ports) go through the same OpenTelemetry
handler and the Azure Monitor exporter's own conversion to an envelope, and the
dimensions are held to what the queries compare: the field names, the values
(strings: numbers are converted, None is dropped) and the parses (``skipped``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from azure.monitor.opentelemetry.exporter.export.logs._exporter import _convert_log_to_envelope
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from tests.support.memory.world import MemoryWorld, memory_world
from writeback.errors import GraphUnavailable, RelayUnavailable
from writeback.logging_setup import RedactingFilter


class Exported:
    """The custom dimensions of every ``writeback`` record, as the exporter builds them."""

    def __init__(self) -> None:
        self.exporter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
        provider = LoggerProvider()
        provider.add_log_record_processor(SimpleLogRecordProcessor(self.exporter))
        self.handler = LoggingHandler(logger_provider=provider)
        self.handler.addFilter(RedactingFilter())  # as logging_setup puts on it

    def dimensions(self) -> list[dict[str, str]]:
        found = []
        for record in self.exporter.get_finished_logs():
            envelope: Any = _convert_log_to_envelope(record)
            found.append(
                {**envelope.data.base_data.properties, "_msg": envelope.data.base_data.message}
            )
        return found

    def where(self, **equal: str) -> list[dict[str, str]]:
        return [d for d in self.dimensions() if all(d.get(k) == v for k, v in equal.items())]


@pytest.fixture
def exported() -> Iterator[Exported]:
    capture = Exported()
    logger = logging.getLogger("writeback")
    level = logger.level
    logger.addHandler(capture.handler)
    logger.setLevel(logging.INFO)
    yield capture
    logger.removeHandler(capture.handler)
    logger.setLevel(level)


@pytest.fixture
def world() -> MemoryWorld:
    return memory_world(member_limit=2)


def test_a_completed_event_carries_its_counts_latency_and_skipped_members(
    world: MemoryWorld, exported: Exported
) -> None:
    ada = world.user("ada")
    guest = world.user("guest", synced=False)
    gid = world.group("Sales", [ada, guest])
    world.notify(gid)
    world.clock.advance(0.25)
    world.drain()
    [line] = exported.where(group_id=gid, outcome="completed")
    assert line["notifications"] == "1" and line["messages"] == "1"
    assert float(line["latency_ms"]) == pytest.approx(250.0)
    assert line["operation"] == "add"
    assert re.findall(r"([a-z-]+)=([0-9]+)", line["skipped"]) == [("member-not-on-prem", "1")]
    assert "reason" not in line  # None is dropped: the workbook shows "-"


def test_a_dead_letter_carries_its_reason(world: MemoryWorld, exported: Exported) -> None:
    gid = world.group("Big", world.users("a", "b", "c"))
    world.notify(gid)
    world.drain()
    [line] = exported.where(group_id=gid, outcome="dead-lettered")
    assert line["reason"] == "OverMemberLimit" and line["messages"] == "1"


def test_an_unreachable_agent_is_logged_as_relay_unavailable(
    world: MemoryWorld, exported: Exported
) -> None:
    gid = world.group("Sales", world.users("ada"))
    world.directory.faults.fail("find_groups", RelayUnavailable("no agent listening"), times=None)
    world.directory.faults.fail("schema_attributes", RelayUnavailable("no agent"), times=None)
    world.notify(gid)
    world.drain()
    lines = exported.where(reason="RelayUnavailable", outcome="abandoned")
    assert lines, exported.dimensions()


def test_reconciles_log_their_reason_outcome_and_error(
    world: MemoryWorld, exported: Exported
) -> None:
    world.group("Sales", world.users("ada"))
    assert world.pipeline.reconcile("schedule") is not None
    [done] = exported.where(outcome="done", reconcile_reason="schedule")
    assert float(done["seconds"]) >= 0 and done["ldap_requests"] == "1"
    assert done["failures"] == "0"
    world.cloud.faults.fail("snapshot", GraphUnavailable("Graph answered 503"), times=None)
    assert world.pipeline.reconcile("schedule") is None
    [failed] = exported.where(outcome="failed", reconcile_reason="schedule")
    assert failed["error"] == "GraphUnavailable"


def test_a_failed_subscription_upkeep_says_so(world: MemoryWorld, exported: Exported) -> None:
    world.pipeline.config = world.config = _with_urls(world)
    world.cloud.faults.fail("list_subscriptions", GraphUnavailable("503"), times=None)
    with pytest.raises(GraphUnavailable):
        world.pipeline.subscription_upkeep()
    [line] = exported.where(subscription_action="failed")
    assert line["error"] == "GraphUnavailable" and line["outcome"] == "failed"


def _with_urls(world: MemoryWorld) -> Any:
    from dataclasses import replace

    return replace(
        world.config,
        notification_url="https://writeback.example/api/notifications",
        client_state="log-fields-client-state",
    )
