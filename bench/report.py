"""The outputs: ``results.json``, the table with ratios and targets, and ``results.png``.

Absolute numbers on a shared two-core machine are noisy; ratios taken within one run are
what the targets (issue 6, and ``bench/README.md``) are stated in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import ALL_SCENARIOS

Scenarios = dict[str, dict[str, dict[str, float]]]


@dataclass(frozen=True)
class Target:
    """One goal from the issue, checked at some concurrency levels."""

    name: str
    streams: tuple[int, ...]
    goal: str
    value: Callable[[Scenarios, str], float]  # (scenarios, "<concurrency>") -> measured value
    met: Callable[[float], bool]


def _metric(scenarios: Scenarios, scenario: str, c: str, key: str) -> float:
    return scenarios.get(scenario, {}).get(c, {}).get(key, math.nan)


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else math.nan


def _tok(s: Scenarios, name: str, c: str) -> float:
    return _metric(s, name, c, "tok_s")


def _best_vllm(s: Scenarios, c: str) -> float:
    values = [v for v in (_tok(s, "vllm_grpc", c), _tok(s, "vllm_openai", c)) if math.isfinite(v)]
    return max(values) if values else math.nan


def _vs(a: str, b: str) -> Callable[[Scenarios, str], float]:
    """tok/s of scenario ``a`` as a multiple of ``b`` ("best_vllm": the better of vLLM's servers)."""
    if b == "best_vllm":
        return lambda s, c: _ratio(_tok(s, a, c), _best_vllm(s, c))
    return lambda s, c: _ratio(_tok(s, a, c), _tok(s, b, c))


def _ratio_target(a: str, b: str, streams: tuple[int, ...], least: float, strict: bool = False) -> Target:
    """``a``'s tok/s is at least (``strict``: more than) ``least`` times ``b``'s."""
    goal = f"{'>' if strict else '>='} {least:.2f}x"
    name = f"{a} tok/s vs {'best vLLM server' if b == 'best_vllm' else b}"
    met = (lambda v: v > least) if strict else (lambda v: v >= least)
    return Target(name, streams, goal, _vs(a, b), met)


def _hop_targets(expert: str, gateway: str, vs_vllm: float, strict: bool = False) -> tuple[Target, ...]:
    """The expert's targets against in-process and vLLM's servers, and the gateway's against it."""
    return (
        _ratio_target(expert, "inprocess", (1, 8, 32), 0.9),
        _ratio_target(expert, "inprocess", (128,), 0.7),
        _ratio_target(expert, "best_vllm", (32, 128), vs_vllm, strict),
        _ratio_target(gateway, expert, (1, 8, 32, 128), 0.9),
    )


TARGETS = (
    *_hop_targets("expert", "gateway", 1.5),
    # The shipped topology (issue 22): `up` from a config, the client a process of its own;
    # both hops ahead of the better of vLLM's servers.
    *_hop_targets("up_expert", "up_gateway", 1.0, strict=True),
    _ratio_target("up_gateway", "best_vllm", (32, 128), 1.0, strict=True),
    Target(
        "gateway_tls tok/s vs gateway",
        (1, 32, 128),
        ">= 0.90x",
        lambda s, c: _ratio(_tok(s, "gateway_tls", c), _tok(s, "gateway", c)),
        lambda v: v >= 0.9,
    ),
    Target(
        "TTFT p50 added by TLS + auth (ms)",
        (1,),
        "<= 1 ms",
        lambda s, c: _metric(s, "gateway_tls", c, "ttft_p50_ms") - _metric(s, "gateway", c, "ttft_p50_ms"),
        lambda v: v <= 1.0,
    ),
    Target(
        "gateway_openai tok/s vs vllm_openai",
        (1, 8, 32, 128),
        ">= 1.00x",
        lambda s, c: _ratio(_tok(s, "gateway_openai", c), _tok(s, "vllm_openai", c)),
        lambda v: v >= 1.0,
    ),
    Target(
        "TTFT p50 added by HTTP front over gateway (ms)",
        (1,),
        "report",
        lambda s, c: _metric(s, "gateway_openai", c, "ttft_p50_ms") - _metric(s, "gateway", c, "ttft_p50_ms"),
        lambda v: True,  # the issue asks for the figure, not a bound
    ),
    Target(
        "TTFT p50 added by gateway (ms)",
        (1,),
        "<= 1 ms",
        lambda s, c: _metric(s, "gateway", c, "ttft_p50_ms") - _metric(s, "expert", c, "ttft_p50_ms"),
        lambda v: v <= 1.0,
    ),
)


def check_targets(scenarios: Scenarios) -> list[dict[str, Any]]:
    """Every target at every level it names: measured value, goal, and whether it was met."""
    rows = []
    for t in TARGETS:
        for c in t.streams:
            value = t.value(scenarios, str(c))
            rows.append(
                {
                    "target": t.name,
                    "streams": c,
                    "value": round(value, 3) if math.isfinite(value) else None,
                    "goal": t.goal,
                    "met": bool(math.isfinite(value) and t.met(value)),
                }
            )
    return rows


def ratios(scenarios: Scenarios) -> dict[str, dict[str, float | None]]:
    """tok/s of every scenario as a multiple of ``inprocess`` at the same concurrency."""
    out: dict[str, dict[str, float | None]] = {}
    for name, levels in scenarios.items():
        out[name] = {}
        for c, row in levels.items():
            r = _ratio(row["tok_s"], _tok(scenarios, "inprocess", c))
            out[name][c] = round(r, 3) if math.isfinite(r) else None
    return out


def _clean(obj: Any) -> Any:
    """JSON has no NaN: turn non-finite floats into null, round the rest for reading."""
    if isinstance(obj, float):
        return round(obj, 3) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, scenarios: Scenarios, extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``results.json``: ``{"scenarios": ...}`` first, then ratios, targets and ``extra``."""
    ordered = {name: scenarios[name] for name in ALL_SCENARIOS if name in scenarios}
    doc = {
        "scenarios": ordered,
        "ratios_vs_inprocess": ratios(ordered),
        "targets": check_targets(ordered),
        **extra,
    }
    doc = _clean(doc)
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def print_tables(scenarios: Scenarios, concurrency: list[int], errors: dict[str, str]) -> None:
    """Print throughput with ratios, latency and memory, and the targets."""
    from rich.table import Table

    from expertmesh.console import console as make_console

    console = make_console()
    names = [n for n in ALL_SCENARIOS if n in scenarios or n in errors]
    rel = ratios(scenarios)

    tput = Table(title="output tokens/s (x in-process AsyncLLM at the same streams)")
    tput.add_column("scenario")
    for c in concurrency:
        tput.add_column(f"{c} streams", justify="right")
    for name in names:
        if name in errors and name not in scenarios:
            tput.add_row(name, *(["failed"] * len(concurrency)))
            continue
        cells = []
        for c in concurrency:
            tok = _tok(scenarios, name, str(c))
            r = rel.get(name, {}).get(str(c))
            cells.append(f"{_fmt(tok, '.0f')} ({_fmt(r, '.2f')}x)")
        tput.add_row(name, *cells)
    console.print(tput)

    lat = Table(title="latency and memory")
    for col in (
        "scenario",
        "streams",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "peak RSS MiB",
    ):
        lat.add_column(col, justify="left" if col == "scenario" else "right")
    for name in names:
        for c in concurrency:
            row = scenarios.get(name, {}).get(str(c))
            if row is None:
                continue
            lat.add_row(
                name,
                str(c),
                _fmt(row["ttft_p50_ms"], ".1f"),
                _fmt(row["ttft_p99_ms"], ".1f"),
                _fmt(row["itl_p50_ms"], ".2f"),
                _fmt(row["itl_p99_ms"], ".2f"),
                _fmt(row["peak_rss_mib"], ".0f"),
            )
    console.print(lat)

    tgt = Table(title="targets (issue 6)")
    for col in ("target", "streams", "measured", "goal", "met"):
        tgt.add_column(col, justify="left" if col in ("target", "goal") else "right")
    for t in check_targets(scenarios):
        value = t["value"]
        shown = "-" if value is None else (f"{value:.2f}x" if "x" in t["goal"] else f"{value:+.2f}")
        met = "-" if value is None else ("yes" if t["met"] else "NO")  # "-": not measured (--only)
        tgt.add_row(t["target"], str(t["streams"]), shown, t["goal"], met)
    console.print(tgt)
    for name, message in errors.items():
        console.print(f"[red]{name} failed:[/red] {message}", markup=True, highlight=False)


def markdown(doc: dict[str, Any], concurrency: list[int]) -> str:
    """The results as Markdown (throughput with ratios, latency and memory, targets) for a README."""
    scenarios: Scenarios = doc["scenarios"]
    rel = doc["ratios_vs_inprocess"]
    head = "| scenario | " + " | ".join(f"{c} streams" for c in concurrency) + " |"
    lines = ["### Output tokens/s (x in-process)", "", head, "|---" * (len(concurrency) + 1) + "|"]
    for name, levels in scenarios.items():
        cells = [
            f"{_fmt(levels[str(c)]['tok_s'], '.0f')} ({_fmt(rel[name].get(str(c)), '.2f')}x)"
            if str(c) in levels
            else "-"
            for c in concurrency
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Latency (ms) and peak RSS (MiB)",
        "",
        "| scenario | streams | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, levels in scenarios.items():
        for c in concurrency:
            row = levels.get(str(c))
            if row:
                lines.append(
                    f"| {name} | {c} | {_fmt(row['ttft_p50_ms'], '.1f')} | {_fmt(row['ttft_p99_ms'], '.1f')} "
                    f"| {_fmt(row['itl_p50_ms'], '.2f')} | {_fmt(row['itl_p99_ms'], '.2f')} "
                    f"| {_fmt(row['peak_rss_mib'], '.0f')} |"
                )
    lines += ["", "### Targets", "", "| target | streams | measured | goal | met |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        value = t["value"]
        shown = "-" if value is None else (f"{value:.2f}x" if "x" in t["goal"] else f"{value:+.2f} ms")
        met = "-" if value is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['streams']} | {shown} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, scenarios: Scenarios, concurrency: list[int]) -> None:
    """Write the PNG: tokens/s and TTFT p50 against concurrency, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in ALL_SCENARIOS:
        levels = scenarios.get(name)
        if not levels:
            continue
        xs = [c for c in concurrency if str(c) in levels]
        ax_tok.plot(xs, [levels[str(c)]["tok_s"] for c in xs], marker="o", label=name)
        ax_ttft.plot(xs, [levels[str(c)]["ttft_p50_ms"] for c in xs], marker="o", label=name)
    for ax, title, ylabel in (
        (ax_tok, "Output throughput", "output tokens/s"),
        (ax_ttft, "Time to first token (p50)", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_ttft.set_yscale("log")
    ax_tok.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
