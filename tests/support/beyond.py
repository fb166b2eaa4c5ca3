"""Worlds for the tests of what goes beyond group writeback V1: a :class:`World`
whose mapping options carry rules or settings, and whose Graph client reads what
those need (security groups, nesting, hideFromAddressLists, the beta
writebackConfiguration), optionally as an app with chosen permissions."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from ldap3 import BASE

from tests.support.world import World, make_world
from writeback.adapters.graph import GraphCloud, GraphReads
from writeback.adapters.ldap_values import sid_from_bytes
from writeback.domain.mapping import MappingOptions
from writeback.domain.rules import parse_rules
from writeback_sandbox.samba import SambaDC


def reads_for(options: MappingOptions, **extra: Any) -> GraphReads:
    return GraphReads(all_groups=options.wants_all_groups, nested=options.nesting, **extra)


@contextmanager
def beyond_world(
    dc: SambaDC,
    ou: str,
    *,
    rules: str | None = None,
    reads: dict[str, Any] | None = None,
    credential: object | None = None,
    users: int = 6,
    **options: Any,
) -> Iterator[World]:
    """:func:`make_world` with ``rules`` (TOML text, OUs relative to the world's
    target OU) and further :class:`MappingOptions` fields; the Graph client reads
    what they need, plus ``reads`` (:class:`GraphReads` fields)."""
    with make_world(dc, ou, users=users) as world:
        rule_set = (
            parse_rules(textwrap.dedent(rules), target_ou=world.ou) if rules is not None else None
        )
        world.options = replace(world.options, rules=rule_set, **options)
        cloud = GraphCloud(
            base_url=world.standin.url,
            credential=credential,
            reads=reads_for(world.options, **(reads or {})),
        )
        world.cloud, original = cloud, world.cloud
        try:
            yield world
        finally:
            cloud.close()
            world.cloud = original


def attributes(world: World, dn: str, *names: str) -> dict[str, list[str]]:
    """Attribute values of one object, read over the harness's own connection."""
    conn = world.dc.connection()
    try:
        conn.search(dn, "(objectClass=*)", BASE, attributes=list(names))
        raw = conn.response[0]["raw_attributes"]
        return {
            name.lower(): [v.decode() for v in values] for name, values in raw.items() if values
        }
    finally:
        conn.unbind()


def object_sid(entry: dict[str, Any]) -> str:
    """The objectSid of an :meth:`World.ad_entry` as a string (ldap3 may hand the
    raw bytes back)."""
    value = entry["objectsid"]
    value = value[0] if isinstance(value, list) else value
    if isinstance(value, bytes | bytearray):
        return sid_from_bytes(bytes(value))
    text = str(value)
    if text.startswith("b'") or text.startswith('b"'):
        import ast

        return sid_from_bytes(ast.literal_eval(text))
    return text
