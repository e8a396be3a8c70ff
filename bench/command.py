"""The ``expertmesh bench`` command: run the scenarios, write and print the results (the
scenarios and what they measure: the package docstring, :mod:`expertmesh.bench`)."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] bench: {line}", file=sys.stderr, flush=True)


def main_bench(
    quick: bool,
    out: Path,
    trials: int | None = None,
    only: set[str] | None = None,
    config: Path | None = None,
) -> int:
    """Run every scenario, write ``out/results.json`` and ``out/results.png``, print the tables.

    ``trials`` overrides the plan's trials per level (the best is reported). ``only``: just the
    scenarios, measured in turns (e.g. ``{"gateway", "gateway_tls"}``: two engines, not five).
    ``config``: the mesh the shipped-topology scenarios start under ``up`` (default configs/demo.yaml).
    Returns 0 when every scenario was measured, 1 when any failed (its error is printed and
    stored under ``errors`` in the JSON). Speed targets are reported, never turned into failures.
    """
    from expertmesh.loop import run
    from expertmesh.services.expert.ipc_dir import IpcDir

    from .context import Context
    from .plan import ALL_SCENARIOS, EngineSettings, LoadPlan, default_model
    from .report import markdown, plot, print_tables, write_json
    from .runner import GROUPS, run_groups

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    settings = EngineSettings(model=str(default_model()))
    plan = LoadPlan.quick() if quick else LoadPlan.full()
    if trials is not None:
        plan = replace(plan, trials=trials)
    _say(
        f"{'quick' if quick else 'full'} run, {plan.max_tokens} output tokens per request, "
        f"requests per level {plan.requests}; output in {out}"
    )
    ipc = IpcDir.claim()  # every engine below, ours and vLLM's servers, leaves its sockets there
    try:
        # A full run measures every scenario in turns; a quick one group after the other, the next
        # engine starting while one is measured: half the wall time, noisier numbers.
        ctx = Context(settings, plan, out, _say, only=frozenset(only) if only else None, config=config)
        groups = tuple(g for g in GROUPS if any(ctx.wants(n) for n in g.names))
        if only:
            unknown = only - set(ALL_SCENARIOS)
            if unknown or not groups:
                known = ", ".join(ALL_SCENARIOS)
                _say(f"--only {','.join(sorted(only))}: no such scenario (scenarios: {known})")
                return 2
        results = run(run_groups(ctx, together=bool(only) or not quick, groups=groups))
    finally:
        ipc.remove()
    elapsed = time.monotonic() - started
    doc = write_json(
        out / "results.json",
        results.scenarios,
        {
            "errors": results.errors,
            "details": results.details,
            "settings": asdict(settings),
            "plan": plan.describe(),
            "machine": {
                "cpus": psutil.cpu_count(),
                "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "quick": quick,
            "elapsed_s": round(elapsed, 1),
        },
    )
    (out / "results.md").write_text(markdown(doc, plan.concurrency))
    if results.scenarios:
        plot(out / "results.png", results.scenarios, plan.concurrency)
    print_tables(results.scenarios, plan.concurrency, results.errors)
    _say(f"done in {elapsed:.0f} s: {out / 'results.json'}, {out / 'results.png'}")
    return 1 if results.errors else 0
