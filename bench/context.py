"""What every scenario group shares: the measurement :class:`Context`, the :class:`Group`
interface, one :class:`Turn` per scenario, and the :class:`Results` they fill.

The groups: :mod:`bench.mesh_groups` (``inprocess``, ``expert``, ``gateway``, ``gateway_openai``,
``relay``, and ``gateway_tls``), :mod:`bench.vllm_groups` (``vllm_grpc``, ``vllm_openai``),
:mod:`bench.topology` (the shipped topology under ``up``) and :mod:`bench.prefix` (prefix
affinity against least outstanding).

A turn is one trial of one scenario at one concurrency level. A full run starts every group and
measures every trial at every level in every scenario in turn (:mod:`bench.runner`), so that
the ratios the targets are stated in come from trials seconds apart: the speed of a shared
machine drifts by tens of percent over minutes, and an idle vLLM engine uses about 0.01
cores. A quick run measures one group after the other and starts the next group's engine
while one is measured (never more than three engines), which halves its wall time at the cost
of noisier numbers. Every scenario gets the same untimed warm-up before it is measured.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmesh import cpus

from .clients import mesh_client, mesh_requests, openai_client
from .load import LoadResult, OneRequest, run_load
from .plan import EXTRA_SCENARIOS, EngineSettings, LoadPlan
from .procs import QUIET_CORES, ProcessSampler, wait_for_quiet

HOST = "127.0.0.1"


@dataclass
class Results:
    """Everything measured: the reported numbers, the details behind them, and failures."""

    scenarios: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, scenario: str, result: LoadResult, sampler: ProcessSampler) -> dict[str, float]:
        """Record one trial of one scenario at one concurrency; return its numbers.

        With several trials the one with the highest tokens/s is reported (on a shared
        machine noise only ever slows a run down); peak RSS is the highest of all trials.
        """
        key = str(result.concurrency)
        row = {**result.summary(), "peak_rss_mib": sampler.peak_total_mib}
        runs = self.details.setdefault(scenario, {}).setdefault("runs", {})
        detail = runs.setdefault(key, {"trials_tok_s": []})
        detail["trials_tok_s"].append(round(row["tok_s"], 1))
        levels = self.scenarios.setdefault(scenario, {})
        best = levels.get(key)
        if best is None or row["tok_s"] > best["tok_s"]:
            if best is not None:
                row["peak_rss_mib"] = max(row["peak_rss_mib"], best["peak_rss_mib"])
            levels[key] = row
            detail.update(result.details())
            detail["peak_rss_mib_by_process"] = sampler.peaks_mib()
            detail["cpu_cores_by_process"] = sampler.cpu_cores()
        else:
            best["peak_rss_mib"] = max(best["peak_rss_mib"], row["peak_rss_mib"])
        return row


@dataclass(frozen=True)
class Turn:
    """One scenario of a group: ``trial(concurrency)`` measures one trial and records it."""

    name: str
    trial: Callable[[int], Awaitable[None]]


@dataclass
class Context:
    """What every group shares: settings, plan, where logs go, how to report."""

    settings: EngineSettings
    plan: LoadPlan
    out: Path
    say: Callable[[str], None]
    results: Results = field(default_factory=Results)
    #: Measure only these scenarios (``expertmesh bench --only``); None = all but the extra ones.
    only: frozenset[str] | None = None
    #: The mesh config the shipped-topology scenarios start under ``up`` (None: configs/demo.yaml).
    config: Path | None = None

    def wants(self, scenario: str) -> bool:
        """True when ``scenario`` is to be measured."""
        return scenario in self.only if self.only is not None else scenario not in EXTRA_SCENARIOS

    @property
    def log_dir(self) -> Path:
        """Where each server writes its log."""
        return self.out / "logs"

    def started(self, scenario: str, seconds: float) -> None:
        """Note how long a scenario's server took to become ready."""
        self.results.details.setdefault(scenario, {})["startup_s"] = round(seconds, 1)
        self.say(f"{scenario}: ready after {seconds:.1f} s")

    async def warm_up(self, one: OneRequest) -> None:
        """The untimed warm-up every scenario gets."""
        n = self.plan.warmup_requests
        await run_load(one, min(n, 32), n, self.plan.warmup_max_tokens)

    async def settle(self, scenario: str, concurrency: int) -> None:
        """Before a trial: wait (bounded) until the machine is quiet; say when it was not."""
        if self.plan.quiet_wait_s <= 0:
            return
        started = time.monotonic()
        busy = await wait_for_quiet(self.plan.quiet_wait_s)
        waited = time.monotonic() - started
        if waited > 2:
            note = "quiet" if busy < QUIET_CORES else f"still busy ({busy:.2f} cores), measuring anyway"
            self.say(f"{scenario} {concurrency} streams: waited {waited:.0f} s for the machine: {note}")

    async def measure(self, scenario: str, one: OneRequest, roots: dict[str, int], concurrency: int) -> None:
        """One trial with the load generated here, sampling the servers' process trees."""
        await self.settle(scenario, concurrency)
        # The load generator keeps off the engine workers' cores, as a client elsewhere would.
        cpus.place()
        with ProcessSampler(roots, client=os.getpid()) as sampler:
            result = await run_load(one, concurrency, self.plan.requests[concurrency], self.plan.max_tokens)
        self.record(scenario, result, sampler)

    def turn(self, scenario: str, one: OneRequest, roots: dict[str, int]) -> Turn:
        """The turn of a scenario whose load is generated here by ``one``."""
        return Turn(scenario, functools.partial(self.measure, scenario, one, roots))

    def record(self, scenario: str, result: LoadResult, sampler: ProcessSampler) -> None:
        """Store one trial and print a progress line with where the CPU went."""
        row = self.results.add(scenario, result, sampler)
        cpu = ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.2f}" for k, v in sampler.cpu_cores().items())
        self.say(
            f"{scenario:<11} {result.concurrency:>3} streams: {row['tok_s']:6.0f} tok/s  "
            f"TTFT p50 {row['ttft_p50_ms']:6.1f} ms  ITL p50 {row['itl_p50_ms']:5.2f} ms  "
            f"RSS {row['peak_rss_mib']:5.0f} MiB  cores: {cpu}"
        )

    async def mesh_turn(self, scenario: str, generate: Callable[..., Any], roots: dict[str, int]) -> Turn:
        """Warm up through ``generate`` (an Expert or Gateway stub's ``Generate``), give the turn."""
        plan = self.plan
        await self.warm_up(mesh_client(generate, mesh_requests(plan, plan.warmup_max_tokens)))
        return self.turn(scenario, mesh_client(generate, mesh_requests(plan, plan.max_tokens)), roots)

    async def openai_turn(
        self,
        stack: contextlib.AsyncExitStack,
        scenario: str,
        base_url: str,
        model: str,
        roots: dict[str, int],
    ) -> Turn:
        """An OpenAI server's turn: one aiohttp session (keep-alive, no connection limit) on
        ``stack`` shared by every stream, warmed up, streaming ``/v1/completions`` of ``model``."""
        import aiohttp

        plan = self.plan
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            )
        )
        await self.warm_up(openai_client(session, base_url, model, plan, plan.warmup_max_tokens))
        return self.turn(scenario, openai_client(session, base_url, model, plan, plan.max_tokens), roots)


class Group(ABC):
    """Scenarios that share servers: started once, measured in turns, stopped."""

    names: tuple[str, ...] = ()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @abstractmethod
    async def start(self) -> None:
        """Start the servers and wait until they are ready."""

    @abstractmethod
    async def turns(self, stack: contextlib.AsyncExitStack) -> list[Turn]:
        """Open what the trials share (channels, sessions) on ``stack``, warm up, give the turns."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop every process this group started (also after a failed or cancelled start)."""
