"""Parse every Bicep file under the given folder with pycep-parser; exit 1 on any failure.

checkov skips a file it cannot parse without failing, so this runs first: a
template checkov never saw must not pass as clean.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pycep import BicepParser


def main(root: str) -> int:
    parser = BicepParser()
    files = sorted(Path(root).rglob("*.bicep"))
    failed = 0
    for path in files:
        try:
            template = parser.parse(file_path=path)
        except Exception as exc:  # Lark raises many kinds; any of them fails the check
            print(f"FAIL {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            failed += 1
            continue
        kinds = len(template.get("resources", {})) + len(template.get("modules", {}))
        print(f"ok   {path} ({kinds} resources and modules)")
    print(f"{len(files) - failed} parsed, {failed} failed")
    return 1 if failed or not files else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "infra"))
