"""Single-machine mode's figures as Prometheus metrics (``GET /metrics`` in ``serve``).

Rendered by ``prometheus-client`` (the ``serve`` extra) from what the server and
its pipeline already count, at scrape time: a collector reads
:attr:`Server.stats <writeback.hosting.serve.Server.stats>` (the pipeline's
counters and the host's, one snapshot), the queue (depth, waiting retries, dead
letters by reason) and the state file (the last reconcile, the subscription), so
nothing is counted twice and a scrape changes nothing. Counters count since the process started, as
Prometheus expects (``rate()`` handles restarts); the latency histogram is the
pipeline's own counts, one observation per completed notification (seconds from
the webhook accepting it to its write), kept since start in bounded memory.

Metric names, labels and meanings are listed in the README (single-machine mode,
"Monitoring"); tests/integration/test_metrics.py scrapes a running server and
parses the text with prometheus-client's own parser.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from writeback.domain.times import parse_iso
from writeback.errors import WritebackError
from writeback.service.pipeline import LATENCY_BUCKETS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from writeback.hosting.serve import Server, ServerStats


def _latency_family(stats: ServerStats) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip((*LATENCY_BUCKETS, math.inf), stats.latency_buckets, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
    return HistogramMetricFamily(
        "writeback_event_latency_seconds",
        "Seconds from the webhook accepting a notification to its write completing.",
        buckets=buckets,
        sum_value=stats.latency_sum,
    )


class ServerCollector(Collector):
    """Every figure of one :class:`~writeback.hosting.serve.Server`, read at scrape time."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        stats = server.stats  # the pipeline's counters and the host's, one snapshot
        counters = {
            "notifications_enqueued": (
                "Messages the webhook put in the queue (Graph's redeliveries included; "
                "the queue drops duplicates).",
                stats.enqueued,
            ),
            "events": ("Notified group changes completed.", stats.events),
            "confirmations": (
                "Confirmation reads completed (after the settle interval).",
                stats.confirmations,
            ),
            "batches": ("Session batches handled (one group's burst each).", stats.batches),
            "unchanged_batches": ("Completed batches that needed no write.", stats.unchanged),
            "covered_events": ("Completed messages a later read covered.", stats.covered),
            "worker_errors": (
                "Errors no adapter maps (bugs), caught by the pipeline or a worker loop.",
                stats.worker_errors,
            ),
            "lifecycle_events": ("Graph lifecycle events handled.", stats.lifecycle_events),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(f"writeback_{name}", documentation, value=value)
        labelled: dict[str, tuple[str, tuple[str, ...], Mapping[tuple[str, ...], int]]] = {
            "operations": (
                "Operations the event writes made, by kind.",
                ("kind",),
                {(kind,): n for kind, n in stats.operations.items()},
            ),
            "ldap_writes": (
                "LDAP requests the writes took, by what made them.",
                ("source",),
                {("event",): stats.writes, ("reconcile",): stats.reconcile_writes},
            ),
            "messages_settled": (
                "Queue messages settled, by settlement (completed, dead-lettered, abandoned, "
                "parked) and reason (the dead-letter reason, the transient error, why parked).",
                ("settlement", "reason"),
                {(s, r or "none"): n for (s, r), n in stats.settled.items()},
            ),
            "skipped_members": (
                "Members left out of the groups the events wrote, by reason.",
                ("reason",),
                {(reason,): n for reason, n in stats.skipped_by_reason.items()},
            ),
            "reconciles": (
                "Reconciles run, by outcome.",
                ("outcome",),
                {("done",): stats.reconciles, ("failed",): stats.reconcile_failures},
            ),
        }
        for name, (documentation, labels, values) in labelled.items():
            family = CounterMetricFamily(f"writeback_{name}", documentation, labels=labels)
            for key, value in sorted(values.items()):
                family.add_metric(key, value)
            yield family
        yield _latency_family(stats)
        yield _gauge(
            "pending_deletes", "Deletes waiting for a confirming read.", stats.pending_deletes
        )
        yield _gauge(
            "paused", "1 while writes are paused (events wait in the queue).", int(server.paused)
        )
        yield from _queue(server)
        yield from _state(server.pipeline.state.read(), server)


def _queue(server: Server) -> Iterator[Metric]:
    available = "1 when the queue answered this scrape."
    try:
        depth = server.queue.depth()
        scheduled = server.queue.scheduled_count()
        dead = server.queue.dead_letter_count_by_reason()
    except WritebackError:
        yield _gauge("queue_available", available, 0)
        return
    yield _gauge("queue_available", available, 1)
    yield _gauge("queue_depth", "Messages waiting in the queue (active).", depth)
    yield _gauge(
        "queue_scheduled",
        "Messages scheduled for later (delayed retries, confirmations, parked).",
        scheduled,
    )
    family = GaugeMetricFamily(
        "writeback_dead_letters",
        "Dead-lettered messages in the queue, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted(dead.items()):
        family.add_metric((reason,), count)
    yield family


def _state(state: Mapping[str, Any], server: Server) -> Iterator[Metric]:
    """The last reconcile and the subscription, as the state file records them."""
    last = state.get("last_reconcile")
    last = last if isinstance(last, dict) else {}
    started = _timestamp(last.get("at"))
    if started is not None:
        yield _gauge(
            "last_reconcile_timestamp_seconds", "When the last reconcile started.", started
        )
        success = 0 if last.get("error") else 1
        yield _gauge("last_reconcile_success", "1 when the last reconcile ran to its end.", success)
        if isinstance(last.get("seconds"), int | float):
            seconds = float(last["seconds"])
            yield _gauge("last_reconcile_duration_seconds", "How long it took.", seconds)
    subscription = state.get("subscription")
    record = subscription if isinstance(subscription, dict) else {}
    expiry = server.subscription_expiration
    expires = expiry.timestamp() if expiry is not None else _timestamp(record.get("expiration"))
    if expires is not None:
        yield _gauge(
            "subscription_expiry_timestamp_seconds",
            "When the Graph subscription expires unless renewed.",
            expires,
        )
    if record.get("action"):
        success = 0 if record.get("error") else 1
        yield _gauge(
            "subscription_upkeep_success", "1 when the last subscription upkeep worked.", success
        )
        checked = _timestamp(record.get("checked_at"))
        if checked is not None:
            yield _gauge(
                "subscription_upkeep_timestamp_seconds",
                "When the subscription was last created, renewed or checked.",
                checked,
            )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"writeback_{name}", documentation, value=value)


def _timestamp(text: object) -> float | None:
    """Unix time of an ISO 8601 time the state file holds (read as ``status`` reads it)."""
    moment = parse_iso(text)
    return moment.timestamp() if moment is not None else None


class Exposition:
    """One server's registry; :meth:`render` is the body of ``GET /metrics``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, server: Server) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server))

    def render(self) -> bytes:
        return generate_latest(self.registry)
