"""Gateway logic against fake experts (in-process gRPC servers): failover, ejection, balance, reload.

Fakes are used only here, for the gateway's own decisions; the real-engine behaviour is proven
in test_failover.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml

from expertmesh.client import MeshClient
from expertmesh.config import load_config
from expertmesh.gateway.health import Ejection
from expertmesh.gateway.server import serve
from expertmesh.mux import Multiplexed
from expertmesh.rpc import Health, bind
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .support import free_port, wait_serving


class FakeExpert(Multiplexed, pb_grpc.ExpertServicer):
    """Streams ``pieces`` or fails with ``fail`` (before or after ``fail_after`` pieces)."""

    def __init__(self, expert_id: str) -> None:
        self.expert_id = expert_id
        self.fail: grpc.StatusCode | None = None
        self.fail_after = 0
        self.calls = 0
        self.hold = asyncio.Event()
        self.hold.set()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.calls += 1
        await self.hold.wait()
        for i in range(3):
            if self.fail is not None and i == self.fail_after:
                await context.abort(self.fail, f"{self.expert_id} says no")
            yield pb.GenerateResponse(text=f"{self.expert_id}-{i} ", token_ids=[i], expert_id=self.expert_id)
        yield pb.GenerateResponse(expert_id=self.expert_id, finish_reason="stop")

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(expert_id=self.expert_id, state=pb.EXPERT_STATE_READY)


class FakeServer:
    def __init__(self, expert_id: str) -> None:
        self.expert = FakeExpert(expert_id)
        self.port = free_port()
        self.server: grpc.aio.Server | None = None
        self.health: Health | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server()
        pb_grpc.add_ExpertServicer_to_server(self.expert, self.server)
        self.health = Health(self.server, ["expertmesh.v1.Expert", "expertmesh.v1.Expert/engine"])
        await self.health.set(True)
        bind(self.server, "127.0.0.1", self.port)
        await self.server.start()

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(0)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path, experts: dict[str, list[FakeServer]], **routing: object
) -> AsyncIterator[tuple[str, Path]]:
    """The real gateway server, in-process, over fake experts (``experts`` = expert_id -> replicas)."""
    port = free_port()
    config = {
        "gateway": {"host": "127.0.0.1", "port": port},
        "grace_period_s": 1,
        "routing": {"fallbacks": {"code": ["general"]} if len(experts) > 1 else {}, **routing},
        "experts": [
            {
                "expert_id": expert_id,
                "domain": "code" if expert_id.startswith("code") else "general",
                "model_path": "/unused",
                "address": servers[0].address,
                "replicas": [s.address for s in servers[1:]],
            }
            for expert_id, servers in experts.items()
        ],
    }
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(config))
    for servers in experts.values():
        for server in servers:
            await server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(load_config(path), path, stop=stop))
    try:
        await wait_serving(f"127.0.0.1:{port}", timeout=30)
        yield f"127.0.0.1:{port}", path
    finally:
        stop.set()
        await task
        for servers in experts.values():
            for server in servers:
                await server.stop()


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def wait_listed(client: MeshClient, address: str, predicate) -> None:  # type: ignore[no-untyped-def]
    """Poll ListExperts until the replica at ``address`` satisfies ``predicate``."""
    deadline = time.monotonic() + 5
    while True:
        replicas = {r.address: r for e in (await client.list_experts()).experts for r in e.replicas}
        if predicate(replicas[address]):
            return
        assert time.monotonic() < deadline, f"replica {address} never matched: {replicas[address]}"
        await asyncio.sleep(0.05)


async def test_fails_over_before_the_first_token_and_explains_it(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.fail = grpc.StatusCode.UNAVAILABLE
    async with gateway(tmp_path, {"code": [code], "general": [general]}) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            messages = [m async for m in client.stream("x", domain="code")]
    assert "".join(m.text for m in messages) == "general-0 general-1 general-2 "
    route = messages[0].route
    assert (route.domain, route.signal, route.expert_id, route.address) == (
        "code",
        "domain",
        "general",
        general.address,
    )
    assert list(route.candidates) == ["code", "general"]
    assert [(a.expert_id, a.outcome) for a in route.attempts] == [("code", "UNAVAILABLE: code says no")]
    assert not messages[1].HasField("route")


async def test_invalid_argument_is_never_retried(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.fail = grpc.StatusCode.INVALID_ARGUMENT
    async with gateway(tmp_path, {"code": [code], "general": [general]}) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete("x", domain="code")
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "code says no")
    assert general.expert.calls == 0


async def test_failure_mid_stream_ends_with_unavailable_naming_the_expert(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.fail, code.expert.fail_after = grpc.StatusCode.UNAVAILABLE, 2
    async with gateway(tmp_path, {"code": [code], "general": [general]}) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for piece in client.stream_text("x", domain="code"):
                    got.append(piece)
    assert got == ["code-0 ", "code-1 "]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (
        err.value.details() == f"expert code at {code.address} failed mid-stream: UNAVAILABLE: code says no"
    )
    assert general.expert.calls == 0


async def test_when_every_candidate_fails_each_attempt_is_listed(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.fail = general.expert.fail = grpc.StatusCode.RESOURCE_EXHAUSTED
    async with gateway(tmp_path, {"code": [code], "general": [general]}) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete("x", domain="code")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == (
        f"every expert for this request failed: code@{code.address}: RESOURCE_EXHAUSTED: code says no; "
        f"general@{general.address}: RESOURCE_EXHAUSTED: general says no"
    )


async def test_consecutive_failures_eject_and_a_passing_health_check_restores(tmp_path: Path) -> None:
    bad, good, general = FakeServer("code"), FakeServer("code"), FakeServer("general")
    bad.expert.fail = grpc.StatusCode.UNAVAILABLE
    async with gateway(tmp_path, {"code": [bad, good], "general": [general]}, eject_after_failures=2) as (
        address,
        _,
    ):
        async with MeshClient(address, timeout=10) as client:
            for _ in range(6):
                assert (await client.complete("x", domain="code")).expert_id == "code"
            listed = {r.address: r for e in (await client.list_experts()).experts for r in e.replicas}
            assert listed[bad.address].ejections == 1 and listed[bad.address].ejected_for_s > 0
            calls = bad.expert.calls
            for _ in range(4):
                await client.complete("x", domain="code")
            assert bad.expert.calls == calls  # out of rotation while ejected
            # the replica recovers and passes a fresh health check: back in rotation
            bad.expert.fail = None
            assert bad.health is not None
            await bad.health.set(False)
            await wait_listed(client, bad.address, lambda r: r.health == "NOT_SERVING")
            await bad.health.set(True)
            await wait_listed(client, bad.address, lambda r: r.health == "SERVING" and r.ejected_for_s == 0)
            for _ in range(4):
                await client.complete("x", domain="code")
            assert bad.expert.calls > calls


async def test_least_outstanding_replica_takes_the_next_request(tmp_path: Path) -> None:
    first, second = FakeServer("general"), FakeServer("general")
    first.expert.hold.clear()  # requests on the first replica stay open
    async with gateway(tmp_path, {"general": [first, second]}) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            held = asyncio.create_task(client.complete("x"))
            await wait_for(lambda: first.expert.calls == 1)
            for _ in range(3):
                assert (await client.complete("x")).text.startswith("general-0")
            assert (first.expert.calls, second.expert.calls) == (1, 3)
            first.expert.hold.set()
            await held


def test_never_eject_the_last_available_replica() -> None:
    ejection = Ejection(after_failures=1)
    assert not ejection.failure(may_eject=False)
    assert not ejection.ejected()
    assert ejection.failure(may_eject=True) and ejection.ejected()
    first_until = ejection.until
    ejection.health_passed()
    assert not ejection.ejected()
    assert ejection.failure(may_eject=True)
    assert ejection.until - time.monotonic() > first_until - time.monotonic()  # backoff doubled


async def test_route_dry_run_and_hot_reload(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    async with gateway(tmp_path, {"code": [code], "general": [general]}) as (address, path):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GatewayStub(channel)
            decision = await stub.Route(pb.GenerateRequest(prompt="x", domain="code"))
            assert list(decision.candidates) == ["code", "general"]
            assert (decision.expert_id, decision.address) == ("code", code.address)
            # an invalid file is rejected; the running config stays
            good = yaml.safe_load(path.read_text())
            path.write_text(yaml.safe_dump({**good, "routing": {"fallbakcs": {}}}))
            await asyncio.sleep(2.5)
            decision = await stub.Route(pb.GenerateRequest(prompt="x", domain="code"))
            assert list(decision.candidates) == ["code", "general"]
            # a valid change applies without a restart, with a stream in flight
            code.expert.hold.clear()
            in_flight = asyncio.create_task(MeshClient(address).complete("x", domain="code"))
            await wait_for(lambda: code.expert.calls == 1)
            path.write_text(yaml.safe_dump({**good, "routing": {"fallbacks": {"code": []}}}))
            deadline = time.monotonic() + 10
            while list((await stub.Route(pb.GenerateRequest(prompt="x", domain="code"))).candidates) != [
                "code"
            ]:
                assert time.monotonic() < deadline, "reload not applied"
                await asyncio.sleep(0.2)
            code.expert.hold.set()
            assert (await in_flight).text == "code-0 code-1 code-2 "
