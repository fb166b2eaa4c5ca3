"""Scoping and placement rules: which cloud groups are written, where and as what.

The rules come from a TOML file named by ``WRITEBACK_RULES`` (docs/rules.md has
the format). They are ordered; the first rule that matches a group decides.
A rule matches by group kind (``microsoft365``, ``security``,
``mail-enabled-security``), by display name (a case-insensitive glob or a
regular expression), by an explicit list of object ids and, for migrants from
Entra Connect's group writeback V2, by Graph's beta ``writebackConfiguration``
(``writeback_enabled``, ``writeback_group_type``; read only when
``WRITEBACK_GRAPH_WRITEBACK_CONFIGURATION=true``). It decides whether the group
is written (``write``), its OU (the target OU or an OU below it, never
outside), its DN format and its AD group type. A group no rule matches is out
of scope.

Whatever the rules say, two kinds of group are never written by a rule that
does not name them: groups synced from on-premises AD (never, named or not:
writing them back would loop) and role-assignable groups (cloud-privileged:
only a rule that lists the group's id writes it). Exchange Online distribution
lists are never written.

Without a rules file the scope is group writeback V1's: every Microsoft 365
group, in the target OU, in the settings' DN format and type
(``WRITEBACK_SECURITY_GROUPS=true`` adds the security kinds, each as its own
type).

Pure: :func:`parse_rules` takes the file's text (``writeback.config`` reads
it) and raises :class:`RulesError` naming the line of the first problem.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from writeback.domain.mapping import (
    DesiredGroup,
    GroupType,
    MappingOptions,
    Placement,
    default_placement,
    desired_group,
)
from writeback.domain.model import (
    ON_PREMISES_GROUP_TYPES,
    CloudGroup,
    GroupKind,
    SkipReason,
    is_object_id,
)
from writeback.domain.naming import DnFormat, dn_key
from writeback.domain.target import TargetRefused, check_target_ou, is_within

if TYPE_CHECKING:
    from writeback.domain.nesting import NestedGroups

#: Kinds a rule may name (distribution lists and others are never written).
RULE_KINDS = (GroupKind.MICROSOFT_365, GroupKind.SECURITY, GroupKind.MAIL_ENABLED_SECURITY)
#: The group type a rule takes from the group's writebackConfiguration (V2's way).
FROM_GRAPH = "from-graph"

_V2_TYPES = {
    "universalDistributionGroup": GroupType.DISTRIBUTION,
    "universalSecurityGroup": GroupType.SECURITY,
    "universalMailEnabledSecurityGroup": GroupType.MAIL_ENABLED_SECURITY,
}
#: What V2 used when onPremisesGroupType is null, per kind.
_V2_DEFAULT_TYPES = {
    GroupKind.MICROSOFT_365: "universalDistributionGroup",
    GroupKind.SECURITY: "universalSecurityGroup",
    GroupKind.MAIL_ENABLED_SECURITY: "universalMailEnabledSecurityGroup",
}
_MATCH_KEYS = frozenset(
    {"kinds", "display_name", "display_name_regex", "ids", "writeback_enabled"}
    | {"writeback_group_type"}
)
_DECIDE_KEYS = frozenset({"write", "ou", "dn_format", "group_type"})
_RULE_KEYS = _MATCH_KEYS | _DECIDE_KEYS | {"name"}
_DEFAULT_KEYS = frozenset({"dn_format", "group_type"})
_TOP_KEYS = frozenset({"rule", "defaults"})
MAX_RULES = 1000


class RulesError(ValueError):
    """The rules file is not valid; ``line`` is where (1-based), when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]``: what it matches (None: anything) and what it decides
    (None: the defaults)."""

    name: str
    line: int
    kinds: frozenset[GroupKind] | None = None
    display_name: re.Pattern[str] | None = None
    ids: frozenset[str] | None = None
    writeback_enabled: bool | None = None
    writeback_group_types: frozenset[str] | None = None
    write: bool = True
    ou: str | None = None
    dn_format: DnFormat | None = None
    group_type: GroupType | str | None = None

    @property
    def uses_writeback_configuration(self) -> bool:
        return (
            self.writeback_enabled is not None
            or self.writeback_group_types is not None
            or self.group_type == FROM_GRAPH
        )

    def matches(self, group: CloudGroup, kind: GroupKind) -> bool:
        if self.ids is not None and group.id.lower() not in self.ids:
            return False
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.display_name is not None and not self.display_name.search(group.display_name):
            return False
        if self.writeback_enabled is not None and (
            v2_enabled(group, kind) is not self.writeback_enabled
        ):
            return False
        return self.writeback_group_types is None or (
            v2_group_type(group, kind) in self.writeback_group_types
        )


@dataclass(frozen=True)
class RuleSet:
    """The rules in order, and what the defaults decide when a rule does not."""

    rules: tuple[Rule, ...]
    dn_format: DnFormat | None = None
    group_type: GroupType | str | None = None
    source: str = ""

    @property
    def uses_writeback_configuration(self) -> bool:
        return self.group_type == FROM_GRAPH or any(
            r.uses_writeback_configuration for r in self.rules
        )

    def ous(self) -> frozenset[str]:
        """The OUs the rules place groups in (full DNs)."""
        return frozenset(r.ou for r in self.rules if r.ou is not None)

    def group_types(self) -> frozenset[GroupType]:
        """Every AD group type a rule (or the defaults) can decide."""
        found: set[GroupType] = set()
        for choice in (self.group_type, *(r.group_type for r in self.rules)):
            if choice == FROM_GRAPH:
                found.update(GroupType)
            elif isinstance(choice, GroupType):
                found.add(choice)
        return frozenset(found)

    def dn_formats(self) -> frozenset[DnFormat]:
        return frozenset(
            f for f in (self.dn_format, *(r.dn_format for r in self.rules)) if f is not None
        )


@dataclass(frozen=True)
class Excluded:
    """The group is not written: why, and which rule said so (None: no rule)."""

    reason: SkipReason
    detail: str
    rule: str | None = None


Decision = Placement | Excluded


def decide(group: CloudGroup, options: MappingOptions) -> Decision:
    """Whether and how ``group`` is written: a :class:`Placement` or :class:`Excluded`."""
    kind = group.kind
    if group.on_premises_sync_enabled:
        return Excluded(
            SkipReason.SYNCED_FROM_ON_PREMISES,
            "synced from on-premises AD: never written back (it would loop)",
        )
    if kind not in RULE_KINDS:
        return Excluded(
            SkipReason.OUT_OF_SCOPE, f"a {kind.value} group: not written back by any rule"
        )
    if options.rules is None:
        return _default_decision(group, kind, options)
    return _rule_decision(group, kind, options.rules, options)


def _default_decision(group: CloudGroup, kind: GroupKind, options: MappingOptions) -> Decision:
    """No rules file: V1's scope, with the security kinds when the setting asks."""
    wanted = {GroupKind.MICROSOFT_365}
    if options.security_groups:
        wanted |= {GroupKind.SECURITY, GroupKind.MAIL_ENABLED_SECURITY}
    if kind not in wanted:
        return Excluded(
            SkipReason.OUT_OF_SCOPE, f"a {kind.value} group (WRITEBACK_SECURITY_GROUPS is off)"
        )
    if group.is_assignable_to_role:
        return Excluded(
            SkipReason.ROLE_ASSIGNABLE,
            "role-assignable: written only when a rule names its id (WRITEBACK_RULES)",
        )
    return default_placement(group, options)


def _rule_decision(
    group: CloudGroup, kind: GroupKind, rules: RuleSet, options: MappingOptions
) -> Decision:
    """The first rule that matches decides; a role-assignable group is seen only by
    the rules that list its id."""
    gid = group.id.lower()
    for rule in rules.rules:
        if group.is_assignable_to_role and (rule.ids is None or gid not in rule.ids):
            continue
        if not rule.matches(group, kind):
            continue
        if not rule.write:
            return Excluded(SkipReason.OUT_OF_SCOPE, f"{rule.name}: write = false", rule.name)
        return _placement(group, kind, rule, rules, options)
    if group.is_assignable_to_role:
        return Excluded(
            SkipReason.ROLE_ASSIGNABLE, "role-assignable: written only when a rule names its id"
        )
    return Excluded(SkipReason.OUT_OF_SCOPE, "no rule matches")


def _placement(
    group: CloudGroup, kind: GroupKind, rule: Rule, rules: RuleSet, options: MappingOptions
) -> Placement:
    default = default_placement(group, options)
    choice = rule.group_type or rules.group_type
    group_type: GroupType
    if choice == FROM_GRAPH:
        group_type = _V2_TYPES.get(v2_group_type(group, kind) or "", default.group_type)
    elif isinstance(choice, GroupType):
        group_type = choice
    else:
        group_type = default.group_type
    if kind is GroupKind.SECURITY:
        group_type = GroupType.SECURITY  # no mail address: it cannot be a recipient
    return Placement(
        rule=rule.name,
        parent_dn=rule.ou,
        dn_format=rule.dn_format or rules.dn_format or options.dn_format,
        group_type=group_type,
    )


def v2_enabled(group: CloudGroup, kind: GroupKind) -> bool:
    """``writebackConfiguration.isEnabled`` as Entra Connect V2 read it: null means
    on for a Microsoft 365 group, off for a security group."""
    config = group.writeback
    if config is not None and config.is_enabled is not None:
        return config.is_enabled
    return kind is GroupKind.MICROSOFT_365


def v2_group_type(group: CloudGroup, kind: GroupKind) -> str | None:
    """``writebackConfiguration.onPremisesGroupType``, null read as V2's default."""
    config = group.writeback
    if config is not None and config.on_premises_group_type:
        return config.on_premises_group_type
    return _V2_DEFAULT_TYPES.get(kind)


# =========================================================================== parsing


#: Keys that need Graph's writebackConfiguration (read only when a setting asks).
_WRITEBACK_KEYS = ("writeback_enabled", "writeback_group_type")


def parse_rules(
    text: str, *, target_ou: str, source: str = "", writeback_configuration: bool = True
) -> RuleSet:
    """The rules in ``text`` (TOML), checked against ``target_ou``; RulesError
    naming the line of the first problem. Without ``writeback_configuration``
    (the setting that reads it from Graph's beta endpoint is off), a rule that
    uses it is an error too."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line = getattr(error, "lineno", None) or _line_of(error)
        if line is None and "end of document" in str(error):
            line = max(1, len(text.splitlines()))
        raise RulesError(_toml_reason(error), line) from None
    lines = _Lines(text)
    defaults, default_line = _top_level(data, lines)
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RulesError("rules are [[rule]] tables", lines.top_key("rule"))
    if len(raw_rules) > MAX_RULES:
        raise RulesError(f"at most {MAX_RULES} rules")
    starts = lines.array_tables("rule")
    rules: list[Rule] = []
    names: dict[str, Rule] = {}
    for position, raw in enumerate(raw_rules):
        line = starts[position] if position < len(starts) else 0
        rule = _rule(raw, position + 1, line, lines, target_ou)
        if not writeback_configuration and rule.uses_writeback_configuration:
            key = next((k for k in _WRITEBACK_KEYS if k in raw), "group_type")
            raise RulesError(
                f"rule {rule.name!r} uses Graph's writebackConfiguration ({key}), which is "
                "read (from the beta endpoint) only with "
                "WRITEBACK_GRAPH_WRITEBACK_CONFIGURATION=true",
                lines.key(line, key) or line,
            )
        if rule.name in names:
            raise RulesError(f"two rules are named {rule.name!r}", lines.key(line, "name") or line)
        names[rule.name] = rule
        rules.append(rule)
    group_type_line = lines.key(default_line, "group_type")
    group_type = _group_type(defaults.get("group_type"), group_type_line)
    if group_type == FROM_GRAPH and not writeback_configuration:
        raise RulesError(
            'group_type = "from-graph" needs WRITEBACK_GRAPH_WRITEBACK_CONFIGURATION=true',
            group_type_line,
        )
    return RuleSet(
        rules=tuple(rules),
        dn_format=_dn_format(defaults.get("dn_format"), lines.key(default_line, "dn_format")),
        group_type=group_type,
        source=source,
    )


def _top_level(data: dict[str, Any], lines: _Lines) -> tuple[dict[str, Any], int]:
    """The top-level keys checked; the [defaults] table and its line."""
    for key in data:
        if key not in _TOP_KEYS:
            raise RulesError(
                f"unknown key {key!r} (expected [[rule]] tables and one [defaults])",
                lines.top_key(key),
            )
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise RulesError("defaults must be a table: [defaults]", lines.top_key("defaults"))
    default_line = lines.table("defaults")
    for key in defaults:
        if key not in _DEFAULT_KEYS:
            raise RulesError(
                f"unknown key {key!r} in [defaults] (allowed: {', '.join(sorted(_DEFAULT_KEYS))})",
                lines.key(default_line, key),
            )
    return defaults, default_line


def _rule(raw: Any, number: int, line: int, lines: _Lines, target_ou: str) -> Rule:
    if not isinstance(raw, dict):
        raise RulesError("a rule must be a [[rule]] table", line)
    for key in raw:
        if key not in _RULE_KEYS:
            raise RulesError(
                f"unknown key {key!r} in a rule (allowed: {', '.join(sorted(_RULE_KEYS))})",
                lines.key(line, key) or line,
            )

    def at(key: str) -> int:
        return lines.key(line, key) or line

    name = raw.get("name", f"rule {number}")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise RulesError("name must be a non-empty string (at most 200 characters)", at("name"))
    if not (_MATCH_KEYS & set(raw)):
        raise RulesError(
            f"rule {name!r} matches nothing: give kinds, display_name, display_name_regex, "
            "ids, writeback_enabled or writeback_group_type",
            line,
        )
    enabled = raw.get("writeback_enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise RulesError("writeback_enabled must be true or false", at("writeback_enabled"))
    write = raw.get("write", True)
    if not isinstance(write, bool):
        raise RulesError("write must be true or false", at("write"))
    return Rule(
        name=name.strip(),
        line=line,
        kinds=_kinds(raw, at),
        display_name=_name_pattern(raw, at),
        ids=_ids(raw, at),
        writeback_enabled=enabled,
        writeback_group_types=_v2_types(raw, at),
        write=write,
        ou=_ou(raw["ou"], target_ou, at("ou")) if "ou" in raw else None,
        dn_format=_dn_format(raw.get("dn_format"), at("dn_format")),
        group_type=_group_type(raw.get("group_type"), at("group_type")),
    )


def _kinds(raw: dict[str, Any], at: Callable[[str], int]) -> frozenset[GroupKind] | None:
    if "kinds" not in raw:
        return None
    values = _strings(raw["kinds"], "kinds", at("kinds"))
    allowed = {k.value: k for k in RULE_KINDS}
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise RulesError(
            f"kinds: {', '.join(map(repr, bad)) or 'empty'} (allowed: {', '.join(allowed)})",
            at("kinds"),
        )
    return frozenset(allowed[v] for v in values)


def _name_pattern(raw: dict[str, Any], at: Callable[[str], int]) -> re.Pattern[str] | None:
    """``display_name`` (a glob) or ``display_name_regex``, case-insensitive."""
    if "display_name" in raw and "display_name_regex" in raw:
        raise RulesError("give display_name or display_name_regex, not both", at("display_name"))
    if "display_name" in raw:
        glob = raw["display_name"]
        if not isinstance(glob, str) or not glob:
            raise RulesError("display_name must be a non-empty glob string", at("display_name"))
        return re.compile(fnmatch.translate(glob), re.IGNORECASE)
    if "display_name_regex" not in raw:
        return None
    expression = raw["display_name_regex"]
    where = at("display_name_regex")
    if not isinstance(expression, str) or not expression:
        raise RulesError("display_name_regex must be a non-empty string", where)
    try:
        return re.compile(expression, re.IGNORECASE)
    except re.error as error:
        raise RulesError(f"display_name_regex: {error}", where) from None


def _ids(raw: dict[str, Any], at: Callable[[str], int]) -> frozenset[str] | None:
    if "ids" not in raw:
        return None
    values = _strings(raw["ids"], "ids", at("ids"))
    bad = [v for v in values if not is_object_id(v)]
    if bad or not values:
        raise RulesError(
            f"ids: {', '.join(map(repr, bad)) or 'empty'} is not an Entra object id", at("ids")
        )
    return frozenset(v.lower() for v in values)


def _v2_types(raw: dict[str, Any], at: Callable[[str], int]) -> frozenset[str] | None:
    key = "writeback_group_type"
    if key not in raw:
        return None
    values = _strings(raw[key], key, at(key))
    bad = [v for v in values if v not in ON_PREMISES_GROUP_TYPES]
    if bad or not values:
        raise RulesError(
            f"{key}: {', '.join(map(repr, bad)) or 'empty'} (allowed: "
            f"{', '.join(ON_PREMISES_GROUP_TYPES)})",
            at(key),
        )
    return frozenset(values)


def _ou(value: Any, target_ou: str, line: int) -> str:
    """A rule's OU as a full DN: relative to the target OU (``OU=Finance``) or a full
    DN within it; never outside, never anything but OU= RDNs below the domain."""
    if not isinstance(value, str) or not value.strip():
        raise RulesError('ou must be a DN string, e.g. "OU=Finance"', line)
    text = value.strip()
    full = text if any(attr == "dc" for attr, _ in dn_key(text)) else f"{text},{target_ou}"
    try:
        check_target_ou(full)
    except TargetRefused as refused:
        raise RulesError(f"ou {text!r} {refused}", line) from None
    if not is_within(full, target_ou):
        raise RulesError(
            f"ou {text!r} is outside the target OU {target_ou}: a rule places groups in the "
            "target OU or below it, never elsewhere",
            line,
        )
    return full


def _dn_format(value: Any, line: int | None) -> DnFormat | None:
    if value is None:
        return None
    try:
        return DnFormat(value)
    except ValueError:
        allowed = ", ".join(f.value for f in DnFormat)
        raise RulesError(f"dn_format {value!r} is not one of: {allowed}", line) from None


def _group_type(value: Any, line: int | None) -> GroupType | str | None:
    if value is None:
        return None
    if value == FROM_GRAPH:
        return FROM_GRAPH
    try:
        return GroupType(value)
    except ValueError:
        allowed = ", ".join([*(t.value for t in GroupType), FROM_GRAPH])
        raise RulesError(f"group_type {value!r} is not one of: {allowed}", line) from None


def _strings(value: Any, key: str, line: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{key} must be a string or a list of strings", line)
    return list(value)


def _toml_reason(error: tomllib.TOMLDecodeError) -> str:
    text = str(error)
    return re.sub(r"\s*\(at line \d+, column \d+\)$", "", text) or "not valid TOML"


def _line_of(error: tomllib.TOMLDecodeError) -> int | None:
    found = re.search(r"at line (\d+)", str(error))
    return int(found.group(1)) if found else None


class _Lines:
    """Where things are in the file, for error messages (tomllib keeps no positions)."""

    _TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\"' -]+?)\s*\]\s*(?:#.*)?$")
    _ARRAY = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]\s*(?:#.*)?$")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*=")

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines()
        #: line number -> the table header it starts ("" before the first)
        self._headers: list[tuple[int, str, bool]] = []
        for number, content in enumerate(self._lines, start=1):
            array = self._ARRAY.match(content)
            table = None if array else self._TABLE.match(content)
            if array:
                self._headers.append((number, array.group(1).strip(), True))
            elif table:
                self._headers.append((number, table.group(1).strip(), False))

    def array_tables(self, name: str) -> list[int]:
        return [n for n, header, array in self._headers if array and header == name]

    def table(self, name: str) -> int:
        return next((n for n, header, array in self._headers if not array and header == name), 0)

    def top_key(self, key: str) -> int | None:
        for number, header, _ in self._headers:
            if header == key or header.startswith(key + "."):
                return number
        return self.key(0, key)

    def key(self, start: int, key: str) -> int | None:
        """The line of ``key = ...`` in the table starting at line ``start`` (0: top)."""
        end = next((n for n, _, _ in self._headers if n > start), len(self._lines) + 1)
        for number in range(start + 1, end):
            match = self._KEY.match(self._lines[number - 1])
            if match and match.group(1).strip("\"'") == key:
                return number
        return None


def desired_or_excluded(
    group: CloudGroup, options: MappingOptions, nested: NestedGroups | None = None
) -> DesiredGroup | Excluded:
    """The AD entry ``group`` should be, or why it is not written."""
    decision = decide(group, options)
    if isinstance(decision, Excluded):
        return decision
    return desired_group(group, options, decision, nested)
