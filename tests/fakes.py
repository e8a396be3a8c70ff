"""The fake experts of the gateway's unit tests (in-process gRPC servers), in one place.

Fakes are used only for the gateway's own decisions; the real-engine behaviour is proven by the
engine tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from expertmesh.contract import ENGINE_SERVICE, EXPERT_SERVICE
from expertmesh.muxserve import Multiplexed
from expertmesh.rpc import Health, bind
from expertmesh.telemetry import expert_generate
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .support import free_port


class FakeExpert(Multiplexed, pb_grpc.ExpertServicer):
    """Streams ``pieces`` or fails with ``fail`` (before or after ``fail_after`` pieces)."""

    def __init__(self, expert_id: str) -> None:
        self.expert_id = expert_id
        self.fail: grpc.StatusCode | None = None
        self.fail_after = 0
        self.fail_trailers: tuple[tuple[str, str], ...] = ()
        self.resumes: list[pb.Resume] = []
        self.calls = 0
        self.cancelled = 0
        self.hold = asyncio.Event()
        self.hold.set()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.calls += 1
        if request.prompt == "empty":  # an answer of no message at all, ending OK
            return
        if request.prompt == "flood":  # far more than a caller's HTTP/2 window holds
            for i in range(20_000):
                yield pb.GenerateResponse(text="f" * 1024, token_ids=[i], expert_id=self.expert_id)
            return
        try:
            await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.resumes.append(request.resume)
        for i in range(request.resume.completion_tokens, 3):  # a continuation goes on from there
            if self.fail is not None and i == self.fail_after:
                if self.fail_trailers:
                    context.set_trailing_metadata(self.fail_trailers)
                await context.abort(self.fail, f"{self.expert_id} says no")
            if i == 1 and request.prompt == "hold-after-first":
                await asyncio.Event().wait()
            yield pb.GenerateResponse(text=f"{self.expert_id}-{i} ", token_ids=[i], expert_id=self.expert_id)
        yield pb.GenerateResponse(expert_id=self.expert_id, finish_reason="stop")

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(expert_id=self.expert_id, state=pb.EXPERT_STATE_READY)


class FakeServer:
    """A :class:`FakeExpert` served on a free port, SERVING (engine loaded) once started."""

    def __init__(self, expert_id: str) -> None:
        self.expert = FakeExpert(expert_id)
        self.port = free_port()
        self.server: grpc.aio.Server | None = None
        self.health: Health | None = None

    async def start(self) -> None:
        self.server, _, self.health = await serve_fake(self.expert, self.port)

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(0)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class TracedFakeExpert(Multiplexed, pb_grpc.ExpertServicer):
    """Streams three tokens (or fails first with ``fail``), traced like the real expert."""

    def __init__(self, expert_id: str, fail: grpc.StatusCode | None = None) -> None:
        self.expert_id = expert_id
        self.fail = fail
        self.metadata: list[dict[str, Any]] = []

    @expert_generate
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if self.fail is not None:
            await context.abort(self.fail, f"{self.expert_id} cannot take it")
        for i in range(3):
            yield pb.GenerateResponse(text=f"t{i}", token_ids=[i], expert_id=self.expert_id)
        yield pb.GenerateResponse(
            expert_id=self.expert_id,
            finish_reason="length",
            usage=pb.Usage(prompt_tokens=2, completion_tokens=3),
        )


async def serve_fake(expert: pb_grpc.ExpertServicer, port: int = 0) -> tuple[grpc.aio.Server, int, Health]:
    """Serve ``expert`` on 127.0.0.1 (``port`` 0: any free one), SERVING with its engine loaded,
    as a real expert's health reports it; returns the server, its port and its health."""
    server = grpc.aio.server()
    pb_grpc.add_ExpertServicer_to_server(expert, server)
    health = Health(server, [EXPERT_SERVICE, ENGINE_SERVICE])
    await health.set(True)
    bound = bind(server, "127.0.0.1", port)
    await server.start()
    return server, bound, health
