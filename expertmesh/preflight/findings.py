"""What a preflight check reports: one finding per problem, each with its cause and its fix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]

#: Order used to sort findings: errors first.
SEVERITY_RANK: dict[str, int] = {"error": 0, "warning": 1, "info": 2}

#: Keys of :func:`expertmesh.preflight.check_mesh`'s result that are not expert ids (expert ids
#: cannot contain parentheses, so these never collide with one).
CONFIG_KEY = "(config)"
MESH_KEY = "(mesh)"


@dataclass(frozen=True)
class Finding:
    """One problem (or fact) found before loading.

    ``code`` is a short stable id (``quant-dtype``, ``kv-cache-too-small``, ...) that scripts and
    tests can match on; ``cause`` says what is wrong, ``fix`` what to change.
    """

    severity: Severity
    code: str
    cause: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.cause} — {self.fix}" if self.fix else self.cause

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return asdict(self)


def error(code: str, cause: str, fix: str) -> Finding:
    """A problem that stops the expert from starting."""
    return Finding("error", code, cause, fix)


def warning(code: str, cause: str, fix: str) -> Finding:
    """A problem that lets the expert start but is likely to hurt later."""
    return Finding("warning", code, cause, fix)


def info(code: str, cause: str, fix: str = "") -> Finding:
    """A fact worth showing (sizes, budgets), not a problem."""
    return Finding("info", code, cause, fix)


def has_errors(findings: Iterable[Finding]) -> bool:
    """True when any finding is an error."""
    return any(f.severity == "error" for f in findings)


def count(results: Mapping[str, Iterable[Finding]], severity: Severity) -> int:
    """How many findings of this severity ``check_mesh``'s result holds."""
    return sum(1 for findings in results.values() for f in findings if f.severity == severity)


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Errors first, then warnings, then infos; stable within a severity."""
    return sorted(findings, key=lambda f: SEVERITY_RANK[f.severity])
