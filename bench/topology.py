"""The shipped topology: a mesh started by ``expertmesh up`` from a config, and a client that is a
separate process with default scheduling, as a user runs them.

The mesh is the config's (default ``configs/demo.yaml``: two experts and the gateway), with
every port made free and every expert's engine settings made the benchmark's own
(:class:`bench.plan.EngineSettings`, the tiny demo model): the same engine as in-process and
vLLM's servers, so that the ratios hold. Load goes to the expert of domain ``general`` straight
(``up_expert``) and through the gateway (``up_gateway``), from a client process
(:mod:`bench.remote`) in a session of its own: with the kernel's autogroup scheduling a session
is a scheduling group, and a program from another terminal runs in one of its own.

Measured only when named with ``--only``: ``up_*_same`` (the client in the benchmark's and
``up``'s session), ``up_*_placed`` (a session of its own, off vLLM's worker cores), and
``alone_expert`` / ``alone_gateway`` (a mesh of that config's general expert alone, client in
a session of its own: what one expert gets where it does not share the host with another).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import yaml

from expertmesh.config import load_config

from .chaos_mesh import HealthMonitor, Mesh, wait_whole
from .context import HOST, Context, Group, Turn
from .load import BenchError
from .plan import EXPERT_DOMAIN
from .procs import READY_TIMEOUT_S, ProcessSampler, free_port
from .remote import Placement, RemoteClient

#: The config ``expertmesh bench`` starts under ``up`` unless told otherwise.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
#: Scenario suffix -> where its client runs (see the module docstring).
PLACEMENTS: dict[str, Placement] = {"": "session", "_same": "same", "_placed": "placed"}


def mesh_data(source: Path, ctx: Context, alone: bool = False) -> dict[str, Any]:
    """``source``'s mesh with free ports and the benchmark's engine settings on every expert.

    ``alone``: only the (first) expert of domain ``general``, and no fallbacks to the others."""
    load_config(source)  # the shipped config must be valid as it stands
    data: dict[str, Any] = yaml.safe_load(source.read_text())
    engine = ctx.settings.expert_config().model_dump(
        mode="json",
        include={
            "model_path",
            "dtype",
            "max_model_len",
            "kv_cache_space_gib",
            "enforce_eager",
            "max_num_seqs",
            "seed",
            "engine_args",
        },
    )
    experts: list[dict[str, Any]] = []
    for expert in data["experts"]:
        if alone and (expert["domain"] != EXPERT_DOMAIN or experts):
            continue
        # A free port (and the next ones for local replicas) per expert; no shipped port is assumed free.
        replicas = int(expert.get("local_replicas", 1))
        experts.append({**expert, **engine, "host": HOST, "port": _free_run(replicas)})
    if not any(e["domain"] == EXPERT_DOMAIN for e in experts):
        raise BenchError(f"{source}: no expert of domain {EXPERT_DOMAIN!r} to measure")
    gateway = {**data.get("gateway", {}), "host": HOST, "port": free_port()}
    if "http_port" in gateway:
        gateway["http_port"] = free_port()
    data.update(experts=experts, gateway=gateway, max_restarts=0)  # a crash is reported, not hidden
    if alone:  # no routing rules for the domains left out
        routing = data.get("routing", {})
        routing.pop("fallbacks", None)
        if "domains" in routing:
            routing["domains"] = {d: r for d, r in routing["domains"].items() if d == EXPERT_DOMAIN}
    return data


def _free_run(count: int) -> int:
    """A free port followed by ``count - 1`` more free ones."""
    from .chaos_mesh import free_port_pair

    return free_port() if count == 1 else free_port_pair()


class UpGroup(Group):
    """Scenarios ``up_expert`` and ``up_gateway`` (and their ``_same`` / ``_placed`` variants)."""

    names: tuple[str, ...] = (
        "up_expert",
        "up_gateway",
        "up_expert_same",
        "up_gateway_same",
        "up_expert_placed",
        "up_gateway_placed",
    )
    prefix = "up"
    alone = False

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.mesh: Mesh | None = None
        self.clients: dict[str, RemoteClient] = {}
        self.expert_addr = ""

    async def start(self) -> None:
        """Start ``up`` and the client processes; ready once the gateway routes to every expert."""
        ctx = self.ctx
        folder = ctx.out / f"{self.prefix}-mesh"
        data = mesh_data(ctx.config or DEFAULT_CONFIG, ctx, self.alone)
        self.mesh = mesh = Mesh(data, folder)
        general = next(e for e in data["experts"] if e["domain"] == EXPERT_DOMAIN)
        self.expert_addr = f"{HOST}:{general['port']}"
        self.expert_id = general["expert_id"]
        ctx.say(f"{self.prefix}: expertmesh up --config {mesh.config_path} (gateway at {mesh.gateway}) ...")
        mesh.start()
        for suffix, placement in PLACEMENTS.items():
            if any(self._wanted(f"{self.prefix}_{hop}{suffix}") for hop in ("expert", "gateway")):
                client = RemoteClient(f"{self.prefix}_client{suffix or '_session'}", placement, ctx.log_dir)
                self.clients[suffix] = client
                await client.start_client()
        monitor = HealthMonitor(mesh.addresses())
        watch = asyncio.create_task(monitor.run())
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await wait_whole(mesh, monitor, READY_TIMEOUT_S)
            ctx.started(f"{self.prefix}_expert", loop.time() - started)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    def _wanted(self, name: str) -> bool:
        return name in self.names and self.ctx.wants(name)

    def _roots(self) -> dict[str, int]:
        assert self.mesh is not None
        roots = {"gateway": self.mesh.gateway_pid(), "expert": self.mesh.expert_pid(self.expert_id)}
        for e in self.mesh.data["experts"]:
            if e["expert_id"] != self.expert_id:
                roots[e["expert_id"]] = self.mesh.expert_pid(e["expert_id"])
        return roots

    async def turns(self, stack: contextlib.AsyncExitStack) -> list[Turn]:
        """One turn per wanted scenario; every client is warmed up on both hops."""
        assert self.mesh is not None
        plan = self.ctx.plan
        hops = {"expert": self.expert_addr, "gateway": self.mesh.gateway}
        roots = self._roots()
        turns = []
        for suffix, client in self.clients.items():
            for hop, target in hops.items():
                name = f"{self.prefix}_{hop}{suffix}"
                if not self._wanted(name):
                    continue
                n = plan.warmup_requests
                await client.run(
                    target,
                    hop,
                    EXPERT_DOMAIN,
                    list(plan.prompts),
                    min(n, 32),
                    n,
                    plan.warmup_max_tokens,
                    plan.temperature,
                )
                trial = self._trial(name, client, target, hop, {**roots, "client": client.pid})
                turns.append(Turn(name, trial))
        return turns

    def _trial(self, name: str, client: RemoteClient, target: str, hop: str, roots: dict[str, int]) -> Any:
        ctx, plan = self.ctx, self.ctx.plan

        async def trial(concurrency: int) -> None:
            await ctx.settle(name, concurrency)
            with ProcessSampler(roots) as sampler:
                result, waited = await client.run(
                    target,
                    hop,
                    EXPERT_DOMAIN,
                    list(plan.prompts),
                    concurrency,
                    plan.requests[concurrency],
                    plan.max_tokens,
                    plan.temperature,
                )
            ctx.record(name, result, sampler)
            # How long the client sat runnable without a CPU: the scheduler's share of the result.
            waits = ctx.results.details[name].setdefault("runs", {}).setdefault(str(concurrency), {})
            waits.setdefault("client_runqueue_wait_s", []).append(round(waited, 3))

        return trial

    async def stop(self) -> None:
        """Stop the clients, then the mesh (``up`` stops its children in order)."""
        for client in self.clients.values():
            await client.stop()
        if self.mesh is not None:
            await asyncio.to_thread(self.mesh.stop)


class AloneGroup(UpGroup):
    """Scenarios ``alone_expert`` and ``alone_gateway``: the config's general expert alone under ``up``."""

    names = ("alone_expert", "alone_gateway")
    prefix = "alone"
    alone = True
