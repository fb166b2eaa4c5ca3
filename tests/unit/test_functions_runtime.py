"""function_app.py through the Functions Python worker's own indexing and validation.

At start-up the worker imports ``function_app.py``, indexes the app and checks
every binding against the function's annotations (``azure-functions-runtime``,
which needs Python 3.13). When one function fails, the worker answers the
host's init request with a failure and the host loads no function of the app:
not the webhook, not the timers. Calling the decorated functions directly, as
the other tests do, never passes through that check.

``tests/functions_runtime/probe.py`` runs that code in ``.venv-functions``
(made by ``scripts/functions-runtime``, called by ``scripts/bootstrap.sh``) and
prints what the worker would send the host. Without that venv the tests skip;
under CI (``CI`` set) they fail, so a broken setup cannot pass as skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "functions_runtime" / "probe.py"
VENV_PYTHON = ROOT / ".venv-functions" / "bin" / "python"
FUNCTIONS = {"notifications", "lifecycle", "worker", "reconcile", "subscription_upkeep"}


def _runtime_python() -> Path:
    problem = None
    if not VENV_PYTHON.exists():
        problem = f"{VENV_PYTHON} is missing"
    else:
        version = subprocess.run(
            [str(VENV_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
        if version.stdout.strip() != "3.13":
            problem = f"{VENV_PYTHON} is not Python 3.13: {version.stdout}{version.stderr}"
    if problem is not None:
        message = f"{problem}; run scripts/functions-runtime (needs Python 3.13)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return VENV_PYTHON


def index(app_directory: Path) -> tuple[int, dict[str, Any]]:
    """The worker's answer for the app in ``app_directory`` (exit status, JSON)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    done = subprocess.run(
        [str(_runtime_python()), str(PROBE), str(app_directory)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    try:
        answer: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"the probe printed no JSON (exit {done.returncode}): {done.stderr[-3000:]}")
    return done.returncode, answer


@pytest.fixture(scope="module")
def indexed() -> dict[str, Any]:
    status, answer = index(ROOT)
    assert status == 0 and answer["ok"], f"the worker refuses function_app.py: {answer['error']}"
    return answer


def bindings(answer: dict[str, Any], function: str) -> dict[str, dict[str, Any]]:
    [entry] = [f for f in answer["functions"] if f["name"] == function]
    return {b["name"]: b for b in entry["bindings"]}


def test_every_function_of_the_app_loads_on_the_worker(indexed: dict[str, Any]) -> None:
    assert indexed["runtime_version"] == "1.3.0"
    assert {f["name"] for f in indexed["functions"]} == FUNCTIONS
    for function in indexed["functions"]:
        assert function["script_file"] == "function_app.py"
        assert function["entry_point"] == function["name"]
        assert function["properties"] == {"worker_indexed": "True"}
        for binding in function["bindings"]:
            assert binding["raw"] is not None, f"{function['name']}: no raw binding"
            assert binding["raw"]["type"] == binding["type"]


def test_the_service_bus_trigger_binds_one_message_of_a_session(indexed: dict[str, Any]) -> None:
    [(name, trigger)] = bindings(indexed, "worker").items()
    assert name == "message"
    assert (trigger["type"], trigger["direction"]) == ("serviceBusTrigger", "in")
    # No dataType: the host hands the worker the body as bytes.
    assert trigger["data_type"] == "undefined"
    raw = trigger["raw"]
    assert raw["isSessionsEnabled"] is True
    assert raw["connection"] == "WRITEBACK_SERVICEBUS"
    assert raw["queueName"] == "%WRITEBACK_SERVICEBUS_QUEUE%"
    assert str(raw["cardinality"]).lower() == "one"  # single dispatch (bench/functions_trigger)
    assert raw["autoCompleteMessages"] is True
    assert "dataType" not in raw


def test_the_http_functions_take_posts_with_a_function_key(indexed: dict[str, Any]) -> None:
    for route in ("notifications", "lifecycle"):
        found = bindings(indexed, route)
        assert set(found) == {"req", "$return"}
        trigger = found["req"]
        assert (trigger["type"], trigger["direction"]) == ("httpTrigger", "in")
        assert str(trigger["raw"]["authLevel"]).lower() == "function"
        assert trigger["raw"]["methods"] == ["POST"]
        assert trigger["raw"]["route"] == route
        assert (found["$return"]["type"], found["$return"]["direction"]) == ("http", "out")


def test_the_timers_take_their_schedules_from_settings(indexed: dict[str, Any]) -> None:
    expected = {
        "reconcile": "%WRITEBACK_RECONCILE_SCHEDULE%",
        "subscription_upkeep": "%WRITEBACK_SUBSCRIPTION_SCHEDULE%",
    }
    for function, schedule in expected.items():
        [(name, trigger)] = bindings(indexed, function).items()
        assert name == "timer"
        assert (trigger["type"], trigger["direction"]) == ("timerTrigger", "in")
        assert trigger["raw"]["schedule"] == schedule
        assert trigger["raw"]["runOnStartup"] is False
        assert trigger["raw"]["useMonitor"] is True


def test_every_setting_a_binding_names_is_in_the_sample_settings(indexed: dict[str, Any]) -> None:
    """The host resolves %NAME% and connection prefixes from app settings at start-up."""
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    named: set[str] = set()
    for function in indexed["functions"]:
        for binding in function["bindings"]:
            for value in binding["raw"].values():
                named.update(re.findall(r"%([A-Za-z0-9_]+)%", str(value)))
            connection = binding["raw"].get("connection")
            if connection:
                assert connection in sample or f"{connection}__fullyQualifiedNamespace" in sample
    assert named == {
        "WRITEBACK_SERVICEBUS_QUEUE",
        "WRITEBACK_RECONCILE_SCHEDULE",
        "WRITEBACK_SUBSCRIPTION_SCHEDULE",
    }
    assert named <= set(sample)


def test_a_pep_585_list_annotation_makes_the_worker_load_no_function(tmp_path: Path) -> None:
    """The form function_app.py had before (a batch trigger annotated ``list[...]``):
    the whole app is refused, not one function."""
    source = (ROOT / "function_app.py").read_text()
    broken, count = re.subn(
        r"def worker\(message: func\.ServiceBusMessage\)",
        "def worker(message: list[func.ServiceBusMessage])",
        source,
    )
    assert count == 1
    broken = broken.replace("cardinality=func.Cardinality.ONE", "cardinality=func.Cardinality.MANY")
    (tmp_path / "function_app.py").write_text(broken)
    status, answer = index(tmp_path)
    assert status == 1 and answer["ok"] is False
    assert answer["functions"] == []
    assert "FunctionLoadError: cannot load the worker function" in answer["error"]
    assert "binding message has invalid non-type annotation list[" in answer["error"]
