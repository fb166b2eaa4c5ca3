"""Shared fixtures: real Samba AD domain controllers (sandbox/writeback_sandbox/samba.py).

* ``samba_dc``: a plain forest on 127.0.0.2, ``exchange_dc``: a forest whose
  schema Exchange prep would have extended, on 127.0.0.3. Both are
  session-scoped, made only when a test asks for them, and stopped and deleted
  at the end of the session. When another session on this machine already
  serves LDAP at that address, the DC takes a free 127.0.0.N (N >= 100).
* ``any_dc``: the test runs once per forest (ids ``plain`` and ``exchange``).
* ``make_ou(dc)``: a fresh OU with a unique name for this test, on that DC.

Tests that use these fixtures are marked ``samba`` automatically (``-m "not
samba"`` leaves them out). Without root, or when Samba cannot be installed,
they are skipped with the reason; under CI (``CI`` set) or with
``WRITEBACK_REQUIRE_SAMBA=1`` they fail instead, so a broken harness cannot
pass as skipped tests.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator

import pytest

from writeback_sandbox.samba import (
    SambaDC,
    SambaUnavailable,
    ensure_system_deps,
    free_loopback_address,
    provision,
)

PLAIN_ADDRESS = "127.0.0.2"
EXCHANGE_ADDRESS = "127.0.0.3"
SAMBA_FIXTURES = frozenset({"samba_dc", "exchange_dc", "any_dc", "make_ou"})

MakeOu = Callable[..., str]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SAMBA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.samba)


def _samba_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("WRITEBACK_REQUIRE_SAMBA") == "1"


def _require_samba() -> None:
    """Skip (or, under CI, fail) when a Samba DC cannot run on this machine."""
    try:
        if os.geteuid() != 0:
            raise SambaUnavailable("a Samba AD DC needs root")
        ensure_system_deps()
    except SambaUnavailable as exc:
        if _samba_required():
            pytest.fail(f"Samba AD DC unavailable under CI: {exc}")
        pytest.skip(f"Samba AD DC unavailable: {exc}")


def _session_dc(
    factory: pytest.TempPathFactory, name: str, address: str, *, exchange: bool
) -> Iterator[SambaDC]:
    _require_samba()
    workdir = factory.mktemp(name)
    dc = provision(workdir, address=free_loopback_address(address), exchange_schema=exchange)
    try:
        yield dc
    finally:
        dc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    """A plain forest (base schema) on 127.0.0.2."""
    yield from _session_dc(tmp_path_factory, "samba-plain", PLAIN_ADDRESS, exchange=False)


@pytest.fixture(scope="session")
def exchange_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    """A forest with the Exchange attributes the product writes, on 127.0.0.3."""
    yield from _session_dc(tmp_path_factory, "samba-exchange", EXCHANGE_ADDRESS, exchange=True)


@pytest.fixture(params=["plain", "exchange"])
def any_dc(request: pytest.FixtureRequest) -> SambaDC:
    """Each forest in turn: the plain one, then the Exchange-prepared one."""
    dc: SambaDC = request.getfixturevalue("samba_dc" if request.param == "plain" else "exchange_dc")
    if not dc.is_running():
        dc.start()
    return dc


@pytest.fixture
def make_ou(request: pytest.FixtureRequest) -> MakeOu:
    """``make_ou(dc, hint=None) -> dn``: a new OU under the domain root for this test.

    The name joins the test's name and a random token, so tests never see each
    other's objects. A DC that an earlier test left stopped is started again.
    """
    slug = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:40]

    def make(dc: SambaDC, hint: str | None = None) -> str:
        if not dc.is_running():
            dc.start()
        name = f"t-{hint or slug}-{uuid.uuid4().hex[:8]}"
        return dc.create_ou(name)

    return make
