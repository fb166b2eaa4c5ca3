"""Issue 12, finding 4, on plain data: one object-id form at every boundary.

The webhook lower-cases and checks ids; the queue body is parsed again by the
worker, which must not trust whoever wrote it: an id in capitals names the same
AD object (adminDescription matches without case) but another group to the
planner (the recycle bin's ids are compared with case), so it is poison. An
anchor in capitals is not ours.
"""

from __future__ import annotations

import json

import pytest

from writeback.domain.events import Change, GroupChanged
from writeback.domain.model import anchor_claims, group_id_from_anchor, is_canonical_id
from writeback.errors import PoisonEvent

GID = "3a5c3221-c465-48c0-95b8-e9305786a271"


def body(group_id: object) -> bytes:
    return json.dumps(
        {
            "version": 1,
            "group_id": group_id,
            "change": "updated",
            "received_at": 1.0,
            "notification_id": "n1",
        }
    ).encode()


def test_a_lower_case_guid_is_the_only_group_id_a_queue_body_may_carry() -> None:
    assert GroupChanged.from_json(body(GID)) == GroupChanged(GID, Change.UPDATED, 1.0, "n1")
    for hostile in (
        GID.upper(),
        GID[:8].upper() + GID[8:],
        GID + " ",
        " " + GID,
        "{" + GID + "}",
        GID.replace("-", ""),
        "Group_" + GID,
        "*",
    ):
        with pytest.raises(PoisonEvent, match="lower-case GUID"):
            GroupChanged.from_json(body(hostile))


def test_an_anchor_in_another_case_is_not_ours_but_claims_the_group() -> None:
    assert is_canonical_id(GID) and not is_canonical_id(GID.upper())
    assert group_id_from_anchor("Group_" + GID) == GID
    for other in ("Group_" + GID.upper(), "group_" + GID, "GROUP_" + GID, "Group_" + GID + " "):
        assert group_id_from_anchor(other) is None, other
    assert anchor_claims("Group_" + GID.upper()) == GID
    assert anchor_claims("GROUP_" + GID) == GID
    assert anchor_claims("Group_Finance") is None
