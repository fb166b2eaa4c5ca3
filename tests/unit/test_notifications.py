"""The webhook handler: handshake, clientState, filtering, coalescing, failures, speed."""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from writeback.domain.events import Change, GroupChanged
from writeback.ports import DeadLetter, OutgoingMessage, ReceivedMessage
from writeback.service.notifications import (
    MAX_BODY_BYTES,
    LifecycleEvent,
    WebhookResponse,
    handle_webhook,
)

SECRET = "c1ient-st@te-7f3a9e"
TOKEN = "Validation: Testing client application reachability for subscription Request-Id: 1+2/3"
SUBSCRIPTION = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
TENANT = "7d5b3a4e-1c2f-4e8a-9b6d-0a1b2c3d4e5f"


class MemoryQueue:
    """A real in-memory :class:`writeback.ports.EventQueue`: sessions, peek-lock,
    dead letters and duplicate detection on ``message_id``. ``fail_sends`` makes
    the next sends raise (the queue service being down)."""

    def __init__(self, *, max_delivery_count: int = 10, clock: Any = time.time) -> None:
        self.max_delivery_count = max_delivery_count
        self.clock = clock
        self.fail_sends = 0
        self.sends = 0
        self.dropped_duplicates = 0
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._ready: list[ReceivedMessage] = []
        self._locked_sessions: set[str] = set()
        self._dead: list[DeadLetter] = []

    def send(self, messages: list[OutgoingMessage]) -> None:
        with self._lock:
            self.sends += 1
            if self.fail_sends > 0:
                self.fail_sends -= 1
                raise ConnectionError("queue service unavailable")
            for message in messages:
                if message.message_id in self._seen:
                    self.dropped_duplicates += 1
                    continue
                self._seen.add(message.message_id)
                self._ready.append(
                    ReceivedMessage(
                        body=message.body,
                        message_id=message.message_id,
                        session_id=message.session_id,
                        delivery_count=0,
                        enqueued_at=self.clock(),
                    )
                )

    def receive_session(self, max_messages: int, wait: float) -> list[ReceivedMessage]:
        with self._lock:
            for message in self._ready:
                session = message.session_id
                if session in self._locked_sessions:
                    continue
                self._locked_sessions.add(session)
                taken = [m for m in self._ready if m.session_id == session][:max_messages]
                return [replace(m, delivery_count=m.delivery_count + 1) for m in taken]
            return []

    def complete(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._ready = [m for m in self._ready if m.message_id != message.message_id]

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        with self._lock:
            for index, queued in enumerate(self._ready):
                if queued.message_id == message.message_id:
                    if message.delivery_count >= self.max_delivery_count:
                        del self._ready[index]
                        self._dead.append(self._dead_letter(message, "MaxDeliveryCount", ""))
                    else:
                        self._ready[index] = replace(queued, delivery_count=message.delivery_count)
                    return

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        with self._lock:
            self._ready = [m for m in self._ready if m.message_id != message.message_id]
            self._dead.append(self._dead_letter(message, reason, description))

    def release_session(self, session_id: str) -> None:
        with self._lock:
            self._locked_sessions.discard(session_id)

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        with self._lock:
            return self._dead[:limit]

    def resubmit(self, dead_letter: DeadLetter) -> None:
        with self._lock:
            self._dead.remove(dead_letter)
            self._ready.append(
                ReceivedMessage(
                    dead_letter.body,
                    dead_letter.message_id,
                    dead_letter.session_id,
                    0,
                    self.clock(),
                )
            )

    def depth(self) -> int:
        with self._lock:
            return len(self._ready)

    def events(self) -> list[GroupChanged]:
        with self._lock:
            return [GroupChanged.from_json(m.body) for m in self._ready]

    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._ready)

    def _dead_letter(self, message: ReceivedMessage, reason: str, text: str) -> DeadLetter:
        return DeadLetter(
            message.body, message.message_id, message.session_id, reason, text, self.clock()
        )


def gid(n: int) -> str:
    return str(uuid.UUID(int=n, version=4))


def item(
    group_id: str,
    *,
    change: str = "updated",
    sequence: int | None = 1,
    client_state: object = SECRET,
    subscription: str = SUBSCRIPTION,
    **extra: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "@odata.type": "#Microsoft.Graph.Group",
        "@odata.id": f"Groups/{group_id}",
        "id": group_id,
        "organizationId": TENANT,
        "eventTime": "2026-11-14T10:00:00.1234567Z",
    }
    if sequence is not None:
        data["sequenceNumber"] = sequence
    body: dict[str, Any] = {
        "subscriptionId": subscription,
        "subscriptionExpirationDateTime": "2026-12-10T10:00:00.0000000Z",
        "clientState": client_state,
        "changeType": change,
        "resource": f"Groups/{group_id}",
        "tenantId": TENANT,
        "resourceData": data,
    }
    body.update(extra)
    return body


def collection(*items: dict[str, Any]) -> bytes:
    return json.dumps({"value": list(items)}).encode()


def post(
    body: bytes,
    queue: MemoryQueue,
    *,
    query: dict[str, str] | None = None,
    client_state: str | Iterable[str] = SECRET,
    on_lifecycle: Any = None,
    method: str = "POST",
) -> WebhookResponse:
    return handle_webhook(
        method=method,
        query=query or {},
        body=body,
        content_type="application/json; charset=utf-8",
        client_state=client_state,
        queue=queue,
        now=lambda: 1_800_000_000.0,
        on_lifecycle=on_lifecycle,
    )


# --------------------------------------------------------------------------- handshake


def test_validation_token_is_echoed_as_text_whatever_the_body() -> None:
    queue = MemoryQueue()
    for body in (b"", b"garbage \x00\xff", collection(item(gid(1)))):
        response = post(body, queue, query={"validationToken": TOKEN})
        assert response == WebhookResponse(200, TOKEN.encode(), "text/plain")
    assert queue.sends == 0


def test_validation_token_is_not_decoded_twice_and_its_name_is_case_insensitive() -> None:
    queue = MemoryQueue()
    response = post(b"", queue, query={"validationtoken": "a%2Bb c+d"})
    assert response.status == 200
    assert response.body == b"a%2Bb c+d"


@pytest.mark.parametrize("token", ["", "x" * 1025, "line\nbreak", "tab\there", "nul\x00"])
def test_bad_validation_tokens_are_refused(token: str) -> None:
    response = post(b"", MemoryQueue(), query={"validationToken": token})
    assert response.status == 400
    assert response.body == b""


# --------------------------------------------------------------------------- notifications


def test_groups_are_enqueued_in_one_send_one_message_per_group() -> None:
    queue = MemoryQueue()
    a, b = gid(1), gid(2)
    body = collection(
        item(a, sequence=1),
        item(b, sequence=2),
        item(a, sequence=3, change="deleted"),
        item(a, sequence=4),
    )
    response = post(body, queue)
    assert response == WebhookResponse(202, b"", "text/plain")
    assert queue.sends == 1
    events = {e.group_id: e for e in queue.events()}
    assert set(events) == {a, b}
    assert events[a].change is Change.DELETED  # deleted wins over updated
    assert events[b].change is Change.UPDATED
    assert events[a].received_at == 1_800_000_000.0
    for message in queue.messages():
        assert message.session_id == GroupChanged.from_json(message.body).group_id
        assert message.message_id == GroupChanged.from_json(message.body).notification_id
        assert len(message.message_id) <= 128


def test_group_found_by_resource_or_odata_type_and_ids_are_normalised() -> None:
    queue = MemoryQueue()
    upper = gid(3).upper()
    by_type = item(gid(4), resource="directoryObjects/whatever")
    by_resource = item(upper, resource=f"/groups/{upper}")
    del by_resource["resourceData"]["@odata.type"]
    assert post(collection(by_type, by_resource), queue).status == 202
    assert {e.group_id for e in queue.events()} == {gid(3), gid(4)}


def test_non_group_and_malformed_items_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    queue = MemoryQueue()
    user = item(gid(5), resource=f"Users/{gid(5)}")
    user["resourceData"]["@odata.type"] = "#Microsoft.Graph.User"
    not_guid = item("not-a-guid")
    mismatch = item(gid(6), resource=f"Groups/{gid(7)}")
    odd_change = item(gid(8), change="Validation: x")
    caplog.set_level(logging.INFO, "writeback.webhook")
    response = post(collection(user, not_guid, mismatch, odd_change), queue)
    assert response.status == 202
    assert queue.sends == 0  # nothing to persist: no empty send
    assert getattr(caplog.records[-1], "webhook_ignored", None) == 4
    good = item(gid(9))
    assert post(collection(user, good), queue).status == 202
    assert [e.group_id for e in queue.events()] == [gid(9)]


def test_an_empty_collection_is_acknowledged() -> None:
    queue = MemoryQueue()
    assert post(b'{"value": []}', queue).status == 202
    assert queue.sends == 0


def test_a_wrong_client_state_anywhere_refuses_the_whole_post() -> None:
    queue = MemoryQueue()
    for bad in ("wrong", "", None, 42, SECRET + "x", SECRET.upper(), "x" * 200):
        body = collection(item(gid(1)), item(gid(2), client_state=bad))
        assert post(body, queue).status == 403
    missing = item(gid(1))
    del missing["clientState"]
    assert post(collection(missing), queue).status == 403
    assert queue.sends == 0


def test_no_configured_client_state_refuses_everything() -> None:
    queue = MemoryQueue()
    assert post(collection(item(gid(1), client_state="")), queue, client_state="").status == 403
    assert post(collection(item(gid(1))), queue, client_state=()).status == 403
    assert queue.sends == 0


def test_a_rotated_client_state_accepts_old_and_new() -> None:
    queue = MemoryQueue()
    body = collection(item(gid(1), client_state="old-secret"), item(gid(2), client_state=SECRET))
    assert post(body, queue, client_state=[SECRET, "old-secret"]).status == 202
    assert queue.depth() == 2


def test_redelivery_of_the_same_post_has_the_same_message_ids() -> None:
    queue = MemoryQueue()
    body = collection(item(gid(1), sequence=7), item(gid(2), sequence=8))
    assert post(body, queue).status == 202
    first = sorted(m.message_id for m in queue.messages())
    assert post(body, queue).status == 202  # Graph retried: the same notifications again
    assert queue.depth() == 2
    assert queue.dropped_duplicates == 2
    assert sorted(m.message_id for m in queue.messages()) == first


def test_a_later_change_of_the_same_group_gets_a_new_message_id() -> None:
    queue = MemoryQueue()
    assert post(collection(item(gid(1), sequence=7)), queue).status == 202
    assert post(collection(item(gid(1), sequence=9)), queue).status == 202
    assert post(collection(item(gid(1), sequence=9, change="deleted")), queue).status == 202
    assert post(collection(item(gid(1), sequence=9, subscription=gid(99))), queue).status == 202
    assert queue.depth() == 4
    assert queue.dropped_duplicates == 0


def test_items_without_sequence_or_time_are_never_taken_for_duplicates() -> None:
    queue = MemoryQueue()
    bare = item(gid(1), sequence=None)
    del bare["resourceData"]["eventTime"]
    body = collection(bare)
    assert post(body, queue).status == 202
    assert post(body, queue).status == 202
    assert queue.depth() == 2


def test_a_failing_queue_gives_503_and_no_lifecycle_call() -> None:
    queue = MemoryQueue()
    queue.fail_sends = 1
    seen: list[LifecycleEvent] = []
    lifecycle = {
        "subscriptionId": SUBSCRIPTION,
        "clientState": SECRET,
        "lifecycleEvent": "reauthorizationRequired",
    }
    body = collection(item(gid(1)), lifecycle)
    assert post(body, queue, on_lifecycle=seen.append).status == 503
    assert seen == []
    assert queue.depth() == 0
    assert post(body, queue, on_lifecycle=seen.append).status == 202  # Graph's retry
    assert queue.depth() == 1
    assert seen == [LifecycleEvent(SUBSCRIPTION, "reauthorizationRequired")]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe{}",
        b"[]",
        b'"value"',
        b'{"value": 5}',
        b'{"value": [1, 2]}',
        b'{"value": [{}, []]}',
        b'{"nothing": []}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"value": [' + b"9" * 5000 + b"]}",
    ],
)
def test_garbage_bodies_are_400_and_enqueue_nothing(body: bytes) -> None:
    queue = MemoryQueue()
    assert post(body, queue).status == 400
    assert queue.sends == 0


def test_oversized_bodies_are_413_and_other_methods_405() -> None:
    queue = MemoryQueue()
    big = collection(item(gid(1), padding="x" * MAX_BODY_BYTES))
    assert post(big, queue).status == 413
    assert post(collection(item(gid(1))), queue, method="GET").status == 405
    assert post(b"", queue, method="DELETE", query={"validationToken": TOKEN}).status == 405
    assert queue.sends == 0


# --------------------------------------------------------------------------- lifecycle


def lifecycle_item(event: str, *, client_state: object = SECRET) -> dict[str, Any]:
    return {
        "subscriptionId": SUBSCRIPTION.upper(),
        "subscriptionExpirationDateTime": "2026-12-10T10:00:00.0000000Z",
        "tenantId": TENANT,
        "clientState": client_state,
        "lifecycleEvent": event,
    }


def test_lifecycle_events_are_passed_on_and_acknowledged() -> None:
    queue = MemoryQueue()
    seen: list[LifecycleEvent] = []
    body = collection(
        lifecycle_item("reauthorizationRequired"),
        lifecycle_item("subscriptionRemoved"),
        lifecycle_item("missed"),
        lifecycle_item("somethingNew"),
    )
    assert post(body, queue, on_lifecycle=seen.append).status == 202
    assert seen == [
        LifecycleEvent(SUBSCRIPTION, "reauthorizationRequired"),
        LifecycleEvent(SUBSCRIPTION, "subscriptionRemoved"),
        LifecycleEvent(SUBSCRIPTION, "missed"),
    ]
    assert queue.sends == 0
    # Without a handler they are still acknowledged (and counted in the log line).
    assert post(body, queue).status == 202


def test_lifecycle_events_need_the_client_state_and_a_working_handler() -> None:
    queue = MemoryQueue()
    seen: list[LifecycleEvent] = []
    wrong = collection(lifecycle_item("subscriptionRemoved", client_state="nope"))
    assert post(wrong, queue, on_lifecycle=seen.append).status == 403
    assert seen == []

    def broken(event: LifecycleEvent) -> None:
        raise RuntimeError("store down")

    good = collection(lifecycle_item("reauthorizationRequired"))
    assert post(good, queue, on_lifecycle=broken).status == 503


# --------------------------------------------------------------------------- logging


def test_no_secret_token_or_body_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "BODY-MARKER-5c1d"
    queue = MemoryQueue()
    post(b"", queue, query={"validationToken": TOKEN})
    post(b"", queue, query={"validationToken": TOKEN + "\n"})
    post(collection(item(gid(1), note=marker)), queue)
    post(collection(item(gid(2), client_state=SECRET + "-forged", note=marker)), queue)
    post(b"{" + marker.encode() + SECRET.encode(), queue)
    queue.fail_sends = 1
    post(collection(item(gid(3), note=marker)), queue)
    assert len(caplog.records) >= 6
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(str(v) for v in vars(record).values())
        for secret in (SECRET, TOKEN, "Request-Id", marker):
            assert secret not in text
    statuses = [getattr(r, "webhook_status", None) for r in caplog.records]
    assert [s for s in statuses if s is not None] == [200, 400, 202, 403, 400, 503]


# --------------------------------------------------------------------------- fuzz

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_ids = st.sampled_from([gid(1), gid(2), gid(1).upper(), "x", "", SUBSCRIPTION])
_fuzz_item = st.fixed_dictionaries(
    {},
    optional={
        "clientState": st.sampled_from([SECRET, SECRET, "wrong", "", None, 7]),
        "changeType": st.sampled_from(["updated", "deleted", "created", "Updated", "x", None]),
        "resource": st.one_of(_ids.map(lambda i: f"Groups/{i}"), st.text(max_size=12)),
        "subscriptionId": _ids,
        "lifecycleEvent": st.sampled_from(["reauthorizationRequired", "missed", "bogus"]),
        "resourceData": st.fixed_dictionaries(
            {},
            optional={
                "id": _ids | _json,
                "@odata.type": st.sampled_from(["#Microsoft.Graph.Group", "#x", ""]),
                "sequenceNumber": _json,
                "eventTime": _json,
            },
        )
        | _json,
        "extra": _json,
    },
)
_bodies = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    st.lists(_fuzz_item | _json, max_size=6).map(lambda v: json.dumps({"value": v}).encode()),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, failing=st.booleans())
def test_fuzzed_bodies_enqueue_only_with_the_client_state_and_fail_only_with_the_queue(
    body: bytes, failing: bool
) -> None:
    queue = MemoryQueue()
    queue.fail_sends = 1 if failing else 0
    lifecycle: list[LifecycleEvent] = []
    response = post(body, queue, on_lifecycle=lifecycle.append)
    assert response.status in (202, 400, 403, 503)
    if response.status >= 500:
        assert failing and queue.sends == 1
    if queue.sends or lifecycle:
        items = json.loads(body)["value"]
        assert all(i.get("clientState") == SECRET for i in items)
    if response.status != 202:
        assert queue.depth() == 0 and lifecycle == []
    for event in queue.events():
        assert event.group_id in (gid(1), gid(2))


# --------------------------------------------------------------------------- speed


def test_a_100_item_post_is_handled_in_milliseconds() -> None:
    groups = [gid(n) for n in range(1, 81)]
    items = [item(g, sequence=n) for n, g in enumerate(groups)]
    items += [item(groups[n], sequence=1000 + n) for n in range(20)]  # 20 repeats
    body = collection(*items)
    timings: list[float] = []
    for _ in range(50):
        queue = MemoryQueue()
        started = time.perf_counter()
        response = post(body, queue)
        timings.append(time.perf_counter() - started)
        assert response.status == 202
        assert queue.depth() == 80
    median, worst = statistics.median(timings), max(timings)
    print(f"100-item POST: median {median * 1000:.2f} ms, max {worst * 1000:.2f} ms")
    assert median < 0.05  # Graph allows 3 s; this leaves the host and the queue the rest
