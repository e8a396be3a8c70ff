"""The scenario groups of our own servers, beside AsyncLLM in-process as the limit.

- :class:`MeshGroup`: ``inprocess`` (AsyncLLM in a child process, :mod:`bench.inprocess`) and one
  expert process with the same engine settings (``expert``), with the gateway (``gateway``, and
  ``gateway_openai``: the same gateway over its OpenAI-compatible HTTP front, with the client and
  load of ``vllm_openai``) and a bare relay (``relay``, :mod:`bench.relay`) in front of it;
- :class:`SecureGroup`: ``gateway_tls``, the same as ``gateway`` with security on, on an expert
  process of its own: TLS and a bearer token from the client, mTLS between gateway and expert.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json

import grpc

from expertmesh.config import GatewayConfig, MeshConfig
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .context import HOST, Context, Group, Turn
from .inprocess import InProcessRunner
from .plan import EXPERT_DOMAIN, EXPERT_ID
from .procs import ProcessSampler, Server, free_port


def mesh_servers(ctx: Context, config: MeshConfig, suffix: str = "") -> tuple[Server, Server]:
    """Write ``config`` (one expert) under the output folder; its expert and gateway processes.

    ``suffix`` tells a second mesh's file and logs apart (``_tls``: ``mesh-tls.json``,
    ``expert_tls``, ``gateway_tls``). The processes are made, not started."""
    path = ctx.out / f"mesh{suffix.replace('_', '-')}.json"
    path.write_text(json.dumps(config.model_dump(mode="json", exclude_none=True), indent=2))
    args = ["--config", str(path)]
    expert = Server.python_module(
        f"expert{suffix}",
        "expertmesh.services.expert",
        [*args, "--expert-id", EXPERT_ID, "--port", str(config.expert_port(0))],
        ctx.log_dir,
        env=ctx.settings.env(),
    )
    gateway = Server.python_module(
        f"gateway{suffix}", "expertmesh.gateway", [*args, "--port", str(config.gateway.port)], ctx.log_dir
    )
    return expert, gateway


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
        self.expert_addr = config.expert_address(0)
        self.gateway_addr = f"{HOST}:{config.gateway.port}"
        self.gateway_http = f"http://{HOST}:{config.gateway.http_port}"
        expert_server, gateway_server = mesh_servers(ctx, config)
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
        ctx = self.ctx
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
        for name, address, stub, roots in hops:
            if not ctx.wants(name):
                continue
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            turns.append(await ctx.mesh_turn(name, stub(channel).Generate, roots))
        if ctx.wants("gateway_openai"):
            # The gateway's HTTP front with the client and load of vllm_openai (model: the domain).
            roots = {"gateway": self.gateway.pid, "expert": expert_pid}
            turn = await ctx.openai_turn(stack, "gateway_openai", self.gateway_http, EXPERT_DOMAIN, roots)
            turns.append(turn)
        return turns

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
        self.expert_addr = config.expert_address(0)
        self.gateway_addr = f"{HOST}:{config.gateway.port}"
        expert_server, gateway_server = mesh_servers(ctx, config, "_tls")
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
        assert self.expert is not None and self.gateway is not None and self.credentials is not None
        channel = await stack.enter_async_context(
            grpc.aio.secure_channel(self.gateway_addr, self.credentials)
        )
        generate = functools.partial(
            pb_grpc.GatewayStub(channel).Generate, metadata=(("authorization", f"Bearer {self.TOKEN}"),)
        )
        roots = {"gateway": self.gateway.pid, "expert": self.expert.pid}
        return [await self.ctx.mesh_turn("gateway_tls", generate, roots)]

    async def stop(self) -> None:
        """Stop the gateway, then the expert."""
        for server in (self.gateway, self.expert):
            if server is not None:
                await server.stop()
