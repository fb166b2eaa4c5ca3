"""ldap3 against python-ldap (libldap) on one throwaway Samba AD DC, in one run.

What the directory adapter does most, made with each client's bare calls over
the same validated LDAPS connection kind, on the same DC, one after the other:

1. one-value member-add modifies (``member: <SID=...>``) on distinct groups:
   an ldap3 loop, a python-ldap synchronous loop, python-ldap pipelined (the
   asynchronous API with ``--window`` requests outstanding on one connection),
   then the ldap3 loop again (the database has grown meanwhile: if its second
   rate is lower, the ones between erred against python-ldap, not for it);
   writes per second and this process's CPU per modify (the DC is another
   process);
2. a base read of one group (managed attributes and ``member``, extended DN) and
   a search over the OU ORing 20 objectGUIDs (what a batched event read sends);
3. the reconcile's AD read: a paged subtree search of ``--groups`` groups with
   their members under the extended-DN control, page 1000, as raw entries (each
   library's own parse) and through the adapter on each client
   (``LdapDirectory.iter_groups``: raw entries turned into DirectoryGroups, the
   next page asked for while this one is parsed), with the wall time and the CPU
   time of this process, which is the parse cost: the DC's work is in its own
   process.

    .venv/bin/python bench/ldap_client.py --groups 20000 --memberships 400000
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ldap
from ldap.controls import RequestControl
from ldap.controls.libldap import SimplePagedResultsControl
from ldap3 import BASE, MODIFY_ADD, SUBTREE, Connection

from writeback.domain.mapping import MANAGED_ATTRIBUTES
from writeback.domain.model import anchor_for
from writeback.report import markdown_table
from writeback_sandbox.samba import SambaDC, free_loopback_address, running_dc

EXTENDED_DN_OID = "1.2.840.113556.1.4.529"
EXTENDED_DN_VALUE = b"\x30\x03\x02\x01\x01"
ATTRIBUTES = [*MANAGED_ATTRIBUTES, "objectSid", "member;range=0-49999"]
PAGE = 1000


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=20_000, help="groups in the paged read")
    parser.add_argument("--memberships", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--modifies", type=int, default=3000, help="member adds per client")
    parser.add_argument("--window", type=int, default=8, help="pipelined requests in flight")
    parser.add_argument("--reads", type=int, default=500, help="base reads / OR searches each")
    parser.add_argument("--address", default=None, help="loopback address for the DC")
    args = parser.parse_args(argv)
    with running_dc(address=args.address or free_loopback_address("127.0.0.33")) as dc:
        Bench(dc, args).run()


# --------------------------------------------------------------------------- clients


def ldap3_connection(dc: SambaDC) -> Connection:
    return dc.connection(raise_exceptions=False, auto_range=False, return_empty_attributes=False)


def python_ldap_connection(dc: SambaDC) -> Any:
    """A python-ldap connection over LDAPS, the DC's certificate validated."""
    conn = ldap.initialize(dc.ldaps_url)
    conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
    conn.set_option(ldap.OPT_REFERRALS, 0)
    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, dc.ca_file)
    conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
    conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
    conn.simple_bind_s(dc.admin_dn, dc.admin_password)
    return conn


def extended_dn() -> Any:
    return RequestControl(EXTENDED_DN_OID, True, EXTENDED_DN_VALUE)


@dataclass(frozen=True)
class Timed:
    count: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.count / self.wall if self.wall else 0.0

    def wall_ms(self) -> float:
        return 1000 * self.wall / self.count

    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.count


def timed(count: int, work: Callable[[], None]) -> Timed:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return Timed(count, time.perf_counter() - wall, time.process_time() - cpu)


# --------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, dc: SambaDC, args: argparse.Namespace) -> None:
        self.dc = dc
        self.args = args
        self.rows: list[tuple[str, str]] = []

    def run(self) -> None:
        args = self.args
        t = time.monotonic()
        names = [f"u{i}" for i in range(args.users)]
        sids_by_name = self.dc.create_users(self.dc.create_ou("BenchUsers"), names)
        sids = [sids_by_name[n] for n in names]
        print(f"setup: {len(sids)} users in {time.monotonic() - t:.1f} s", flush=True)
        self.modifies(sids)
        t = time.monotonic()
        ou, guids = self.populate(sids)
        print(f"setup: {args.groups} groups in {time.monotonic() - t:.1f} s", flush=True)
        self.reads(ou, guids)
        self.paged(ou)
        print()
        print(markdown_table(self.rows))

    # ---- 1. one-value member adds

    def modifies(self, sids: list[str]) -> None:
        count = self.args.modifies
        per_group = 50
        groups = -(-4 * count // per_group)
        ou = self.dc.create_ou("BenchModify")
        conn = ldap3_connection(self.dc)
        dns = [f"CN=m{i},{ou}" for i in range(groups)]
        for i, dn in enumerate(dns):
            assert conn.add(dn, ["top", "group"], {"sAMAccountName": f"m{i}"}), conn.result
        conn.unbind()
        # Every (group, member) pair is new: each client adds its own quarter.
        pairs = [(dns[i // per_group], f"<SID={sids[i % per_group]}>") for i in range(4 * count)]
        random.Random(7).shuffle(pairs)
        runs = [
            ("ldap3 loop", self.ldap3_loop),
            ("python-ldap synchronous", self.python_ldap_sync),
            (f"python-ldap pipelined, {self.args.window} in flight", self.python_ldap_pipelined),
            ("ldap3 loop again (fuller database)", self.ldap3_loop),
        ]
        results = []
        for n, (label, loop) in enumerate(runs):
            result = loop(pairs[n * count : (n + 1) * count])
            results.append(result)
            print(f"{label}: {result.rate:.0f}/s", flush=True)
            self.rows.append((f"member-add modifies/s, {label}", f"{result.rate:.0f}"))
            self.rows.append((f"  client CPU per modify, ms, {label}", f"{result.cpu_ms():.3f}"))
        base = (results[0].rate + results[3].rate) / 2
        for n in (1, 2):
            self.rows.append(
                (f"ratio {runs[n][0]} / ldap3 loop (mean of both)", f"{results[n].rate / base:.2f}")
            )

    def ldap3_loop(self, pairs: list[tuple[str, str]]) -> Timed:
        conn = ldap3_connection(self.dc)

        def work() -> None:
            for dn, value in pairs:
                if not conn.modify(dn, {"member": [(MODIFY_ADD, [value])]}):
                    raise RuntimeError(f"ldap3 modify failed: {conn.result}")

        try:
            return timed(len(pairs), work)
        finally:
            conn.unbind()

    def python_ldap_sync(self, pairs: list[tuple[str, str]]) -> Timed:
        conn = python_ldap_connection(self.dc)

        def work() -> None:
            for dn, value in pairs:
                conn.modify_ext_s(dn, [(ldap.MOD_ADD, "member", [value.encode()])])

        try:
            return timed(len(pairs), work)
        finally:
            conn.unbind_s()

    def python_ldap_pipelined(self, pairs: list[tuple[str, str]]) -> Timed:
        conn = python_ldap_connection(self.dc)
        window = self.args.window

        def work() -> None:
            pending: deque[int] = deque()
            for dn, value in pairs:
                pending.append(conn.modify_ext(dn, [(ldap.MOD_ADD, "member", [value.encode()])]))
                if len(pending) >= window:
                    conn.result3(pending.popleft())
            while pending:
                conn.result3(pending.popleft())

        try:
            return timed(len(pairs), work)
        finally:
            conn.unbind_s()

    # ---- 2. reads

    def populate(self, sids: list[str]) -> tuple[str, list[bytes]]:
        """``--groups`` anchored groups with ``--memberships`` members in all, added
        pipelined (setup, not measured); returns the OU and their objectGUIDs."""
        args = self.args
        ou = self.dc.create_ou("BenchRead")
        rng = random.Random(42)
        sizes = [args.memberships // args.groups] * args.groups
        for i in range(args.memberships % args.groups):
            sizes[i] += 1
        conn = python_ldap_connection(self.dc)
        pending: deque[int] = deque()
        for i, size in enumerate(sizes):
            gid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-ldap-client:{i}"))
            members = [f"<SID={sid}>".encode() for sid in rng.sample(sids, min(size, len(sids)))]
            entry = [
                ("objectClass", [b"top", b"group"]),
                ("sAMAccountName", [f"r{i}".encode()]),
                ("adminDescription", [anchor_for(gid).encode()]),
                ("displayName", [f"Bench group {i}".encode()]),
                ("mail", [f"bench{i}@contoso.com".encode()]),
                ("proxyAddresses", [f"SMTP:bench{i}@contoso.com".encode()]),
                ("groupType", [b"8"]),
            ]
            if members:
                entry.append(("member", members))
            pending.append(conn.add_ext(f"CN=Group_{gid},{ou}", entry))
            if len(pending) >= 16:
                conn.result3(pending.popleft())
        while pending:
            conn.result3(pending.popleft())
        guids = [
            attributes["objectGUID"][0]
            for _, attributes in conn.search_ext_s(
                ou, ldap.SCOPE_ONELEVEL, "(objectClass=group)", ["objectGUID"]
            )
        ]
        conn.unbind_s()
        return ou, guids

    def reads(self, ou: str, guids: list[bytes]) -> None:
        count = self.args.reads
        rng = random.Random(3)
        picks = [rng.sample(guids, 20) for _ in range(count)]
        base_dns = [f"<GUID={uuid.UUID(bytes_le=g[0])}>" for g in picks]
        filters = ["(|" + "".join(f"(objectGUID={_escape(g)})" for g in p) + ")" for p in picks]

        three = ldap3_connection(self.dc)
        ctl3 = [(EXTENDED_DN_OID, True, EXTENDED_DN_VALUE)]

        def ldap3_base() -> None:
            for dn in base_dns:
                three.search(dn, "(objectClass=*)", BASE, attributes=ATTRIBUTES, controls=ctl3)
                assert len(three.response) == 1, three.result

        def ldap3_or() -> None:
            for f in filters:
                three.search(ou, f, SUBTREE, attributes=ATTRIBUTES, controls=ctl3)
                assert len([r for r in three.response if r["type"] == "searchResEntry"]) == 20

        pyl = python_ldap_connection(self.dc)
        ctl = [extended_dn()]

        def pyl_base() -> None:
            for dn in base_dns:
                found = pyl.search_ext_s(
                    dn, ldap.SCOPE_BASE, "(objectClass=*)", ATTRIBUTES, serverctrls=ctl
                )
                assert len(found) == 1

        def pyl_or() -> None:
            for f in filters:
                found = pyl.search_ext_s(ou, ldap.SCOPE_SUBTREE, f, ATTRIBUTES, serverctrls=ctl)
                assert len([e for e in found if e[0] is not None]) == 20

        for label, work in (
            ("base read of one group, ldap3", ldap3_base),
            ("base read of one group, python-ldap", pyl_base),
            ("search ORing 20 objectGUIDs, ldap3", ldap3_or),
            ("search ORing 20 objectGUIDs, python-ldap", pyl_or),
        ):
            result = timed(count, work)
            self.rows.append((f"{label}, ms (client CPU ms)", _ms(result)))
        three.unbind()
        pyl.unbind_s()

    # ---- 3. the paged read

    def paged(self, ou: str) -> None:
        groups = self.args.groups
        anchored = "(&(objectClass=group)(adminDescription=Group_*))"

        def ldap3_raw() -> None:
            conn = ldap3_connection(self.dc)
            seen = 0
            cookie: bytes | None = None
            while True:
                conn.search(
                    ou,
                    anchored,
                    SUBTREE,
                    attributes=ATTRIBUTES,
                    controls=[(EXTENDED_DN_OID, True, EXTENDED_DN_VALUE)],
                    paged_size=PAGE,
                    paged_cookie=cookie,
                )
                seen += sum(1 for r in conn.response if r["type"] == "searchResEntry")
                control = conn.result["controls"]["1.2.840.113556.1.4.319"]["value"]
                cookie = control["cookie"]
                if not cookie:
                    break
            conn.unbind()
            assert seen == groups, seen

        def python_ldap_raw() -> None:
            conn = python_ldap_connection(self.dc)
            seen = sum(1 for _ in _python_ldap_pages(conn, ou, anchored))
            conn.unbind_s()
            assert seen == groups, seen

        def adapter(client: str) -> Callable[[], None]:
            def read() -> None:
                with self.dc.directory(ou, client=client) as directory:
                    seen = sum(1 for _ in directory.iter_groups())
                assert seen == groups, seen

            return read

        for label, work in (
            ("ldap3 raw entries", ldap3_raw),
            ("python-ldap raw entries", python_ldap_raw),
            ("adapter iter_groups on ldap3", adapter("ldap3")),
            ("adapter iter_groups on python-ldap (its default)", adapter("python-ldap")),
        ):
            result = timed(1, work)
            self.rows.append(
                (
                    f"paged read of {groups} groups, {label}, s (client CPU s)",
                    f"{result.wall:.2f} ({result.cpu:.2f})",
                )
            )
            print(f"paged read, {label}: {result.wall:.2f} s, CPU {result.cpu:.2f} s", flush=True)


def _python_ldap_pages(conn: Any, base: str, search_filter: str) -> Iterator[tuple[str, Any]]:
    page = SimplePagedResultsControl(True, size=PAGE, cookie=b"")
    while True:
        msgid = conn.search_ext(
            base,
            ldap.SCOPE_SUBTREE,
            search_filter,
            ATTRIBUTES,
            serverctrls=[extended_dn(), page],
        )
        _, entries, _, controls = conn.result3(msgid)
        for dn, attributes in entries:
            if dn is not None:
                yield dn, attributes
        cookie = next(
            (c.cookie for c in controls if c.controlType == SimplePagedResultsControl.controlType),
            b"",
        )
        if not cookie:
            return
        page.cookie = cookie


def _escape(raw: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in raw)


def _ms(result: Timed) -> str:
    return f"{result.wall_ms():.3f} ({result.cpu_ms():.3f})"


if __name__ == "__main__":
    main()
