"""One dependency list: pyproject.toml, and the files compiled from it by scripts/lock.

requirements.txt (what the Function app installs) and requirements-dev.txt (the
development venv) are compiled from pyproject.toml with every distribution
pinned and hashed (tools/lock.py). These tests hold them to it offline: editing
pyproject.toml without running scripts/lock fails, so does editing a compiled
file by hand. And the core install, which the on-premises agent runs on, stays
free of the cloud SDKs, at install time and at import time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.settings import ROOT
from tools import lock

#: What the agent must never need (nor import when it starts).
CLOUD_SDKS = ("msgraph-sdk", "azure-functions", "azure-servicebus", "azure-identity")
CLOUD_MODULES = ("msgraph", "azure.functions", "azure.servicebus", "azure.identity", "kiota_http")


def copy_of_the_lists(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "requirements-dev.in", tmp_path / "requirements-dev.in")
    (tmp_path / "sandbox").mkdir()
    shutil.copy(ROOT / "sandbox" / "pyproject.toml", tmp_path / "sandbox" / "pyproject.toml")
    return tmp_path


def test_the_compiled_files_match_pyproject() -> None:
    assert lock.problems(ROOT) == []


def test_a_dependency_added_to_pyproject_alone_fails(tmp_path: Path) -> None:
    root = copy_of_the_lists(tmp_path)
    text = (root / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(
        text.replace("dependencies = [\n", 'dependencies = [\n  "rich>=13",\n', 1)
    )
    found = lock.problems(root)
    assert "requirements.txt is older than pyproject.toml's dependencies: run scripts/lock" in found
    assert "requirements.txt does not pin rich: run scripts/lock" in found
    assert "requirements-dev.txt does not pin rich: run scripts/lock" in found


def test_a_specifier_raised_in_pyproject_alone_fails(tmp_path: Path) -> None:
    root = copy_of_the_lists(tmp_path)
    text = (root / "pyproject.toml").read_text()
    assert '"msgraph-sdk>=1.10"' in text
    (root / "pyproject.toml").write_text(text.replace('"msgraph-sdk>=1.10"', '"msgraph-sdk>=99"'))
    found = lock.problems(root)
    pinned = lock.pins((root / "requirements.txt").read_text())["msgraph-sdk"]
    assert (
        f"requirements.txt pins msgraph-sdk=={pinned}, outside msgraph-sdk>=99: run scripts/lock"
    ) in found


def test_a_pin_edited_in_requirements_txt_alone_fails(tmp_path: Path) -> None:
    root = copy_of_the_lists(tmp_path)
    text = (root / "requirements.txt").read_text()
    version = lock.pins(text)["ldap3"]
    (root / "requirements.txt").write_text(text.replace(f"ldap3=={version}", "ldap3==2.9.0"))
    found = lock.problems(root)
    assert "requirements.txt was edited by hand: change pyproject.toml and run scripts/lock" in (
        found
    )
    assert "requirements-dev.txt has ldap3==2.9.1, requirements.txt 2.9.0: run scripts/lock" in (
        found
    )


def test_a_package_added_to_requirements_txt_alone_fails(tmp_path: Path) -> None:
    root = copy_of_the_lists(tmp_path)
    with (root / "requirements.txt").open("a") as out:
        out.write("rich==13.9.4\n")
    found = lock.problems(root)
    assert "requirements.txt was edited by hand: change pyproject.toml and run scripts/lock" in (
        found
    )
    assert "requirements.txt: rich==13.9.4 has no hash" in found


def test_every_pin_is_exact_and_hashed() -> None:
    for name in ("requirements.txt", "requirements-dev.txt"):
        _, body = lock.split((ROOT / name).read_text())
        requirements = lock.requirement_lines(body.replace("\\\n", " "))
        assert requirements, name
        for line in requirements:
            assert re.match(r"^[A-Za-z0-9][\w.-]*==\S+(\s+--hash=sha256:[0-9a-f]{64})+$", line), (
                line
            )


def test_the_function_app_installs_no_dev_tool_and_the_dev_venv_the_same_versions() -> None:
    shipped = lock.pins((ROOT / "requirements.txt").read_text())
    developed = lock.pins((ROOT / "requirements-dev.txt").read_text())
    tools = {"pytest", "mypy", "ruff", "hypothesis", "uv", "setuptools"}
    assert not (tools | {"python-ldap"}) & set(shipped)  # python-ldap has no wheels
    assert {"azure-functions", "azure-servicebus", "msgraph-sdk", "websockets"} <= set(shipped)
    assert "azure-monitor-opentelemetry" in shipped  # logging_setup's export to App Insights
    assert {name: developed[name] for name in shipped} == shipped
    assert "prometheus-client" in developed  # serve's /metrics
    assert "python-ldap" in developed  # the directory adapter's preferred client
    assert "uv" in developed  # scripts/lock's resolver is pinned like any tool


def test_the_core_install_has_no_cloud_sdk() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {lock.normalize(re.split(r"[<>=!~\[; ]", req)[0]) for req in project["dependencies"]}
    assert core & set(CLOUD_SDKS) == set()
    assert {"ldap3", "websockets", "httpx"} <= core
    extras = project["optional-dependencies"]
    assert "prometheus-client>=0.20" in extras["serve"]
    assert set(extras) == {"graph", "serve", "functions", "python-ldap", "all"}


def test_the_agent_imports_no_cloud_sdk_when_it_starts() -> None:
    """Everything ``writeback agent`` imports, in a fresh interpreter: none of the cloud SDKs."""
    modules = (
        "writeback.cli",
        "writeback.config",
        "writeback.bootstrap",
        "writeback.logging_setup",
        "writeback.hosting.agent",
        "writeback.adapters.hybrid_connection",
        "writeback.adapters.directory",
        "writeback.adapters.agent_state",
    )
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({CLOUD_MODULES!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("name", ["pyproject.toml", "sandbox/pyproject.toml"])
def test_the_licence_is_an_spdx_expression(name: str) -> None:
    """``license = {text = ...}`` is deprecated by setuptools 77 (a warning on every install)."""
    document = tomllib.loads((ROOT / name).read_text())
    assert document["project"]["license"] == "MIT"
    assert "setuptools>=77" in document["build-system"]["requires"]
