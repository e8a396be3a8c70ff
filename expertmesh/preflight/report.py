"""Findings for people (rich tables, one per expert) and for machines (JSON)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from expertmesh.console import console as plain_or_terminal
from expertmesh.preflight.findings import CONFIG_KEY, MESH_KEY, Finding, count, sort_findings

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def findings_table(
    title: str, findings: Sequence[Finding], *, show_info: bool = True, expand: bool = True
) -> Table:
    """One expert's findings as a table: severity, code, cause, fix (errors first).

    ``expand`` fits it to a terminal's width (long causes wrap in their cells); without it,
    every row is one line as long as its text, for logs and CI.
    """
    table = Table(title=title, title_justify="left", show_lines=True, expand=expand)
    table.add_column("severity", no_wrap=True)
    table.add_column("code", no_wrap=True)
    table.add_column("cause", ratio=3)
    table.add_column("fix", ratio=2)
    for f in sort_findings(findings):
        if f.severity == "info" and not show_info:
            continue
        style = SEVERITY_STYLE[f.severity]
        table.add_row(Text(f.severity, style=style), f.code, f.cause, f.fix)
    return table


def _title(key: str, findings: Sequence[Finding], labels: Mapping[str, str]) -> str:
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = sum(1 for f in findings if f.severity == "warning")
    verdict = "FAILED" if errors else "ok"
    extra = f"{errors} error(s), {warnings} warning(s)" if errors or warnings else "no problems"
    label = labels.get(key, "")
    return f"{key}{' — ' + label if label else ''}: {verdict} ({extra})"


def render_findings(
    results: Mapping[str, Sequence[Finding]],
    console: Console | None = None,
    *,
    labels: Mapping[str, str] | None = None,
    show_info: bool = True,
) -> None:
    """Print ``check_mesh``'s result: one table per expert (and for the config / mesh when needed)."""
    console = console or plain_or_terminal()
    labels = labels or {}
    for key, findings in results.items():
        if key in (CONFIG_KEY, MESH_KEY) and not any(f.severity != "info" for f in findings):
            for f in findings:  # the config path line and mesh facts need no table when all is well
                console.print(Text(f.cause, style="dim"))
            continue
        title = _title(key, findings, labels)
        console.print(findings_table(title, findings, show_info=show_info, expand=console.is_terminal))
    errors, warnings = count(results, "error"), count(results, "warning")
    style = "bold red" if errors else ("yellow" if warnings else "bold green")
    console.print(Text(f"{errors} error(s), {warnings} warning(s)", style=style))


def results_to_json(
    results: Mapping[str, Sequence[Finding]], *, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Plain data for ``check --json``: findings per key, totals and ``ok``."""
    errors = count(results, "error")
    return {
        **(extra or {}),
        "results": {key: [f.to_dict() for f in sort_findings(fs)] for key, fs in results.items()},
        "errors": errors,
        "warnings": count(results, "warning"),
        "ok": errors == 0,
    }
