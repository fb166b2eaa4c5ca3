"""A small, realistic, deterministic tenant for demos and end-to-end tests.

Users come from ``user_sids`` (user name -> on-premises SID, as the AD side was
provisioned); their Graph ids are uuid5 values of the name, so both sides agree
on them without talking. The groups are Microsoft 365 (Unified) groups with
display names that stress DN escaping and attribute limits, mail addresses and
proxy addresses, mostly synced members plus a few cloud-only users, one nested
group member and one non-Unified security group that writeback must ignore.
"""

from __future__ import annotations

import random
import re
import unicodedata
import uuid
from collections.abc import Mapping

from writeback_sandbox.graph_standin import Tenant

#: Namespace of the deterministic object ids (uuid5 of a name in it).
SAMPLE_NAMESPACE = uuid.UUID("3b0c7a52-6c1e-4f4e-9d0a-5a7e1f2b9c11")

MAIL_DOMAIN = "contoso.com"
TENANT_DOMAIN = "contoso.onmicrosoft.com"

#: Display names in the order groups are made; the first ones are awkward on
#: purpose: DN special characters, a leading '#', padding, 70 characters,
#: a non-Latin script.
SAMPLE_GROUP_NAMES: tuple[str, ...] = (
    "Finance, Planning & Analysis",
    "R+D Lab",
    'Project "Phoenix"',
    "Ops\\Infrastructure",
    "<Leadership> Team",
    "Sales; EMEA",
    "Budget=2025 Taskforce",
    "#general",
    "  Padded Name  ",
    "Northern Europe Regional Sales Enablement and Partner Readiness Office",
    "営業チーム 東京",
    "Marketing",
    "Human Resources",
    "Customer Success",
    "Legal & Compliance",
    "IT Service Desk",
    "Product Management",
    "Design Guild",
    "Data Platform",
    "Security Champions",
)

SECURITY_GROUP_NAME = "SG-FileShare-Readers"


def object_id(kind: str, name: str) -> str:
    """The deterministic Graph id of a sample object (``kind`` is user/group/...)."""
    return str(uuid.uuid5(SAMPLE_NAMESPACE, f"{kind}:{name}"))


def user_id_for(user_name: str) -> str:
    return object_id("user", user_name)


def cloud_only_user_name(index: int) -> str:
    return f"cloud.guest{index + 1:02d}"


def _group_name(index: int) -> str:
    if index < len(SAMPLE_GROUP_NAMES):
        return SAMPLE_GROUP_NAMES[index]
    return f"Team {index + 1:03d}"


def mail_nickname_for(display_name: str, taken: set[str], fallback: str = "group") -> str:
    """An Exchange-style alias: ASCII letters and digits, at most 64 characters."""
    folded = unicodedata.normalize("NFKD", display_name).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9]+", "", folded)[:56] or fallback
    nickname, n = base, 1
    while nickname.lower() in taken:
        n += 1
        nickname = f"{base}{n}"
    taken.add(nickname.lower())
    return nickname


def build_sample_tenant(
    user_sids: Mapping[str, str],
    *,
    groups: int = 12,
    seed: int = 7,
    cloud_only_users: int = 5,
) -> Tenant:
    """A tenant with ``groups`` Unified groups over the given synced users.

    The same arguments always give the same tenant (ids, names, memberships).
    """
    rng = random.Random(seed)
    tenant = Tenant()

    synced = [user_id_for(name) for name in sorted(user_sids)]
    for name in sorted(user_sids):
        tenant.add_user(user_id_for(name), sid=user_sids[name], synced=True, display_name=name)
    cloud = [user_id_for(cloud_only_user_name(i)) for i in range(cloud_only_users)]
    for i, user_id in enumerate(cloud):
        tenant.add_user(user_id, sid=None, synced=False, display_name=cloud_only_user_name(i))

    # The non-Unified security group: in the tenant, never written back; it is
    # also the nested member of one Unified group.
    security_id = object_id("group", SECURITY_GROUP_NAME)
    tenant.add_group(
        security_id,
        display_name=SECURITY_GROUP_NAME,
        description="Security group, not a Microsoft 365 group",
        group_types=(),
        visibility=None,
        members=synced[: min(3, len(synced))],
    )

    taken: set[str] = set()
    visibilities = ("Private", "Public")
    for index in range(groups):
        display_name = _group_name(index)
        nickname = mail_nickname_for(display_name, taken, fallback=f"group{index + 1:03d}")
        mail = f"{nickname}@{MAIL_DOMAIN}"
        proxies = [f"SMTP:{mail}", f"smtp:{nickname}@{TENANT_DOMAIN}"]
        if index % 4 == 1:
            proxies.append(f"smtp:{nickname.lower()}.alias@{MAIL_DOMAIN}")
        visibility = "HiddenMembership" if index == 5 else visibilities[rng.randrange(2)]
        description = None if index % 3 == 2 else f"{display_name.strip()} (sample group)"

        size = rng.randint(min(2, len(synced)), min(12, len(synced))) if synced else 0
        members = rng.sample(synced, size)
        if cloud and index % 3 == 0:
            members.append(cloud[rng.randrange(len(cloud))])
        if index == 0:
            members.append(security_id)

        tenant.add_group(
            object_id("group", f"{index}:{display_name}"),
            display_name=display_name,
            description=description,
            mail=mail,
            mail_nickname=nickname,
            proxy_addresses=proxies,
            group_types=("Unified",),
            visibility=visibility,
            members=members,
        )
    return tenant
