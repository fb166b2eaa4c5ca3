"""The Service Bus emulator, driven by the real azure-servicebus SDK over TLS.

Each test makes its own queue on one emulator per module and talks to it only
through the SDK's public API, so what passes here is what the SDK does against
the broker's documented rules (sessions, locks, settlement, scheduling,
duplicates, TTL, the dead-letter sub-queue, management operations).
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time

import pytest
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus import exceptions as sb_errors

from tests.support.servicebus import admin_client, new_queue, queue_name, sb, sdk_client
from writeback_sandbox.servicebus_emulator import APP_RULE, ServiceBusEmulator

__all__ = ["queue_name", "sb"]  # fixtures


def send(client: ServiceBusClient, queue: str, *messages: ServiceBusMessage) -> None:
    with client.get_queue_sender(queue) as sender:
        sender.send_messages(list(messages))


def seq(message: ServiceBusReceivedMessage) -> int:
    assert message.sequence_number is not None
    return message.sequence_number


def msg(message_id: str, session: str | None = "g1", body: bytes = b"{}") -> ServiceBusMessage:
    return ServiceBusMessage(body, message_id=message_id, session_id=session)


def test_tls_is_validated_against_the_emulators_own_ca(sb: ServiceBusEmulator) -> None:
    context = ssl.create_default_context(cafile=sb.ca_file)
    with (
        socket.create_connection((sb.host, sb.amqp_port)) as raw,
        context.wrap_socket(raw, server_hostname=sb.host),
    ):
        pass  # the CA the tests are given signs the certificate, for 127.0.0.1
    options = {**sb.client_options}
    options.pop("connection_verify")
    with (
        ServiceBusClient.from_connection_string(
            sb.connection_string, retry_total=0, **options
        ) as client,
        pytest.raises(sb_errors.ServiceBusError),
    ):
        send(client, new_queue(sb), msg("m1"))  # the system store does not know the CA


def test_a_wrong_key_is_refused_and_the_right_one_works(sb: ServiceBusEmulator) -> None:
    queue = new_queue(sb)
    wrong = sb.connection_string_for("RootManageSharedAccessKey", key="d3Jvbmc=")
    with ServiceBusClient.from_connection_string(wrong, retry_total=0, **sb.client_options) as c:
        with pytest.raises(sb_errors.ServiceBusError) as caught:
            send(c, queue, msg("m1"))
        assert isinstance(
            caught.value,
            sb_errors.ServiceBusAuthenticationError | sb_errors.ServiceBusConnectionError,
        )
    assert sb.counts(queue)["active"] == 0
    with sdk_client(sb) as client:
        send(client, queue, msg("m1"))
    assert sb.counts(queue)["active"] == 1
    assert sb.stats["refused_tokens"] >= 1


def test_send_and_receive_a_session_in_peek_lock(sb: ServiceBusEmulator, queue_name: str) -> None:
    with sdk_client(sb) as client:
        send(client, queue_name, msg("a", "g1"), msg("b", "g2"), msg("c", "g1"))
        with client.get_queue_receiver(queue_name, session_id="g1", max_wait_time=2) as receiver:
            got = receiver.receive_messages(max_message_count=10, max_wait_time=2)
            assert [m.message_id for m in got] == ["a", "c"]  # FIFO within the session
            assert receiver.session.session_id == "g1"
            locked_until = receiver.session.locked_until_utc
            assert locked_until is not None
            assert locked_until > datetime.datetime.now(datetime.UTC)
            assert all(m.delivery_count in (0, None) for m in got)
            assert seq(got[0]) < seq(got[1])
            assert got[0].enqueued_time_utc is not None
            for message in got:
                receiver.complete_message(message)
    assert sb.counts(queue_name)["active"] == 1  # g2's message is still there


def test_receive_and_delete_removes_on_delivery(sb: ServiceBusEmulator) -> None:
    queue = new_queue(sb, requires_session=False)
    with sdk_client(sb) as client:
        send(client, queue, msg("a", None), msg("b", None))
        with client.get_queue_receiver(
            queue, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE, max_wait_time=2
        ) as receiver:
            got = receiver.receive_messages(max_message_count=5, max_wait_time=2)
    assert [m.message_id for m in got] == ["a", "b"]
    assert sb.counts(queue)["active"] == 0


def test_next_available_session_skips_locked_ones_and_times_out_when_none(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        send(client, queue_name, msg("a", "g1"), msg("b", "g2"))
        with (
            client.get_queue_receiver(
                queue_name, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=2
            ) as first,
            client.get_queue_receiver(
                queue_name, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=2
            ) as second,
        ):
            one = first.receive_messages(max_message_count=5, max_wait_time=2)
            two = second.receive_messages(max_message_count=5, max_wait_time=2)
            assert {first.session.session_id, second.session.session_id} == {"g1", "g2"}
            assert len(one) == len(two) == 1
            started = time.monotonic()
            with (
                pytest.raises(sb_errors.OperationTimeoutError),
                client.get_queue_receiver(
                    queue_name, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
                ) as third,
            ):
                third.receive_messages(max_message_count=1, max_wait_time=1)
            assert time.monotonic() - started < 5


def test_a_named_session_held_elsewhere_cannot_be_locked(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        send(client, queue_name, msg("a", "g1"))
        with client.get_queue_receiver(queue_name, session_id="g1", max_wait_time=1) as holder:
            holder.receive_messages(max_message_count=1, max_wait_time=1)
            with (
                pytest.raises(sb_errors.SessionCannotBeLockedError),
                client.get_queue_receiver(queue_name, session_id="g1", max_wait_time=1) as other,
            ):
                other.receive_messages(max_message_count=1, max_wait_time=1)


def test_sessions_under_contention_go_to_one_receiver_each(sb: ServiceBusEmulator) -> None:
    queue = new_queue(sb)
    sessions = [f"g{i}" for i in range(6)]
    with sdk_client(sb) as client:
        send(client, queue, *[msg(f"{s}-{n}", s) for s in sessions for n in range(3)])
    got: dict[str, list[str]] = {}
    overlap: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        with sdk_client(sb) as client:
            while True:
                try:
                    receiver = client.get_queue_receiver(
                        queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
                    )
                    with receiver:
                        batch = receiver.receive_messages(max_message_count=10, max_wait_time=1)
                        session = receiver.session.session_id
                        with lock:
                            if session in got:
                                overlap.append(session)
                            got.setdefault(session, []).extend(str(m.message_id) for m in batch)
                        for message in batch:
                            receiver.complete_message(message)
                except sb_errors.OperationTimeoutError:
                    return

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(got) == sessions
    assert all(got[s] == [f"{s}-{n}" for n in range(3)] for s in sessions)
    assert overlap == []  # each session was locked by exactly one receiver
    assert sb.counts(queue)["active"] == 0


def test_abandon_counts_deliveries_and_the_maximum_dead_letters(sb: ServiceBusEmulator) -> None:
    queue = new_queue(sb, max_delivery_count=3)
    with sdk_client(sb) as client:
        send(client, queue, msg("a"))
        counts = []
        for _ in range(3):
            with client.get_queue_receiver(queue, session_id="g1", max_wait_time=1) as receiver:
                [message] = receiver.receive_messages(max_message_count=1, max_wait_time=2)
                counts.append(message.delivery_count or 0)
                receiver.abandon_message(message)
        assert counts == [0, 1, 2]
        with client.get_queue_receiver(
            queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=2
        ) as dlq:
            [dead] = dlq.receive_messages(max_message_count=5, max_wait_time=2)
            assert dead.message_id == "a"
            assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
            assert "3 delivery attempts" in (dead.dead_letter_error_description or "")
            dlq.complete_message(dead)
    assert sb.counts(queue) == {"active": 0, "scheduled": 0, "deferred": 0, "dead_lettered": 0}


def test_dead_letter_with_reason_and_read_the_sub_queue(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        send(client, queue_name, msg("a"), msg("b"))
        with client.get_queue_receiver(queue_name, session_id="g1", max_wait_time=1) as receiver:
            for message in receiver.receive_messages(max_message_count=2, max_wait_time=2):
                receiver.dead_letter_message(
                    message, reason="PoisonEvent", error_description=f"bad {message.message_id}"
                )
        with client.get_queue_receiver(
            queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1
        ) as dlq:  # a non-session receiver on a session queue's dead letters
            peeked = dlq.peek_messages(max_message_count=10)
            assert [(m.message_id, m.session_id, m.dead_letter_reason) for m in peeked] == [
                ("a", "g1", "PoisonEvent"),
                ("b", "g1", "PoisonEvent"),
            ]
            assert peeked[1].dead_letter_error_description == "bad b"
            rest = dlq.peek_messages(10, sequence_number=seq(peeked[1]))
            assert [m.message_id for m in rest] == ["b"]
    with pytest.raises(sb_errors.ServiceBusError), sdk_client(sb) as client:
        client.get_queue_receiver(queue_name, max_wait_time=1).receive_messages(1, 1)


def test_defer_then_receive_by_sequence_number(sb: ServiceBusEmulator, queue_name: str) -> None:
    with sdk_client(sb) as client:
        send(client, queue_name, msg("a"), msg("b"))
        with client.get_queue_receiver(queue_name, session_id="g1", max_wait_time=1) as receiver:
            first, second = receiver.receive_messages(max_message_count=2, max_wait_time=2)
            receiver.defer_message(first)
            deferred_at = seq(first)
            receiver.complete_message(second)
            assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []
            [deferred] = receiver.receive_deferred_messages([deferred_at])
            assert deferred.message_id == "a"
            receiver.complete_message(deferred)
            with pytest.raises(sb_errors.MessageNotFoundError):
                receiver.receive_deferred_messages([deferred_at])
    assert sb.counts(queue_name)["active"] == 0


def test_message_lock_expiry_bites_and_renewal_keeps_it(sb: ServiceBusEmulator) -> None:
    queue = new_queue(sb, requires_session=False, lock_duration=1.0, max_delivery_count=5)
    with sdk_client(sb) as client:
        send(client, queue, msg("a", None), msg("b", None))
        with client.get_queue_receiver(queue, max_wait_time=1) as receiver:
            a, b = receiver.receive_messages(max_message_count=2, max_wait_time=2)
            for _ in range(3):
                time.sleep(0.5)
                renewed = receiver.renew_message_lock(b)
            assert renewed > datetime.datetime.now(datetime.UTC)
            receiver.complete_message(b)  # kept alive by renewal for 1.5 s
            time.sleep(1.3)
            with pytest.raises(sb_errors.MessageLockLostError):
                receiver.complete_message(a)
            [again] = receiver.receive_messages(max_message_count=1, max_wait_time=2)
            assert again.message_id == "a" and again.delivery_count == 1
            receiver.complete_message(again)


def test_session_lock_expiry_bites_and_renewal_keeps_it(sb: ServiceBusEmulator) -> None:
    queue = new_queue(sb, lock_duration=1.0)
    with sdk_client(sb) as client:
        send(client, queue, msg("a"), msg("b"))
        with client.get_queue_receiver(queue, session_id="g1", max_wait_time=1) as receiver:
            a, b = receiver.receive_messages(max_message_count=2, max_wait_time=2)
            for _ in range(3):
                time.sleep(0.5)
                receiver.session.renew_lock()
            receiver.complete_message(a)
            time.sleep(1.3)
            with pytest.raises(sb_errors.SessionLockLostError):
                receiver.complete_message(b)
        with client.get_queue_receiver(queue, session_id="g1", max_wait_time=1) as receiver:
            [again] = receiver.receive_messages(max_message_count=1, max_wait_time=2)
            assert (again.message_id, again.delivery_count) == ("b", 1)
            receiver.complete_message(again)


def test_scheduled_messages_get_a_new_sequence_number_and_can_be_cancelled(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        with client.get_queue_sender(queue_name) as sender:
            soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=3)
            [scheduled] = sender.schedule_messages(msg("later"), soon)
            [cancelled] = sender.schedule_messages(msg("never"), soon)
            sender.cancel_scheduled_messages(cancelled)
            with pytest.raises(sb_errors.MessageNotFoundError):
                sender.cancel_scheduled_messages(cancelled)
            sender.send_messages(msg("now"))
        assert sb.counts(queue_name)["scheduled"] == 1
        with client.get_queue_receiver(queue_name, session_id="g1", max_wait_time=1) as receiver:
            peeked = receiver.peek_messages(10)
            assert [(m.message_id, int(m.state)) for m in peeked] == [("later", 2), ("now", 0)]
            first = receiver.receive_messages(max_message_count=5, max_wait_time=1)
            assert [m.message_id for m in first] == ["now"]
            receiver.complete_message(first[0])
            time.sleep(max(0.0, (soon - datetime.datetime.now(datetime.UTC)).total_seconds()))
            [later] = receiver.receive_messages(max_message_count=5, max_wait_time=2)
            assert later.message_id == "later"
            assert seq(later) > seq(first[0]) > scheduled
            receiver.complete_message(later)


def test_duplicates_within_the_window_are_dropped_silently(sb: ServiceBusEmulator) -> None:
    queue = new_queue(sb, duplicate_detection_window=3.0)
    with sdk_client(sb) as client, client.get_queue_sender(queue) as sender:
        started = time.monotonic()
        sender.send_messages([msg("n-1"), msg("n-1"), msg("n-2")])
        sender.send_messages(msg("n-1"))
        assert sb.counts(queue)["active"] == 2
        time.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
        sender.send_messages(msg("n-1"))  # outside the window: a new message
    assert sb.counts(queue)["active"] == 3


def test_time_to_live_dead_letters_expired_messages(sb: ServiceBusEmulator) -> None:
    queue = new_queue(sb, default_message_ttl=60)
    with sdk_client(sb) as client:
        short = msg("short")
        short.time_to_live = datetime.timedelta(seconds=1)  # the SDK sends whole seconds
        send(client, queue, short, msg("long"))
        time.sleep(1.2)
        with client.get_queue_receiver(queue, session_id="g1", max_wait_time=1) as receiver:
            got = receiver.receive_messages(max_message_count=5, max_wait_time=1)
            assert [m.message_id for m in got] == ["long"]
            receiver.complete_message(got[0])
        with client.get_queue_receiver(
            queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1
        ) as dlq:
            [expired] = dlq.peek_messages(5)
    assert (expired.message_id, expired.dead_letter_reason) == ("short", "TTLExpiredException")


def test_messages_over_256_kb_are_refused(sb: ServiceBusEmulator, queue_name: str) -> None:
    with sdk_client(sb) as client, pytest.raises(sb_errors.MessageSizeExceededError):
        send(client, queue_name, msg("big", body=b"x" * (300 * 1024)))
    assert sb.counts(queue_name)["active"] == 0


def test_session_state_round_trips(sb: ServiceBusEmulator, queue_name: str) -> None:
    with sdk_client(sb) as client:
        send(client, queue_name, msg("a"))
        with client.get_queue_receiver(queue_name, session_id="g1", max_wait_time=1) as receiver:
            receiver.session.set_state(b"cursor-7")
            assert receiver.session.get_state() == b"cursor-7"


def test_runtime_properties_need_manage_rights(sb: ServiceBusEmulator, queue_name: str) -> None:
    with sdk_client(sb) as client:
        send(client, queue_name, msg("a"), msg("b", "g2"))
        with client.get_queue_sender(queue_name) as sender:
            sender.schedule_messages(
                msg("c"), datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
            )
        with client.get_queue_receiver(queue_name, session_id="g2", max_wait_time=1) as receiver:
            [b] = receiver.receive_messages(max_message_count=1, max_wait_time=2)
            receiver.dead_letter_message(b, reason="R", error_description="D")
    with admin_client(sb) as admin:
        properties = admin.get_queue_runtime_properties(queue_name)
        assert properties.active_message_count == 1
        assert properties.scheduled_message_count == 1
        assert properties.dead_letter_message_count == 1
        with pytest.raises(ResourceNotFoundError):
            admin.get_queue_runtime_properties("no-such-queue")
    with admin_client(sb, rule=APP_RULE) as admin, pytest.raises(ClientAuthenticationError):
        admin.get_queue_runtime_properties(queue_name)  # Send and Listen, no Manage: 401
