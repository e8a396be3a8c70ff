"""A small typed client for the gateway (or one expert): streams text pieces, async or sync.

    async with MeshClient("127.0.0.1:8080") as mesh:
        async for piece in mesh.stream_text("def fib(n):", domain="code", max_tokens=32):
            print(piece, end="")

    with SyncMeshClient("127.0.0.1:8080") as mesh:
        print(mesh.complete("Hello", temperature=0).text)

TLS and tokens (see README, "Security")::

    MeshClient("gw.example:8443", cacert="ca.pem", cert="me.pem", key="me.key", token="...")

Every method takes ``timeout=`` (seconds) for that call, else the client's ``timeout``.
Errors arrive as ``grpc.RpcError`` with the gateway's precise code and message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from expertmesh.config import LimitsConfig
from expertmesh.rpc import channel_options
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:8080"
#: Message limits set explicitly, as every expertmesh server's are (the mesh's default limits).
CLIENT_OPTIONS = channel_options(LimitsConfig().max_message_bytes, keepalive=False)
#: The caller's bearer token when none is passed.
TOKEN_ENV = "EXPERTMESH_TOKEN"


@dataclass(frozen=True)
class Security:
    """How a client reaches a TLS gateway and who it says it is (all optional)."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = None
    tls: bool = False

    @property
    def secure(self) -> bool:
        """TLS is on when asked for, or implied by a CA or a client certificate."""
        return self.tls or bool(self.cacert or self.cert)

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files."""
        from expertmesh.tls import client_credentials

        return client_credentials(self.cacert, self.cert, self.key)

    def metadata(self, target: str) -> tuple[tuple[str, str], ...]:
        """``authorization: Bearer <token>`` when there is a token (argument, else EXPERTMESH_TOKEN).

        A token never goes in plaintext beyond this host: anyone on the path could replay it.
        """
        from expertmesh.tls import TlsError, is_loopback

        token = self.token if self.token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            return ()
        host = target.split("///")[-1].rsplit(":", 1)[0].strip("[]")
        if not self.secure and not is_loopback(host):
            raise TlsError(
                f"refusing to send a bearer token in plaintext to {target}: use TLS (--cacert or --tls)"
            )
        return (("authorization", f"Bearer {token}"),)


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

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
        tls: bool = False,
    ) -> None:
        security = Security(cacert, cert, key, token, tls)
        if security.secure:
            self.channel = grpc.aio.secure_channel(target, security.credentials(), CLIENT_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(target, CLIENT_OPTIONS)
        self.gateway = pb_grpc.GatewayStub(self.channel)
        self.timeout = timeout
        self.metadata = security.metadata(target)

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Every streamed GenerateResponse; keyword arguments as :func:`build_request`."""
        call = self.gateway.Generate(
            build_request(prompt, **kwargs), timeout=timeout or self.timeout, metadata=self.metadata
        )
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

    async def list_experts(self, *, timeout: float | None = None) -> pb.ListExpertsResponse:
        """Every expert with its health and state."""
        return await self.gateway.ListExperts(
            pb.ListExpertsRequest(), timeout=timeout or self.timeout, metadata=self.metadata
        )


class SyncMeshClient:
    """Blocking client with the same methods as :class:`MeshClient`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
        tls: bool = False,
    ) -> None:
        security = Security(cacert, cert, key, token, tls)
        if security.secure:
            self.channel = grpc.secure_channel(target, security.credentials(), CLIENT_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(target, CLIENT_OPTIONS)
        self.gateway = pb_grpc.GatewayStub(self.channel)
        self.timeout = timeout
        self.metadata = security.metadata(target)

    def __enter__(self) -> SyncMeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Every streamed GenerateResponse; keyword arguments as :func:`build_request`."""
        call = self.gateway.Generate(
            build_request(prompt, **kwargs), timeout=timeout or self.timeout, metadata=self.metadata
        )
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

    def list_experts(self, *, timeout: float | None = None) -> pb.ListExpertsResponse:
        """Every expert with its health and state."""
        return self.gateway.ListExperts(
            pb.ListExpertsRequest(), timeout=timeout or self.timeout, metadata=self.metadata
        )
