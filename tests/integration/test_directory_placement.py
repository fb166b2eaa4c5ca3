"""The LDAP adapter's scope guard with placement and nesting, on a real Samba DC and
with each LDAP client: a group moves (modify DN with a new superior, the object
and its objectSid kept) to any OU below the target OU and never outside it; a
member added by DN must be one of our anchored groups below the target OU."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from writeback.adapters.directory import LdapDirectory
from writeback.adapters.ldap_clients import python_ldap_available
from writeback.domain.model import Add, Changes, Modify, Rename, anchor_for
from writeback.errors import PolicyRefused
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba


@pytest.fixture(params=("python-ldap", "ldap3"))
def directory(
    request: pytest.FixtureRequest, samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> Iterator[tuple[LdapDirectory, str, str, Callable[[], LdapDirectory]]]:
    if request.param == "python-ldap" and not python_ldap_available():
        if os.environ.get("CI"):
            pytest.fail("python-ldap is not installed (scripts/bootstrap.sh installs it)")
        pytest.skip("python-ldap is not installed")
    outer = make_ou(samba_dc)
    target = samba_dc.create_ou("Writeback", outer)
    samba_dc.create_ou("Finance", target)
    opened = [samba_dc.directory(target, client=request.param)]

    def another() -> LdapDirectory:
        opened.append(samba_dc.directory(target, client=request.param))
        return opened[-1]

    try:
        yield opened[0], target, outer, another
    finally:
        for each in opened:
            each.close()


def add(gid: str, dn: str, members: tuple[str, ...] = ()) -> Add:
    return Add(
        gid,
        dn,
        {
            "objectClass": ("top", "group"),
            "adminDescription": (anchor_for(gid),),
            "groupType": ("-2147483640",),
            "sAMAccountName": (f"G{gid.replace('-', '')[:16]}",),
        },
        members,
    )


def test_a_move_stays_below_the_target_ou_and_keeps_the_object(
    directory: tuple[LdapDirectory, str, str, Callable[[], LdapDirectory]],
) -> None:
    ldap, target, outer, _ = directory
    GID = str(uuid.uuid4())  # sAMAccountNames are unique domain-wide
    ldap.apply(add(GID, f"CN=Group_{GID},{target}"))
    before = ldap.find_group(GID)
    assert before is not None
    outside = Rename(GID, before.dn, f"CN=Group_{GID}", new_parent=outer)
    with pytest.raises(PolicyRefused, match="not the target OU"):
        ldap.apply(outside)
    ldap.apply(Rename(GID, before.dn, f"CN=Group_{GID}", new_parent=f"OU=Finance,{target}"))
    moved = ldap.find_group(GID)
    assert moved is not None and moved.dn.lower() == f"CN=Group_{GID},OU=Finance,{target}".lower()
    assert moved.object_sid == before.object_sid
    ldap.apply(Rename(GID, moved.dn, f"CN=Group_{GID}", new_parent=target))  # and back
    back = ldap.find_group(GID)
    assert back is not None and back.object_sid == before.object_sid


def test_a_member_named_by_dn_must_be_one_of_ours(
    directory: tuple[LdapDirectory, str, str, Callable[[], LdapDirectory]],
) -> None:
    ldap, target, outer, another = directory
    GID, CHILD = str(uuid.uuid4()), str(uuid.uuid4())
    child_dn = f"CN=Group_{CHILD},OU=Finance,{target}"
    ldap.apply(add(CHILD, child_dn))
    ldap.apply(add(GID, f"CN=Group_{GID},{target}", members=(child_dn,)))  # same run, by DN
    parent = ldap.find_group(GID)
    child = ldap.find_group(CHILD)
    assert parent is not None and child is not None
    assert parent.member_sids == {child.object_sid}

    with pytest.raises(PolicyRefused, match="below the target OU"):
        ldap.apply(Modify(GID, parent.dn, Changes(add_members=(outer,))))
    stranger = f"CN=Not ours,{target}"
    fresh = another()  # another process (an agent's shard): it never read the child
    found = fresh.find_group(GID)
    assert found is not None
    with pytest.raises(PolicyRefused, match="carries no anchor of ours"):
        fresh.apply(Modify(GID, found.dn, Changes(add_members=(stranger,))))
    fresh.apply(Modify(GID, found.dn, Changes(remove_members=(f"<SID={child.object_sid}>",))))
    fresh.apply(Modify(GID, found.dn, Changes(add_members=(child_dn,))))  # its anchor is read
    again = ldap.find_group(GID)
    assert again is not None and again.member_sids == {child.object_sid}
