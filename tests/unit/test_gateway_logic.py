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
from expertmesh.errors import EXPERT_LIMIT, REASON_KEY, MeshError, status_for
from expertmesh.gateway.admission import Admission, peer_host
from expertmesh.gateway.ejection import Ejection, may_eject
from expertmesh.gateway.server import serve
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..fakes import FakeServer
from ..support import free_port, wait_serving


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path,
    experts: dict[str, list[FakeServer]],
    mesh: dict[str, object] | None = None,
    gateway_settings: dict[str, object] | None = None,
    **routing: object,
) -> AsyncIterator[tuple[str, Path]]:
    """The real gateway server, in-process, over fake experts (``experts`` = expert_id -> replicas)."""
    port = free_port()
    config = {
        **(mesh or {}),
        "gateway": {"host": "127.0.0.1", "port": port, **(gateway_settings or {})},
        "grace_period_s": 1,
        "routing": {"fallbacks": {"code": ["general"]} if len(experts) > 1 else {}, **routing},
        "experts": [
            {
                "expert_id": expert_id,
                "domain": "code" if expert_id.startswith("code") else "general",
                "model_path": f"/models/{expert_id}",  # replicas of one expert share a model
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
    assert err.value.details() == (
        f"expert code at {code.address} failed mid-stream: UNAVAILABLE: code says no; "
        f"no replica to resume on (same_model)"  # general serves another model
    )
    assert general.expert.calls == 0


async def test_a_stream_resumes_on_another_replica_of_the_same_model(tmp_path: Path) -> None:
    first, second, general = FakeServer("code"), FakeServer("code"), FakeServer("general")
    first.expert.fail, first.expert.fail_after = grpc.StatusCode.UNAVAILABLE, 2
    async with gateway(tmp_path, {"code": [first, second], "general": [general]}) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            messages = [m async for m in client.stream("x", domain="code")]
    assert "".join(m.text for m in messages) == "code-0 code-1 code-2 "  # one stream, no seam visible
    assert [i for m in messages for i in m.token_ids] == [0, 1, 2]
    (resumed,) = second.expert.resumes
    assert (list(resumed.token_ids), resumed.text, resumed.completion_tokens) == ([0, 1], "code-0 code-1 ", 2)
    with_route = [m for m in messages if m.HasField("route")]
    assert len(with_route) == 2 and not with_route[0].route.seams  # the first message, then the seam's
    (seam,) = with_route[1].route.seams
    assert (seam.expert_id, seam.address, seam.tokens_streamed, seam.resumed_address) == (
        "code",
        first.address,
        2,
        second.address,
    )
    assert seam.cause == "UNAVAILABLE: code says no"
    assert with_route[1].request_id == "" and general.expert.calls == 0


async def test_resume_any_continues_on_another_model_and_off_does_not(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.fail, code.expert.fail_after = grpc.StatusCode.UNAVAILABLE, 1
    async with gateway(tmp_path, {"code": [code], "general": [general]}, resume="any") as (address, _):
        async with MeshClient(address, timeout=10) as client:
            text = "".join([piece async for piece in client.stream_text("x", domain="code")])
    assert text == "code-0 general-1 general-2 "
    (resumed,) = general.expert.resumes
    assert (list(resumed.token_ids), resumed.text, resumed.completion_tokens) == ([], "code-0 ", 1)
    code.expert.resumes.clear()
    async with gateway(tmp_path, {"code": [code], "general": [general]}, resume="off") as (address, _):
        async with MeshClient(address, timeout=10) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete("x", domain="code")
    assert (
        err.value.details() == f"expert code at {code.address} failed mid-stream: UNAVAILABLE: code says no"
    )


async def test_when_every_candidate_fails_each_attempt_is_listed(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.fail, general.expert.fail = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED
    async with gateway(tmp_path, {"code": [code], "general": [general]}) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete("x", domain="code")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == (
        f"every expert for this request failed: code@{code.address}: UNAVAILABLE: code says no; "
        f"general@{general.address}: RESOURCE_EXHAUSTED: general says no"
    )


async def test_every_candidate_full_is_resource_exhausted_with_pushback(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.fail = general.expert.fail = grpc.StatusCode.RESOURCE_EXHAUSTED
    async with gateway(tmp_path, {"code": [code], "general": [general]}, eject_after_failures=1) as (
        address,
        _,
    ):
        async with MeshClient(address, timeout=10) as client:
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.complete("x", domain="code")
            listed = {r.address: r for e in (await client.list_experts()).experts for r in e.replicas}
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == (
        f"every expert for this request is full: code@{code.address}: RESOURCE_EXHAUSTED: code says no; "
        f"general@{general.address}: RESOURCE_EXHAUSTED: general says no"
    )
    assert ("grpc-retry-pushback-ms", "1000") in tuple(err.value.trailing_metadata() or ())
    # a full queue is not the replica's failure: never ejected, however often
    assert [(r.ejections, r.consecutive_failures) for r in listed.values()] == [(0, 0), (0, 0)]


async def test_an_expert_specific_refusal_is_tried_on_the_next_candidate(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.fail = grpc.StatusCode.INVALID_ARGUMENT
    code.expert.fail_trailers = ((REASON_KEY, EXPERT_LIMIT),)  # e.g. its context is too small
    async with gateway(tmp_path, {"code": [code], "general": [general]}) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            done = await client.complete("x", domain="code")
            assert done.expert_id == "general"
            general.expert.fail = grpc.StatusCode.INVALID_ARGUMENT
            general.expert.fail_trailers = code.expert.fail_trailers
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete("x", domain="code")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("no expert for this request can serve it: general says no")


async def test_the_callers_deadline_is_deadline_exceeded_and_never_ejects(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    async with gateway(tmp_path, {"code": [code], "general": [general]}, eject_after_failures=2) as (
        address,
        _,
    ):
        async with MeshClient(address, timeout=0.5) as client:
            for _ in range(3):  # mid-stream: the fake sends one message, then holds
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as mid:
                    async for piece in client.stream_text("hold-after-first", domain="code"):
                        got.append(piece)
                assert got == ["code-0 "]
                assert mid.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            code.expert.hold.clear()  # before the first message
            with pytest.raises(grpc.aio.AioRpcError) as before:
                await client.complete("x", domain="code")
            code.expert.hold.set()
        async with MeshClient(address, timeout=10) as client:
            listed = {r.address: r for e in (await client.list_experts()).experts for r in e.replicas}
    # the gateway ends it just before the caller's own deadline would; on a loaded host the
    # caller's library may get there first (its own "Deadline Exceeded"): the code is the same
    if "Deadline Exceeded" not in (mid.value.details() or ""):
        assert mid.value.details() == "deadline exceeded mid-stream at expert code after 1 messages"
    assert before.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert listed[code.address].ejections == 0 and listed[code.address].consecutive_failures == 0
    assert general.expert.calls == 0


async def test_no_first_token_in_time_fails_over_and_counts(tmp_path: Path) -> None:
    code, general = FakeServer("code"), FakeServer("general")
    code.expert.hold.clear()  # a hung replica: takes the stream, never answers
    async with gateway(tmp_path, {"code": [code], "general": [general]}, first_token_timeout_s=0.3) as (
        address,
        _,
    ):
        async with MeshClient(address, timeout=10) as client:
            messages = [m async for m in client.stream("x", domain="code")]
            listed = {r.address: r for e in (await client.list_experts()).experts for r in e.replicas}
        code.expert.hold.set()
    assert messages[0].expert_id == "general"
    assert [a.outcome for a in messages[0].route.attempts] == [
        "UNAVAILABLE: no first message within 0.3 s (routing.first_token_timeout_s)"
    ]
    assert listed[code.address].consecutive_failures == 1


async def test_admission_limits_shed_with_pushback(tmp_path: Path) -> None:
    general = FakeServer("general")
    general.expert.hold.clear()
    limits = {"max_concurrent_streams": 3, "max_streams_per_peer": 2}
    async with gateway(tmp_path, {"general": [general]}, gateway_settings=limits) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            held = [asyncio.create_task(client.complete("x")) for _ in range(2)]
            await wait_for(lambda: general.expert.calls == 2)
            with pytest.raises(grpc.aio.AioRpcError) as per_peer:
                await client.complete("x")
            general.expert.hold.set()
            assert [(await h).text for h in held] == ["general-0 general-1 general-2 "] * 2
            assert (await client.complete("x")).expert_id == "general"  # slots are given back
    assert per_peer.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert per_peer.value.details() == (
        "this client already has 2 streams open, the limit per client (gateway.max_streams_per_peer); "
        "retry later"
    )
    assert ("grpc-retry-pushback-ms", "1000") in tuple(per_peer.value.trailing_metadata() or ())


def test_admission_counts_in_all_and_per_host() -> None:
    admission = Admission(max_streams=2, max_per_peer=2)
    assert peer_host("ipv4:10.1.2.3:5555") == "ipv4:10.1.2.3"
    assert peer_host("ipv6:[::1]:5555") == "ipv6:[::1]"
    with admission.admit("ipv4:10.0.0.1:1"), admission.admit("ipv4:10.0.0.2:2"):
        with pytest.raises(MeshError) as full:
            admission.admit("ipv4:10.0.0.3:3").__enter__()  # refused on entry: no slot taken
        assert status_for(full.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "gateway.max_concurrent_streams" in str(full.value)
    assert admission.in_flight == 0 and not admission.by_peer


async def test_a_caller_that_stops_reading_ends_alone(tmp_path: Path) -> None:
    general = FakeServer("general")
    async with gateway(
        tmp_path, {"general": [general]}, mesh={"limits": {"stream_buffer_messages": 128}}
    ) as (
        address,
        _,
    ):
        async with MeshClient(address, timeout=60) as client:
            slow = client.stream("flood").__aiter__()
            assert (await anext(slow)).text == "f" * 1024  # then it stops reading
            await wait_for(lambda: general.expert.calls == 1)
            for _ in range(3):  # its neighbours on the same link go on
                assert (await client.complete("x")).text == "general-0 general-1 general-2 "
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while True:  # what the gateway had sent before it gave up, then the status
                    await anext(slow)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == (
        "the caller did not read its stream: 128 messages were waiting for it (limits.stream_buffer_messages)"
    )


def test_ejection_is_capped_and_decays() -> None:
    ejection = Ejection(after_failures=1, base_s=5, max_s=30, decay_s=60)
    now = 1000.0
    lengths = []
    for _ in range(6):  # back to back: 5, 10, 20, then the cap
        assert ejection.failure(may_eject=True, now=now)
        lengths.append(ejection.until - now)
        now = ejection.until
    assert lengths == [5, 10, 20, 30, 30, 30]
    # every quiet minute forgets one ejection: after four, 5 x 2^(6-4) = 20 s
    assert ejection.next_ejection_s(now + 120) == 30
    assert ejection.next_ejection_s(now + 240) == 20
    assert ejection.next_ejection_s(now + 24 * 3600) == 5  # a day later: as new


def test_at_most_a_share_of_replicas_is_ejected() -> None:
    assert may_eject(ejected=0, total=1, max_percent=50)  # a lone replica: its fallbacks serve
    assert may_eject(ejected=1, total=4, max_percent=50)
    assert not may_eject(ejected=2, total=4, max_percent=50)
    assert not may_eject(ejected=1, total=2, max_percent=50)
    assert may_eject(ejected=1, total=2, max_percent=100)


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


async def test_hedging_keeps_the_first_replica_to_answer_and_cancels_the_other(tmp_path: Path) -> None:
    slow, fast = FakeServer("general"), FakeServer("general")
    slow.expert.hold.clear()  # its first message never comes
    async with gateway(tmp_path, {"general": [slow, fast]}, hedge_after_ms=100) as (address, _):
        async with MeshClient(address, timeout=10) as client:
            messages = [m async for m in client.stream("x")]
            await wait_for(lambda: slow.expert.cancelled == 1)  # the loser's request was stopped
    assert "".join(m.text for m in messages) == "general-0 general-1 general-2 "
    assert messages[0].route.address == fast.address
    outcomes = {a.address: a.outcome for a in messages[0].route.attempts}
    assert outcomes[slow.address] == "cancelled: the hedge on another replica answered first"
    slow.expert.hold.set()
