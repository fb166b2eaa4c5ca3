"""The queue envelope's wire form, and the parses a step reuses."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from writeback.domain.events import Change, GroupChanged
from writeback.errors import PoisonEvent

GID = "0c6e8a52-3f11-4b8e-9d4a-1f2e3d4c5b6a"


def test_the_wire_form_is_what_queues_already_hold() -> None:
    # Messages written by an earlier release are read by this one: same keys, order, spelling.
    event = GroupChanged(GID, Change.UPDATED, 1700000000.25, "n-1")
    assert event.to_json() == (
        b'{"group_id":"' + GID.encode() + b'","change":"updated",'
        b'"received_at":1700000000.25,"notification_id":"n-1","version":1}'
    )
    confirm = GroupChanged(GID, Change.CONFIRM, 2.0, "c-1", gone_since=1.5)
    assert confirm.to_json().endswith(b',"version":1,"gone_since":1.5}')
    assert GroupChanged.from_json(confirm.to_json()) == confirm


def test_every_field_of_the_envelope_is_on_the_wire() -> None:
    # to_json names its fields one by one: a field added later must be added there too.
    event = GroupChanged(GID, Change.CONFIRM, 2.0, "c-1", gone_since=1.5)
    wire = json.loads(event.to_json())
    assert set(wire) == {f.name for f in fields(GroupChanged)}
    assert {f.name for f in fields(GroupChanged) if getattr(event, f.name) == f.default} == {
        "version"
    }  # the rest differ from their defaults, so a field dropped on the way would show
    assert GroupChanged.from_json(event.to_json()) == event


def test_a_body_parsed_again_is_the_same_envelope_and_poison_stays_poison() -> None:
    body = GroupChanged(GID, Change.CREATED, 3.0, "n-2").to_json()
    first = GroupChanged.from_json(body)
    assert GroupChanged.from_json(bytes(bytearray(body))) is first  # kept, by content
    padded = body[:-1] + b" " * 2048 + b"}"  # valid, but larger than any envelope of ours
    assert GroupChanged.from_json(padded) == first
    assert GroupChanged.from_json(padded) is not GroupChanged.from_json(padded)
    poison = body.replace(GID.encode(), GID.upper().encode())
    for _ in range(2):
        with pytest.raises(PoisonEvent, match="lower-case GUID"):
            GroupChanged.from_json(poison)
