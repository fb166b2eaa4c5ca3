"""The directory adapter's replacement for ldap3's SyncStrategy.receiving: same
messages out for any way the stream is cut, linear in the size of a response
(ldap3's own copies everything received so far on every piece), same error."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from ldap3.core.exceptions import LDAPCommunicationError, LDAPSocketReceiveError
from ldap3.strategy.sync import SyncStrategy

from writeback.adapters.ldap_clients import linear_receiving


def ber(size: int, fill: int) -> bytes:
    """An LDAP-message-shaped BER SEQUENCE with ``size`` bytes of content."""
    if size < 128:
        header = bytes([0x30, size])
    else:
        length = size.to_bytes((size.bit_length() + 7) // 8, "big")
        header = bytes([0x30, 0x80 | len(length)]) + length
    return header + bytes([fill % 256]) * size


class Socket:
    def __init__(self, stream: bytes, piece: int, error: Exception | None = None) -> None:
        self.pieces = [stream[i : i + piece] for i in range(0, len(stream), piece)]
        self.error = error

    def recv(self, size: int) -> bytes:
        if self.error is not None and not self.pieces:
            raise self.error
        return self.pieces.pop(0)[:size] if self.pieces else b""


class Connection:
    sasl_mechanism = None
    sasl_in_progress = False
    _digest_md5_kis = None
    last_error: str | None = None

    def __init__(self, socket: Socket) -> None:
        self.socket = socket
        self.closed = False


def strategy(stream: bytes, piece: int, error: Exception | None = None) -> Any:
    made: Any = SyncStrategy.__new__(SyncStrategy)
    made.connection = Connection(Socket(stream, piece, error))
    made.socket_size = 1 << 20
    made.close = lambda: setattr(made.connection, "closed", True)
    return made


def read_all(receiving: Callable[[Any], list[bytes]], source: Any) -> list[list[bytes]]:
    """Call ``receiving`` until the stream is used up (as ldap3 does, per response)."""
    calls = []
    while source.connection.socket.pieces:
        calls.append(receiving(source))
    return calls


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 128, 1000, 70_000, 1 << 20])
def test_it_returns_what_ldap3_returns_however_the_stream_is_cut(piece: int) -> None:
    messages = [ber(10, 1), ber(127, 2), ber(300, 3), ber(70_000, 4), ber(5, 5)]
    stream = b"".join(messages)
    ours = read_all(linear_receiving, strategy(stream, piece))
    theirs = read_all(SyncStrategy.receiving, strategy(stream, piece))
    assert ours == theirs  # same messages, returned by the same calls
    assert [m for call in ours for m in call] == messages


def test_a_closed_peer_ends_the_read_with_what_was_complete() -> None:
    stream = ber(10, 1) + ber(300, 2)[:100]
    assert linear_receiving(strategy(stream, 64)) == [ber(10, 1)]


def test_a_large_response_in_small_pieces_is_read_in_linear_time() -> None:
    big = ber(6_000_000, 9)  # a 50,000-member group's extended DNs are about this size
    started = time.perf_counter()
    assert linear_receiving(strategy(big, 1000)) == [big]
    assert time.perf_counter() - started < 2.0  # ldap3's own loop copies ~18 GB here


def test_a_socket_error_closes_and_raises_ldap3s_receive_error() -> None:
    broken = strategy(ber(300, 1)[:50], 25, error=TimeoutError("timed out"))
    with pytest.raises(LDAPSocketReceiveError) as raised:
        linear_receiving(broken)
    assert isinstance(raised.value, LDAPCommunicationError)
    assert broken.connection.closed
    assert "timed out" in str(broken.connection.last_error)
