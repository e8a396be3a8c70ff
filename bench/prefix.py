"""Scenarios ``affinity_prefix`` and ``affinity_none``: prefix-aware replica choice against least
outstanding requests, on two local replicas of one expert (measured only when named).

One ``up`` mesh: an expert with ``local_replicas: 2`` (the benchmark's engine, ``max_model_len``
2048) behind a gateway with ``routing.affinity: prefix``, and a second gateway on the same
replicas with ``routing.affinity: none``. Every request carries a shared system prompt of about
1 500 tokens and a question of its own; each trial has a system prompt of its own (the trial's
number leads it), so that no trial finds the previous trial's prefix cached and both gateways
start every trial from the same state. 8 streams, from the separate client process
(:mod:`bench.remote`), as in the shipped topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from expertmesh.config import MeshConfig

from .chaos_mesh import HealthMonitor, Mesh, free_port_pair, wait_whole
from .context import HOST, Context, Group, Turn
from .procs import READY_TIMEOUT_S, ProcessSampler, Server, free_port
from .remote import RemoteClient

STREAMS = 8
REQUESTS = 64
_RULE = (
    "Rule {k}: you are the operations assistant of the platform team; answer each question about "
    "the deployment runbook briefly and precisely, and cite the step. "
)
#: About 1 500 tokens of the demo tokenizer (54 per rule).
SYSTEM_RULES = 28


def system_prompt(trial: int) -> str:
    """The shared system prompt of one trial (its number first: a prefix no other trial has)."""
    return f"Trial {trial}. " + "".join(_RULE.format(k=k) for k in range(SYSTEM_RULES))


def prompts(trial: int, count: int = REQUESTS) -> list[str]:
    """One trial's prompts: the shared system prompt, then a question of their own."""
    head = system_prompt(trial)
    return [f"{head}\nQuestion {i}: what does step {i} of the runbook do?" for i in range(count)]


class PrefixGroup(Group):
    """Both gateways over the same two replicas; the client alternates between them, trial by trial."""

    names = ("affinity_prefix", "affinity_none")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.mesh: Mesh | None = None
        self.plain: Server | None = None
        self.client = RemoteClient("affinity_client", "session", ctx.log_dir)
        self.trials = 0

    def _data(self) -> dict[str, Any]:
        expert = self.ctx.settings.expert_config(expert_id="prefix").model_dump(
            mode="json", exclude_none=True
        )
        expert.update(host=HOST, port=free_port_pair(), local_replicas=2, max_model_len=2048)
        return {
            "gateway": {"host": HOST, "port": free_port()},
            "grace_period_s": 5,
            "max_restarts": 0,
            "routing": {"affinity": "prefix"},
            "experts": [expert],
        }

    async def start(self) -> None:
        """Start ``up`` (affinity on), the second gateway (affinity off) and the client."""
        ctx = self.ctx
        data = self._data()
        self.mesh = mesh = Mesh(data, ctx.out / "affinity-mesh")
        plain = {**data, "routing": {"affinity": "none"}, "gateway": {"host": HOST, "port": free_port()}}
        path = ctx.out / "affinity-none.json"
        path.write_text(
            json.dumps(MeshConfig.model_validate(plain).model_dump(mode="json", exclude_none=True))
        )
        self.plain_addr = f"{HOST}:{plain['gateway']['port']}"
        ctx.say(f"affinity: expertmesh up --config {mesh.config_path}; without affinity: {self.plain_addr}")
        mesh.start()
        self.plain = Server.python_module(
            "gateway_none", "expertmesh.gateway", ["--config", str(path)], ctx.log_dir
        )
        self.plain.start()
        await self.client.start_client()
        replicas = MeshConfig.model_validate(data).local_addresses(0)
        monitor = HealthMonitor(
            {"gateway": mesh.gateway, **{f"replica{i}": a for i, a in enumerate(replicas)}}
        )
        watch = asyncio.create_task(monitor.run())
        try:
            await wait_whole(mesh, monitor, READY_TIMEOUT_S)
            ctx.started("affinity_prefix", await self.plain.wait_grpc_health(self.plain_addr))
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def turns(self, stack: contextlib.AsyncExitStack) -> list[Turn]:
        """Warm both gateways up, then one turn each."""
        assert self.mesh is not None and self.plain is not None
        plan = self.ctx.plan
        roots = {
            "gateway": self.mesh.gateway_pid(),
            "gateway_none": self.plain.pid,
            "client": self.client.pid,
        }
        roots.update({f"replica{r}": self.mesh.child_pid(f"--replica {r}") for r in range(2)})
        targets = {"affinity_prefix": self.mesh.gateway, "affinity_none": self.plain_addr}
        for target in targets.values():
            warm = prompts(-1, plan.warmup_requests)
            await self.client.run(
                target, "gateway", "general", warm, STREAMS, len(warm), plan.warmup_max_tokens, 0.0
            )
        return [
            Turn(name, self._trial(name, target, roots))
            for name, target in targets.items()
            if self.ctx.wants(name)
        ]

    def _trial(self, name: str, target: str, roots: dict[str, int]) -> Callable[[int], Awaitable[None]]:
        ctx, plan = self.ctx, self.ctx.plan

        async def trial(concurrency: int) -> None:
            if concurrency != STREAMS:  # the scenario is 8 streams; other levels are left out
                return
            self.trials += 1
            await ctx.settle(name, STREAMS)
            with ProcessSampler(roots) as sampler:
                result, _ = await self.client.run(
                    target,
                    "gateway",
                    "general",
                    prompts(self.trials),
                    STREAMS,
                    REQUESTS,
                    plan.max_tokens,
                    0.0,
                )
            ctx.record(name, result, sampler)

        return trial

    async def stop(self) -> None:
        """Stop the client, the second gateway and the mesh."""
        await self.client.stop()
        if self.plain is not None:
            await self.plain.stop()
        if self.mesh is not None:
            await asyncio.to_thread(self.mesh.stop)
