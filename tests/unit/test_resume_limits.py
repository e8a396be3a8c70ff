"""Where resuming a stream stops, against fake experts: ``routing.max_resumes``, the caller's
deadline, the caller's cancel, and a domain's own ``resume`` over the mesh's.

The resume itself (token-exact, on real engines) is proven in tests/integration/test_resume.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from expertmesh.client import MeshClient
from expertmesh.config import RoutingConfig
from expertmesh.gateway import resume
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..fakes import FakeServer
from .test_gateway_logic import gateway, wait_listed


def _three_replicas() -> list[FakeServer]:
    """Replicas of one expert, tried in this order: the first fails after one token, the second
    (resuming after it) after one more, the third does not fail."""
    replicas = [FakeServer("code") for _ in range(3)]
    for server, after in zip(replicas[:2], (1, 2), strict=True):
        server.expert.fail, server.expert.fail_after = grpc.StatusCode.UNAVAILABLE, after
    return replicas


async def test_a_stream_resumes_up_to_max_resumes_times(tmp_path: Path) -> None:
    first, second, third = _three_replicas()
    replicas = {"code": [first, second, third]}
    async with gateway(tmp_path, replicas) as (address, _), MeshClient(address, timeout=10) as client:
        messages = [m async for m in client.stream("x", domain="code")]  # max_resumes: 2, the default
    assert "".join(m.text for m in messages) == "code-0 code-1 code-2 "
    seams = [m for m in messages if m.route.seams][-1].route.seams
    assert [(s.address, s.tokens_streamed) for s in seams] == [(first.address, 1), (second.address, 2)]


async def test_past_max_resumes_the_stream_ends_unavailable_saying_so(tmp_path: Path) -> None:
    first, second, third = _three_replicas()
    replicas = {"code": [first, second, third]}
    got = []
    async with (
        gateway(tmp_path, replicas, max_resumes=1) as (address, _),
        MeshClient(address, timeout=10) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for piece in client.stream_text("x", domain="code"):
                got.append(piece)
    assert got == ["code-0 ", "code-1 "]  # one resume, then no more
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == (
        f"expert code at {second.address} failed mid-stream: UNAVAILABLE: code says no "
        "(after 1 resumes, routing.max_resumes)"
    )
    assert third.expert.calls == 0


async def test_a_stream_cut_by_the_callers_deadline_is_not_resumed(tmp_path: Path) -> None:
    first, second = FakeServer("code"), FakeServer("code")
    got = []
    async with (
        gateway(tmp_path, {"code": [first, second]}) as (address, _),
        MeshClient(address, timeout=0.5) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the fake sends one message, then holds
            async for piece in client.stream_text("hold-after-first", domain="code"):
                got.append(piece)
    assert got == ["code-0 "]
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (first.expert.calls, second.expert.calls) == (1, 0)


async def test_a_stream_the_caller_cancelled_is_not_resumed(tmp_path: Path) -> None:
    first, second = FakeServer("code"), FakeServer("code")
    async with gateway(tmp_path, {"code": [first, second]}) as (address, _):
        async with grpc.aio.insecure_channel(address) as channel:
            request = pb.GenerateRequest(prompt="hold-after-first", domain="code")
            call = pb_grpc.GatewayStub(channel).Generate(request, timeout=10)
            assert (await call.read()).text == "code-0 "
            call.cancel()
        async with MeshClient(address, timeout=10) as client:
            # The cancelled attempt has ended; a resume would have opened a stream to the other.
            await wait_listed(client, first.address, lambda r: r.outstanding == 0)
            await asyncio.sleep(0.5)  # room for a wrong resume to reach the other replica
            listed = {r.address: r for e in (await client.list_experts()).experts for r in e.replicas}
    assert listed[second.address].outstanding == 0 and second.expert.calls == 0
    assert listed[first.address].consecutive_failures == 0  # a cancel is not the replica's fault


def test_a_domains_resume_policy_overrides_the_meshs() -> None:
    routing = RoutingConfig.model_validate({"resume": "off", "domains": {"code": {"resume": "any"}}})
    assert (resume.policy(routing, "code"), resume.policy(routing, "general")) == ("any", "off")
    assert resume.policy(RoutingConfig(), "code") == "same_model"  # the default
