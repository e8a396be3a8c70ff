"""The scenario groups: each starts its servers, hands out one turn per scenario, and stops.

- ``inprocess``, ``expert``, ``gateway`` and ``relay``: AsyncLLM in a child process
  (:mod:`bench.inprocess`) and one expert process with the same engine settings, with the
  gateway and a bare relay (:mod:`bench.relay`) in front of the expert;
- ``gateway_openai``: the same gateway over its OpenAI-compatible HTTP front, with the client
  and load of ``vllm_openai``;
- ``gateway_tls``: the same as ``gateway`` with security on, on an expert process of its own:
  TLS and a bearer token from the client, mTLS between gateway and expert (:class:`SecureGroup`);
- ``vllm_grpc``: vLLM's gRPC server (``vllm.grpc.engine.VllmEngine``);
- ``vllm_openai``: vLLM's OpenAI-compatible HTTP server, streaming.

A turn is one trial of one scenario at one concurrency level. A full run starts every group and
measures every trial at every level in every scenario in turn (:mod:`bench.runner`), so that
the ratios the targets are stated in come from trials seconds apart: the speed of a shared
machine drifts by tens of percent over minutes, and an idle vLLM engine uses about 0.01
cores. A quick run measures one group after the other and starts the next group's engine
while one is measured (never more than three engines), which halves its wall time at the cost
of noisier numbers. Every scenario gets the same untimed warm-up before it is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from expertmesh import cpus
from expertmesh.config import GatewayConfig, MeshConfig
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .clients import mesh_client, mesh_requests, openai_client, vllm_grpc_client
from .inprocess import InProcessRunner
from .load import LoadResult, OneRequest, run_load
from .plan import EXPERT_DOMAIN, EXPERT_ID, EXTRA_SCENARIOS, EngineSettings, LoadPlan
from .procs import QUIET_CORES, ProcessSampler, Server, free_port, wait_for_quiet

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


class MeshGroup(Group):
    """Scenarios ``inprocess``, ``expert``, ``gateway``, ``gateway_openai`` and ``relay``: two
    engines, two hops; ``gateway_openai`` is the same gateway process over its HTTP front."""

    names = ("inprocess", "expert", "gateway", "gateway_openai", "relay")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.runner = InProcessRunner(ctx.settings, ctx.log_dir)
        self.expert: Server | None = None
        self.gateway: Server | None = None
        self.relay: Server | None = None
        self.expert_addr = self.gateway_addr = self.relay_addr = self.gateway_http = ""

    def _servers(self) -> tuple[Server, Server, Server]:
        """A one-expert mesh config on free ports, and the three processes that serve it."""
        ctx = self.ctx
        expert = ctx.settings.expert_config().model_copy(update={"host": HOST, "port": free_port()})
        config = MeshConfig(
            experts=[expert],
            gateway=GatewayConfig(host=HOST, port=free_port(), http_port=free_port()),
            grace_period_s=5,
            max_restarts=0,
        )
        path = ctx.out / "mesh.json"
        path.write_text(json.dumps(config.model_dump(mode="json", exclude_none=True), indent=2))
        self.expert_addr = config.expert_address(0)
        self.gateway_addr = f"{HOST}:{config.gateway.port}"
        self.gateway_http = f"http://{HOST}:{config.gateway.http_port}"
        args = ["--config", str(path)]
        expert_server = Server.python_module(
            "expert",
            "expertmesh.services.expert",
            [*args, "--expert-id", EXPERT_ID, "--port", str(config.expert_port(0))],
            ctx.log_dir,
            env=ctx.settings.env(),
        )
        gateway_server = Server.python_module(
            "gateway", "expertmesh.gateway", [*args, "--port", str(config.gateway.port)], ctx.log_dir
        )
        relay_port = free_port()
        self.relay_addr = f"{HOST}:{relay_port}"
        relay_server = Server.python_module(
            "relay",
            "expertmesh.bench.relay",
            ["--target", self.expert_addr, "--host", HOST, "--port", str(relay_port)],
            ctx.log_dir,
        )
        return expert_server, gateway_server, relay_server

    @property
    def _mesh_wanted(self) -> bool:
        return any(self.ctx.wants(n) for n in self.names if n != "inprocess")

    async def start(self) -> None:
        """Start everything together; the gateway is ready once it sees the expert."""
        if not self.ctx.wants("inprocess"):  # one engine fewer
            await self._start_mesh()
            return
        if not self._mesh_wanted:  # in-process alone (beside the shipped topology, say)
            self.ctx.say("inprocess: starting AsyncLLM in a child process ...")
            self.ctx.started("inprocess", await self.runner.start())
            return
        self.ctx.say("inprocess: starting AsyncLLM in a child process ...")
        async with asyncio.TaskGroup() as tasks:  # one failure cancels the other start
            inprocess = tasks.create_task(self.runner.start())
            tasks.create_task(self._start_mesh())
        self.ctx.started("inprocess", inprocess.result())

    async def _start_mesh(self) -> None:
        self.expert, self.gateway, self.relay = servers = self._servers()
        self.ctx.say(
            f"expert: starting at {self.expert_addr}, gateway at {self.gateway_addr}, "
            f"relay at {self.relay_addr} ..."
        )
        for server in servers:
            server.start()
        self.ctx.started("expert", await self.expert.wait_grpc_health(self.expert_addr))
        self.ctx.started("gateway", await self.gateway.wait_grpc_health(self.gateway_addr))
        self.ctx.started("relay", await self.relay.wait_grpc_health(self.relay_addr))

    async def _inprocess_warm_up(self) -> None:
        plan = self.ctx.plan
        n = plan.warmup_requests
        await self.runner.run(list(plan.prompts), min(n, 32), n, plan.warmup_max_tokens, plan.temperature)

    async def _inprocess_trial(self, concurrency: int) -> None:
        """One in-process trial: the load runs inside the engine's own process, sampled from here."""
        ctx, plan = self.ctx, self.ctx.plan
        roots = {"inprocess": self.runner.pid}
        await ctx.settle("inprocess", concurrency)
        with ProcessSampler(roots) as sampler:
            result = await self.runner.run(
                list(plan.prompts), concurrency, plan.requests[concurrency], plan.max_tokens, plan.temperature
            )
        ctx.record("inprocess", result, sampler)

    async def turns(self, stack: contextlib.AsyncExitStack) -> list[Turn]:
        """In-process, then one channel per hop, shared by all its streams."""
        ctx, plan = self.ctx, self.ctx.plan
        turns = []
        if ctx.wants("inprocess"):
            await self._inprocess_warm_up()
            turns.append(Turn("inprocess", self._inprocess_trial))
        if not self._mesh_wanted:
            return turns
        assert self.expert is not None and self.gateway is not None and self.relay is not None
        expert_pid = self.expert.pid
        hops = (  # scenario, address, stub, the processes it runs on
            ("expert", self.expert_addr, pb_grpc.ExpertStub, {"expert": expert_pid}),
            (
                "gateway",
                self.gateway_addr,
                pb_grpc.GatewayStub,
                {"gateway": self.gateway.pid, "expert": expert_pid},
            ),
            ("relay", self.relay_addr, pb_grpc.GatewayStub, {"relay": self.relay.pid, "expert": expert_pid}),
        )
        requests = mesh_requests(plan, plan.max_tokens)
        for name, address, stub, roots in hops:
            if not ctx.wants(name):
                continue
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            generate = stub(channel).Generate
            await ctx.warm_up(mesh_client(generate, mesh_requests(plan, plan.warmup_max_tokens)))
            turns.append(ctx.turn(name, mesh_client(generate, requests), roots))
        if ctx.wants("gateway_openai"):
            turns.append(await self._openai_turn(stack, {"gateway": self.gateway.pid, "expert": expert_pid}))
        return turns

    async def _openai_turn(self, stack: contextlib.AsyncExitStack, roots: dict[str, int]) -> Turn:
        """The gateway's HTTP front with the client and load of ``vllm_openai`` (model: the domain)."""
        import aiohttp

        ctx, plan = self.ctx, self.ctx.plan
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            )
        )
        await ctx.warm_up(
            openai_client(session, self.gateway_http, EXPERT_DOMAIN, plan, plan.warmup_max_tokens)
        )
        one = openai_client(session, self.gateway_http, EXPERT_DOMAIN, plan, plan.max_tokens)
        return ctx.turn("gateway_openai", one, roots)

    async def stop(self) -> None:
        """Stop the relay and the gateway, then the expert, and the in-process engine."""
        for server in (self.relay, self.gateway, self.expert):
            if server is not None:
                await server.stop()
        await self.runner.stop()


class SecureGroup(Group):
    """Scenario ``gateway_tls``: client -TLS + token-> gateway -mTLS-> an expert of its own.

    The same engine settings, load and client as ``gateway``; only security differs, so the two
    (measured in turns in a full run) give what TLS on both hops and token auth cost.
    """

    names = ("gateway_tls",)
    TOKEN = "bench-" + "t" * 26

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.expert: Server | None = None
        self.gateway: Server | None = None
        self.expert_addr = self.gateway_addr = ""
        self.credentials: grpc.ChannelCredentials | None = None

    def _servers(self) -> tuple[Server, Server, grpc.ChannelCredentials, grpc.ChannelCredentials]:
        from expertmesh.tls import client_credentials

        from .pki import CA

        ctx = self.ctx
        folder = ctx.out / "pki"
        folder.mkdir(parents=True, exist_ok=True)
        ca = CA(folder, "bench")
        gateway_cert, link_cert, expert_cert = ca.issue("gateway"), ca.issue("link"), ca.issue("expert")
        tokens = folder / "tokens"
        tokens.write_text(f"{self.TOKEN}\n")
        expert = ctx.settings.expert_config().model_copy(update={"host": HOST, "port": free_port()})
        config = MeshConfig.model_validate(
            {
                "experts": [
                    {**expert.model_dump(mode="json", exclude_none=True), "internal_cert": expert_cert.pair()}
                ],
                "gateway": {"host": HOST, "port": free_port(), "tls": gateway_cert.pair()},
                "internal_tls": {"ca_file": str(ca.file), **link_cert.pair()},
                "auth": {"tokens_file": str(tokens)},
                "grace_period_s": 5,
                "max_restarts": 0,
            }
        )
        path = ctx.out / "mesh-tls.json"
        path.write_text(json.dumps(config.model_dump(mode="json", exclude_none=True), indent=2))
        self.expert_addr = config.expert_address(0)
        self.gateway_addr = f"{HOST}:{config.gateway.port}"
        args = ["--config", str(path)]
        expert_server = Server.python_module(
            "expert_tls",
            "expertmesh.services.expert",
            [*args, "--expert-id", EXPERT_ID, "--port", str(config.expert_port(0))],
            ctx.log_dir,
            env=ctx.settings.env(),
        )
        gateway_server = Server.python_module(
            "gateway_tls", "expertmesh.gateway", [*args, "--port", str(config.gateway.port)], ctx.log_dir
        )
        caller = client_credentials(str(ca.file))
        link = client_credentials(str(ca.file), str(link_cert.cert_file), str(link_cert.key_file))
        return expert_server, gateway_server, caller, link

    async def start(self) -> None:
        """Start the expert and the gateway; the gateway is ready once it sees the expert."""
        self.expert, self.gateway, self.credentials, link = self._servers()
        self.ctx.say(f"gateway_tls: starting at {self.gateway_addr}, expert_tls at {self.expert_addr} ...")
        self.expert.start()
        self.gateway.start()
        await self.expert.wait_grpc_health(self.expert_addr, credentials=link)
        self.ctx.started(
            "gateway_tls",
            await self.gateway.wait_grpc_health(self.gateway_addr, credentials=self.credentials),
        )

    async def turns(self, stack: contextlib.AsyncExitStack) -> list[Turn]:
        """One TLS channel shared by every stream; every call carries the token."""
        ctx, plan = self.ctx, self.ctx.plan
        assert self.expert is not None and self.gateway is not None and self.credentials is not None
        channel = await stack.enter_async_context(
            grpc.aio.secure_channel(self.gateway_addr, self.credentials)
        )
        generate = functools.partial(
            pb_grpc.GatewayStub(channel).Generate, metadata=(("authorization", f"Bearer {self.TOKEN}"),)
        )
        await ctx.warm_up(mesh_client(generate, mesh_requests(plan, plan.warmup_max_tokens)))
        roots = {"gateway": self.gateway.pid, "expert": self.expert.pid}
        return [ctx.turn("gateway_tls", mesh_client(generate, mesh_requests(plan, plan.max_tokens)), roots)]

    async def stop(self) -> None:
        """Stop the gateway, then the expert."""
        for server in (self.gateway, self.expert):
            if server is not None:
                await server.stop()


class VllmServerGroup(Group):
    """One of vLLM's own servers, started on the same engine settings as the expert."""

    module = ""
    extra_args: tuple[str, ...] = ()

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.server: Server | None = None
        self.port = 0

    async def _launch(self) -> Server:
        """Start the server process (readiness is each server's own check)."""
        name = self.names[0]
        self.port = free_port()
        self.server = server = Server.python_module(
            name,
            self.module,
            ["--host", HOST, "--port", str(self.port), *self.ctx.settings.vllm_cli_args(), *self.extra_args],
            self.ctx.log_dir,
            env=self.ctx.settings.env(),
        )
        self.ctx.say(f"{name}: starting at {HOST}:{self.port} ...")
        server.start()
        return server

    async def stop(self) -> None:
        """Stop the server and its engine."""
        if self.server is not None:
            await self.server.stop()


class VllmGrpcGroup(VllmServerGroup):
    """Scenario ``vllm_grpc``: vLLM's own gRPC server (smg-grpc-servicer), token ids only."""

    names = ("vllm_grpc",)
    module = "vllm.entrypoints.launchers.grpc_server"

    async def start(self) -> None:
        """Start the server; it turns SERVING after its own planned warm-up."""
        import smg_grpc_proto  # noqa: F401  (fail before starting an engine when it is missing)

        server = await self._launch()
        self.ctx.started("vllm_grpc", await server.wait_grpc_health(f"{HOST}:{self.port}"))

    async def turns(self, stack: contextlib.AsyncExitStack) -> list[Turn]:
        """One channel shared by every stream."""
        from smg_grpc_proto import vllm_engine_pb2_grpc as vpb_grpc

        ctx, plan = self.ctx, self.ctx.plan
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"{HOST}:{self.port}"))
        stub = vpb_grpc.VllmEngineStub(channel)
        await ctx.warm_up(vllm_grpc_client(stub, plan, plan.warmup_max_tokens))
        assert self.server is not None
        roots = {"vllm_grpc": self.server.pid}

        async def trial(concurrency: int) -> None:
            # A new client per trial: its engine request ids are new too (they must be unique).
            await ctx.measure("vllm_grpc", vllm_grpc_client(stub, plan, plan.max_tokens), roots, concurrency)

        return [Turn("vllm_grpc", trial)]


class VllmOpenAIGroup(VllmServerGroup):
    """Scenario ``vllm_openai``: vLLM's OpenAI-compatible server, streaming completions."""

    names = ("vllm_openai",)
    module = "vllm.entrypoints.openai.api_server"
    extra_args = ("--disable-uvicorn-access-log",)

    @property
    def base(self) -> str:
        """The server's base URL."""
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        """Start the server and wait for ``/health``."""
        server = await self._launch()
        self.ctx.started("vllm_openai", await server.wait_http_health(f"{self.base}/health"))

    async def turns(self, stack: contextlib.AsyncExitStack) -> list[Turn]:
        """One aiohttp session (keep-alive connections, no limit) shared by every stream."""
        import aiohttp

        ctx, plan, model = self.ctx, self.ctx.plan, self.ctx.settings.model
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            )
        )
        await ctx.warm_up(openai_client(session, self.base, model, plan, plan.warmup_max_tokens))
        one = openai_client(session, self.base, model, plan, plan.max_tokens)
        assert self.server is not None
        return [ctx.turn("vllm_openai", one, {"vllm_openai": self.server.pid})]
