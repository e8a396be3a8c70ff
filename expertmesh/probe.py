"""``expertmesh probe``: per expert, cold load time, warm time to first token and tokens/s.

What the original operators measured by hand: start the mesh, wait for every expert, then send
a few identical requests pinned to each expert through the gateway and time them. Experts with
preflight errors are not started (they would only crash and restart); they are listed with the cause.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rich.table import Table

from expertmesh.client import MeshClient
from expertmesh.config import MeshConfig, load_resolved
from expertmesh.console import console
from expertmesh.preflight.check import check_mesh
from expertmesh.preflight.findings import MESH_KEY, Finding
from expertmesh.supervisor import Supervisor

PROMPT = "Tell me about the quick brown fox."
MAX_TOKENS = 32
#: A large model on CPU can take many minutes to load; the probe waits for it.
READY_TIMEOUT_S = 1800.0
#: Deadline of one request; the first one to a lazy expert includes its load.
REQUEST_TIMEOUT_S = 900.0


@dataclass
class ExpertProbe:
    """Timings of one expert."""

    expert_id: str
    load: str
    ready_after_s: float | None = None  # process start to SERVING (an eager expert's load)
    first_ttft_s: float | None = None  # first request's time to first token (a lazy expert's load)
    ttft_s: list[float] = field(default_factory=list)  # warm requests
    tokens_per_s: list[float] = field(default_factory=list)  # warm requests, decode rate
    completion_tokens: int = 0
    error: str = ""


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


async def _timed_request(mesh: MeshClient, expert_id: str) -> tuple[float, float, int]:
    """(time to first token s, decode tokens/s, completion tokens) of one pinned request."""
    start = time.monotonic()
    first: float | None = None
    tokens = 0
    async for msg in mesh.stream(
        PROMPT, expert_id=expert_id, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
    ):
        if first is None and (msg.token_ids or msg.text):
            first = time.monotonic()
        if msg.finish_reason:
            tokens = msg.usage.completion_tokens
    end = time.monotonic()
    first = first or end
    decode_s = end - first
    # The first token comes with the prefill; the rate is over the tokens decoded after it.
    rate = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0
    return first - start, rate, tokens


async def _probe_expert(mesh: MeshClient, probe: ExpertProbe, requests: int) -> None:
    try:
        probe.first_ttft_s, _, probe.completion_tokens = await _timed_request(mesh, probe.expert_id)
        for _ in range(requests):
            ttft, rate, tokens = await _timed_request(mesh, probe.expert_id)
            probe.ttft_s.append(ttft)
            probe.tokens_per_s.append(rate)
            probe.completion_tokens = tokens
    except grpc.RpcError as e:
        probe.error = f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]


def _startable(config: MeshConfig, preflight: dict[str, list[Finding]]) -> tuple[MeshConfig, dict[str, str]]:
    """The config without experts that have preflight errors; their first error by id.

    Kept experts get their port written out, so that they keep the address the full config
    gives them (a default port depends on the expert's index in the file).
    """
    kept, skipped = [], {}
    for i, expert in enumerate(config.experts):
        errors = [f for f in preflight.get(expert.expert_id, []) if f.severity == "error"]
        if errors:
            skipped[expert.expert_id] = f"preflight: {errors[0]}"
        else:
            kept.append(expert.model_copy(update={"port": config.expert_port(i)}))
    return config.model_copy(update={"experts": kept}), skipped


async def probe_mesh(
    config: MeshConfig, config_path: Path, requests: int, log_dir: Path, *, preflight: bool = True
) -> list[ExpertProbe]:
    """Start the mesh, time every startable expert, stop the mesh; one result per configured expert."""
    probes = {e.expert_id: ExpertProbe(e.expert_id, e.load) for e in config.experts}
    startable, skipped = config, dict[str, str]()
    if preflight:
        results = check_mesh(config)
        startable, skipped = _startable(config, results)
        for f in results.get(MESH_KEY, []):
            if f.severity != "info":
                _say(f"preflight {f.severity}: {f}")
    for expert_id, cause in skipped.items():
        probes[expert_id].error = cause
    if not startable.experts:
        return list(probes.values())
    sup = Supervisor(startable, config_path, log_dir, _say)
    await sup.start()
    try:
        await sup.wait_ready(timeout=READY_TIMEOUT_S)
        async with MeshClient(sup.gateway.address, timeout=REQUEST_TIMEOUT_S) as mesh:
            for child in sup.experts:
                probe = probes[child.name]
                probe.ready_after_s = child.ready_after_s
                if sup.gateway.health != "SERVING" or child.health != "SERVING":
                    who = child if child.health != "SERVING" else sup.gateway
                    probe.error = f"{who.name} is {who.health}" + (f" ({who.gave_up})" if who.gave_up else "")
                    continue
                _say(f"{child.name}: probing with {requests} warm request(s)")
                await _probe_expert(mesh, probe, requests)
    finally:
        await sup.stop()
    return list(probes.values())


def _ms(values: list[float], pick: str) -> str:
    if not values:
        return "-"
    value = statistics.median(values) if pick == "median" else max(values)
    return f"{value * 1000:.0f}"


def probe_table(probes: list[ExpertProbe]) -> Table:
    """The probe results as a table."""
    table = Table(title="expertmesh probe", title_justify="left")
    for name in ("expert", "load", "ready s", "first TTFT s", "warm TTFT ms p50", "max", "tok/s", "tokens"):
        table.add_column(name, justify="left" if name in ("expert", "load") else "right")
    table.add_column("status")
    for p in probes:
        table.add_row(
            p.expert_id,
            p.load,
            f"{p.ready_after_s:.1f}" if p.ready_after_s is not None else "-",
            f"{p.first_ttft_s:.2f}" if p.first_ttft_s is not None else "-",
            _ms(p.ttft_s, "median"),
            _ms(p.ttft_s, "max"),
            f"{statistics.median(p.tokens_per_s):.1f}" if p.tokens_per_s else "-",
            str(p.completion_tokens or "-"),
            p.error or "ok",
        )
    return table


def main_probe(config: str | None, requests: int = 5) -> int:
    """``expertmesh probe``: time each expert of the config; 0 when every expert answered."""
    mesh_config, source = load_resolved(config)
    log_dir = Path(tempfile.mkdtemp(prefix="expertmesh-probe-"))
    _say(f"logs in {log_dir}")
    probes = asyncio.run(probe_mesh(mesh_config, source.path, max(requests, 1), log_dir))
    console().print(probe_table(probes))
    print(
        f"ready s: process start to SERVING (an eager expert's load); first TTFT: the first request "
        f"(includes a lazy expert's load); warm: {requests} more request(s) of {MAX_TOKENS} tokens",
        file=sys.stderr,
    )
    return 0 if all(not p.error for p in probes) else 1


__all__ = ["ExpertProbe", "main_probe", "probe_mesh", "probe_table"]
