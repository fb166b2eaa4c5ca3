from dataclasses import replace

from writeback.domain.mapping import (
    REMOTE_GROUP_MAILBOX,
    GroupType,
    MappingOptions,
    desired_group,
    over_member_limit,
    smtp_proxy_addresses,
)
from writeback.domain.model import (
    Add,
    CloudGroup,
    CloudMember,
    Delete,
    DirectoryGroup,
    MemberKind,
    Modify,
    Rename,
    SkipReason,
)
from writeback.domain.naming import DnFormat
from writeback.domain.planner import plan_group

OU = "OU=Writeback,DC=corp,DC=example"
GID = "3a5c3221-c465-48c0-95b8-e9305786a271"
SID1, SID2, SID3 = "S-1-5-21-1-2-3-1101", "S-1-5-21-1-2-3-1102", "S-1-5-21-1-2-3-1103"


def user(n: int, sid: str | None = None, synced: bool = True) -> CloudMember:
    return CloudMember(f"u{n}", MemberKind.USER, sid, synced)


def group(**overrides: object) -> CloudGroup:
    fields: dict[str, object] = {
        "id": GID,
        "display_name": "Sales",
        "description": "The sales team",
        "mail": "sales@contoso.com",
        "mail_nickname": "sales",
        "proxy_addresses": ("smtp:sales@contoso.onmicrosoft.com", "SMTP:sales@contoso.com"),
        "members": (user(1, SID1), user(2, SID2)),
    }
    fields.update(overrides)
    return CloudGroup(**fields)  # type: ignore[arg-type]


def converged(desired_attrs: dict[str, tuple[str, ...]], sids: set[str], dn: str) -> DirectoryGroup:
    return DirectoryGroup(
        dn=dn,
        group_id=GID,
        attributes={k: v for k, v in desired_attrs.items() if v},
        member_sids=frozenset(sids),
    )


OPTIONS = MappingOptions(target_ou=OU)


def test_new_group_is_one_add_with_anchor_type_and_sid_members() -> None:
    op = plan_group(desired_group(group(), OPTIONS), None, OU)
    assert isinstance(op, Add)
    assert op.dn == f"CN=Group_{GID},{OU}"
    assert op.attributes["adminDescription"] == (f"Group_{GID}",)
    assert op.attributes["groupType"] == ("8",)
    assert op.attributes["sAMAccountName"] == ("Group_3a5c3221c46548",)
    assert op.attributes["proxyAddresses"] == (
        "SMTP:sales@contoso.com",
        "smtp:sales@contoso.onmicrosoft.com",
    )
    assert op.members == (f"<SID={SID1}>", f"<SID={SID2}>")
    assert "mailNickname" not in op.attributes  # no Exchange schema


def test_exchange_attributes_only_when_the_schema_has_them() -> None:
    options = MappingOptions(
        target_ou=OU,
        schema_attributes=frozenset({"mailnickname", "msexchrecipienttypedetails"}),
        group_type=GroupType.SECURITY,
    )
    attrs = desired_group(group(), options).attributes
    assert attrs["mailNickname"] == ("sales",)
    assert attrs["msExchRecipientTypeDetails"] == (REMOTE_GROUP_MAILBOX,)
    assert "msExchRecipientDisplayType" not in attrs
    assert attrs["groupType"] == ("-2147483640",)


def test_converged_group_plans_nothing_and_proxy_order_does_not_matter() -> None:
    desired = desired_group(group(), OPTIONS)
    current = converged(desired.attributes, {SID1, SID2}, f"CN=Group_{GID},{OU}")
    shuffled = dict(current.attributes)
    shuffled["proxyAddresses"] = tuple(reversed(shuffled["proxyAddresses"]))
    current = DirectoryGroup(current.dn, GID, shuffled, current.member_sids)
    assert plan_group(desired, current, OU) is None


def test_drift_is_one_modify_with_replaces_and_member_deltas() -> None:
    desired = desired_group(group(description=None), OPTIONS)
    attrs = dict(desired.attributes)
    attrs["displayName"] = ("Hand edited",)
    attrs["description"] = ("was here",)
    current = DirectoryGroup(
        f"CN=Group_{GID},{OU}",
        GID,
        attrs,
        member_sids=frozenset({SID2, SID3}),
        other_members=frozenset({"CN=Contact,OU=Elsewhere,DC=corp,DC=example"}),
    )
    op = plan_group(desired, current, OU)
    assert isinstance(op, Modify)
    assert op.changes.replace == {"displayName": ("Sales",), "description": ()}
    assert op.changes.add_members == (f"<SID={SID1}>",)
    assert op.changes.remove_members == (
        f"<SID={SID3}>",
        "CN=Contact,OU=Elsewhere,DC=corp,DC=example",
    )


def test_display_name_change_in_displayname_format_is_a_rename_in_place() -> None:
    options = MappingOptions(target_ou=OU, dn_format=DnFormat.DISPLAY_NAME)
    old = desired_group(group(display_name="Old, name"), options)
    sub_ou = f"OU=Moved,{OU}"
    current = converged(old.attributes, {SID1, SID2}, f"CN=Old\\, name_e9305786a271,{sub_ou}")
    op = plan_group(desired_group(group(display_name="#New"), options), current, OU)
    assert isinstance(op, Rename)
    assert op.new_rdn == "CN=\\#New_e9305786a271"
    assert op.dn == current.dn
    assert op.changes.replace == {"displayName": ("#New",)}


def test_ad_hex_escaping_is_not_mistaken_for_a_rename() -> None:
    options = MappingOptions(target_ou=OU, dn_format=DnFormat.DISPLAY_NAME)
    desired = desired_group(group(display_name="a,b"), options)
    current = converged(desired.attributes, {SID1, SID2}, f"CN=a\\2Cb_e9305786a271,{OU}")
    assert plan_group(desired, current, OU) is None


def test_gone_group_is_a_delete_and_nothing_is_nothing() -> None:
    current = DirectoryGroup(f"CN=Group_{GID},{OU}", GID, {})
    assert plan_group(None, current, OU) == Delete(GID, current.dn)
    assert plan_group(None, None, OU) is None


def test_members_not_on_prem_are_counted_per_reason() -> None:
    members = (
        user(1, SID1),
        user(2, None, synced=False),
        user(3, "S-1-5-21-9", synced=False),
        CloudMember("g1", MemberKind.GROUP),
        CloudMember("d1", MemberKind.DEVICE),
    )
    desired = desired_group(group(members=members), OPTIONS)
    assert desired.member_sids == {SID1}
    counts = {skip.reason: skip.count for skip in desired.skips}
    assert counts == {SkipReason.MEMBER_NOT_ON_PREM: 2, SkipReason.MEMBER_NOT_A_USER: 2}


def test_the_member_split_is_made_once_per_group_and_afresh_for_a_changed_one() -> None:
    first = group(members=(user(1, SID1), CloudMember("g1", MemberKind.GROUP)))
    split = first.member_split
    assert first.member_split is split, "planning asks it several times per group"
    assert split.user_sids == frozenset({SID1})
    assert (split.groups, split.not_users, split.not_on_prem) == (("g1",), 0, 0)
    changed = replace(first, members=(user(2, None, synced=False),))
    assert changed.member_split.user_sids == frozenset()
    assert changed.member_split.not_on_prem == 1
    assert desired_group(changed, OPTIONS).member_sids == frozenset()


def test_member_limit_counts_cloud_members() -> None:
    big = group(members=tuple(user(i, f"S-1-5-21-{i}") for i in range(11)))
    skip = over_member_limit(big, 10)
    assert skip is not None
    assert skip.reason is SkipReason.OVER_MEMBER_LIMIT
    assert over_member_limit(big, 11) is None


def test_proxy_addresses_fall_back_to_mail_and_drop_non_smtp() -> None:
    g = group(proxy_addresses=("X500:/o=x", "smtp:B@x.com", "smtp:b@X.com"), mail="a@x.com")
    assert smtp_proxy_addresses(g) == ("SMTP:a@x.com", "smtp:B@x.com")


def test_planner_is_deterministic() -> None:
    desired = desired_group(group(), OPTIONS)
    assert plan_group(desired, None, OU) == plan_group(desired, None, OU)


def test_hostile_values_are_kept_verbatim_in_attributes_but_cleaned_of_nul() -> None:
    g = group(display_name=' #a,b+c"d\\e<f>g;h=i ', description="x\x00y")
    attrs = desired_group(g, OPTIONS).attributes
    assert attrs["displayName"] == (' #a,b+c"d\\e<f>g;h=i ',)
    assert attrs["description"] == ("xy",)
