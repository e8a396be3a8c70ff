"""Reading the JSON files of a model folder: an unreadable one becomes a finding, not an exception."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from expertmesh.preflight.findings import Finding, error


def read_json(path: Path, label: str, code: str, fix: str) -> tuple[Any, Finding | None]:
    """Parse a JSON file; an unreadable or invalid one becomes an error naming line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except json.JSONDecodeError as e:
        return None, error(
            code, f"{label} {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}", fix
        )
    except (OSError, UnicodeDecodeError) as e:
        return None, error(code, f"{label} {path} cannot be read: {e}", fix)


def looks_like_whole_json(path: Path) -> bool:
    """Cheap completeness test for large JSON files: non-empty and ending with ``}``.

    Parsing a 30 MB tokenizer.json would take most of the time budget of a check; a truncated
    download almost always cuts the closing brace.
    """
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb") as f:
        f.seek(max(size - 64, 0))
        tail = f.read().rstrip()
    return tail.endswith(b"}")
