"""A small typed client for the gateway (or one expert): streams text pieces, async or sync.

    async with MeshClient("127.0.0.1:8080") as mesh:
        async for piece in mesh.stream_text("def fib(n):", domain="code", max_tokens=32):
            print(piece, end="")

    with SyncMeshClient("127.0.0.1:8080") as mesh:
        print(mesh.complete("Hello", temperature=0).text)

Errors arrive as ``grpc.RpcError`` with the gateway's precise code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:8080"


@dataclass
class Completion:
    """A whole answer, assembled from the stream."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    expert_id: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, msg: pb.GenerateResponse) -> None:
        """Append one streamed chunk."""
        self.text += msg.text
        self.token_ids.extend(msg.token_ids)
        self.expert_id = msg.expert_id or self.expert_id
        if msg.finish_reason:
            self.finish_reason = msg.finish_reason
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = msg.usage.completion_tokens


def build_request(
    prompt: str | None = None,
    *,
    messages: Iterable[tuple[str, str] | dict[str, str]] | None = None,
    domain: str = "",
    expert_id: str = "",
    request_id: str = "",
    **sampling: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest; ``sampling`` takes SamplingParams fields (max_tokens, temperature, ...)."""
    turns = []
    for m in messages or ():
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        turns.append(pb.Message(role=role, content=content))
    stop = sampling.pop("stop", None)
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    if stop:
        params.stop.extend([stop] if isinstance(stop, str) else stop)
    return pb.GenerateRequest(
        prompt=prompt or "",
        messages=turns,
        domain=domain,
        expert_id=expert_id,
        request_id=request_id,
        sampling=params,
    )


class MeshClient:
    """asyncio client. One channel, reused for every call; close it (or use ``async with``)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.gateway = pb_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[pb.GenerateResponse]:
        """Every streamed GenerateResponse; keyword arguments as :func:`build_request`."""
        call = self.gateway.Generate(build_request(prompt, **kwargs), timeout=self.timeout)
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()  # stopping early cancels the request all the way to the engine

    async def stream_text(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[str]:
        """Only the new text of each streamed message."""
        async for msg in self.stream(prompt, **kwargs):
            if msg.text:
                yield msg.text

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """The whole answer."""
        result = Completion()
        async for msg in self.stream(prompt, **kwargs):
            result.add(msg)
        return result

    async def list_experts(self) -> pb.ListExpertsResponse:
        """Every expert with its health and state."""
        return await self.gateway.ListExperts(pb.ListExpertsRequest(), timeout=self.timeout)


class SyncMeshClient:
    """Blocking client with the same methods as :class:`MeshClient`."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self.gateway = pb_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> SyncMeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[pb.GenerateResponse]:
        """Every streamed GenerateResponse; keyword arguments as :func:`build_request`."""
        call = self.gateway.Generate(build_request(prompt, **kwargs), timeout=self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def stream_text(self, prompt: str | None = None, **kwargs: Any) -> Iterator[str]:
        """Only the new text of each streamed message."""
        for msg in self.stream(prompt, **kwargs):
            if msg.text:
                yield msg.text

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """The whole answer."""
        result = Completion()
        for msg in self.stream(prompt, **kwargs):
            result.add(msg)
        return result

    def list_experts(self) -> pb.ListExpertsResponse:
        """Every expert with its health and state."""
        return self.gateway.ListExperts(pb.ListExpertsRequest(), timeout=self.timeout)
