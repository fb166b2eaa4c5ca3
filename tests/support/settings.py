"""The settings the product's code reads, found by scanning its source.

Shared by the tests that hold the sample settings file and the Bicep template to
the code: a setting added to the code and forgotten in either fails a test.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def settings_read_by_the_code() -> set[str]:
    """Every WRITEBACK_* name in the app's code (not the sandbox's: that is the test harness),
    and every other environment name the code reads (the bindings' %SETTING%s are
    WRITEBACK_* names too)."""
    names: set[str] = set()
    files = [ROOT / "function_app.py", *(ROOT / "writeback").rglob("*.py")]
    for path in files:
        text = path.read_text()
        names.update(re.findall(r"\bWRITEBACK_[A-Z0-9_]*[A-Z0-9](?:__[A-Za-z]+)?", text))
        names.update(
            re.findall(
                r"\b(AZURE_[A-Z_]+[A-Z]|APPLICATIONINSIGHTS_[A-Z_]+[A-Z]|"
                r"FUNCTIONS_WORKER_RUNTIME)\b",
                text,
            )
        )
    return names


def agent_only_settings(names: set[str]) -> set[str]:
    """WRITEBACK_AGENT_* settings belong to the on-premises agent, not the Function app."""
    return {name for name in names if name.startswith("WRITEBACK_AGENT_")}
