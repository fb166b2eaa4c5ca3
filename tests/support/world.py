"""A small world for end-to-end tests: a Samba DC, a fresh OU, synced users,
a Graph stand-in tenant, and the real adapters between them.

Directory state is read back independently over the harness's admin
connection, so assertions never trust the adapter under test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ldap3 import BASE, SUBTREE

from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud
from writeback.domain.mapping import MappingOptions
from writeback.domain.naming import DnFormat, escape_filter_value
from writeback.service.reconcile import Plan, SyncPolicy, SyncResult, apply_plan, plan_sync
from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.samba import SambaDC

#: Extended-DN control asking for the string form: <GUID=...>;<SID=S-...>;CN=...
EXTENDED_DN = ("1.2.840.113556.1.4.529", False, b"\x30\x03\x02\x01\x01")


def user_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"user:{name}"))


def group_id(n: int, token: str = "") -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"group:{token}:{n}"))


@dataclass
class World:
    dc: SambaDC
    ou: str
    users_ou: str
    sids: dict[str, str]
    standin: GraphStandIn
    cloud: GraphCloud
    directory: LdapDirectory
    options: MappingOptions
    #: Makes this world's group ids (and so sAMAccountNames) unique on a shared DC.
    token: str = ""
    results: list[SyncResult] = field(default_factory=list)

    @property
    def tenant(self) -> Tenant:
        return self.standin.tenant

    def uid(self, name: str) -> str:
        return user_id(name)

    def plan(self, policy: SyncPolicy | None = None) -> Plan:
        return plan_sync(self.cloud, self.directory, self.options, policy or SyncPolicy())

    def sync(self, policy: SyncPolicy | None = None) -> SyncResult:
        result = apply_plan(self.plan(policy), self.directory)
        self.results.append(result)
        assert result.failures == [], result.failures
        return result

    def gid(self, n: int) -> str:
        return group_id(n, self.token)

    def add_group(self, n: int, name: str, members: list[str], **fields: Any) -> str:
        gid = self.gid(n)
        self.tenant.add_group(
            gid, display_name=name, members=[user_id(m) for m in members], **fields
        )
        return gid

    # --- independent reads of the directory -------------------------------------------
    def ad_entry(self, gid: str, base: str | None = None) -> dict[str, Any] | None:
        """The object carrying our anchor for ``gid`` (under ``base``, default the OU)."""
        conn = self.dc.connection()
        try:
            conn.search(
                base or self.ou,
                f"(adminDescription={escape_filter_value('Group_' + gid)})",
                SUBTREE,
                attributes=["*", "objectSid", "objectGUID"],
            )
            assert len(conn.entries) <= 1
            if not conn.entries:
                return None
            entry = conn.entries[0]
            data: dict[str, Any] = {k.lower(): v for k, v in entry.entry_attributes_as_dict.items()}
            data["dn"] = entry.entry_dn
            data["member_sids"] = self.member_sids(entry.entry_dn)
            return data
        finally:
            conn.unbind()

    def member_sids(self, dn: str) -> set[str]:
        conn = self.dc.connection()
        try:
            conn.search(dn, "(objectClass=*)", BASE, attributes=["member"], controls=[EXTENDED_DN])
            values = conn.entries[0].entry_attributes_as_dict.get("member", [])
            sids = set()
            for value in values:
                for part in str(value).split(";"):
                    if part.startswith("<SID="):
                        sids.add(part[5:-1])
            return sids
        finally:
            conn.unbind()

    def sid_of(self, name: str) -> str:
        return self.sids[name]


@contextmanager
def make_world(
    dc: SambaDC,
    ou: str,
    *,
    users: int = 6,
    dn_format: DnFormat = DnFormat.OBJECT_ID,
    member_limit: int = 50_000,
) -> Iterator[World]:
    users_ou = dc.create_ou("Users", ou)
    names = [f"user{i}" for i in range(users)]
    token = uuid.uuid4().hex[:8]  # sAMAccountNames are unique domain-wide
    created = dc.create_users(users_ou, [f"{token}{name}" for name in names])
    sids = {name: created[f"{token}{name}"] for name in names}
    tenant = Tenant()
    for name in names:
        tenant.add_user(user_id(name), sid=sids[name], synced=True, display_name=name)
    tenant.add_user(user_id("cloudonly"), sid=None, synced=False, display_name="cloud only")
    groups_ou = dc.create_ou("Writeback", ou)
    directory = dc.directory(groups_ou)
    with GraphStandIn(tenant) as standin:
        cloud = GraphCloud(base_url=standin.url)
        options = MappingOptions(
            target_ou=groups_ou,
            dn_format=dn_format,
            schema_attributes=directory.schema_attributes(),
            member_limit=member_limit,
        )
        try:
            yield World(dc, groups_ou, users_ou, sids, standin, cloud, directory, options, token)
        finally:
            cloud.close()
            directory.close()
