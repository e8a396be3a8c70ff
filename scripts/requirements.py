"""Print the project's requirements (its dependencies and the given extras), one a line.

    python3 scripts/requirements.py cpu > requirements.txt

The image installs these in a layer of their own, before the source is copied, so that a change
to the source does not reinstall torch and vLLM.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The dependencies of ``pyproject`` plus those of each extra; an unknown extra is an error."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s): {', '.join(unknown)} (known: {', '.join(sorted(optional))})")
    return [*project["dependencies"], *(r for e in extras for r in optional[e])]


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(requirements(here, [e for a in sys.argv[1:] for e in a.split(",") if e])))
