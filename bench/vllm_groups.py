"""The scenario groups of vLLM's own servers, started on the same engine settings as the expert:
``vllm_grpc`` (vLLM's gRPC server, ``vllm.grpc.engine.VllmEngine``) and ``vllm_openai`` (its
OpenAI-compatible HTTP server, streaming)."""

from __future__ import annotations

import contextlib

import grpc

from .clients import vllm_grpc_client
from .context import HOST, Context, Group, Turn
from .procs import Server, free_port


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
        assert self.server is not None
        ctx = self.ctx
        roots = {"vllm_openai": self.server.pid}
        return [await ctx.openai_turn(stack, "vllm_openai", self.base, ctx.settings.model, roots)]
