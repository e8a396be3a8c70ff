"""The route plan: ``Gateway.Route`` (the dry run) names the replica that ``Generate`` tries
first, in every policy case; a cold replica never hides its expert's warm ones; an empty OK
stream is an answer. The real gateway servicer over fake experts whose state is set directly
(no health watch), so that each case is exactly the one named."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from expertmesh.config import MeshConfig
from expertmesh.gateway.link import ExpertLink
from expertmesh.gateway.plan import SKIP_COLD, plan
from expertmesh.gateway.pool import Pool
from expertmesh.gateway.router import Router
from expertmesh.gateway.servicer import GatewayServicer
from expertmesh.v1 import expertmesh_pb2 as pb

from ..fakes import FakeServer

EXPERTS = {"code": ["code-a", "code-b"], "general": ["general-a", "general-b"]}


class Context:
    """What the servicer reads of a call: no deadline, no metadata, a loopback peer."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class Mesh:
    """Fake replicas, and links to them whose state each test sets."""

    def __init__(
        self, servers: dict[str, FakeServer], links: dict[str, ExpertLink], servicer: GatewayServicer
    ):
        self.servers, self.links, self.servicer = servers, links, servicer

    async def route(self, request: pb.GenerateRequest) -> pb.RouteDecision:
        return await self.servicer.Route(request, Context())  # type: ignore[arg-type]

    async def generate(self, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
        return [msg async for msg in self.servicer.generate(request, Context())]

    def called(self) -> list[str]:
        return [name for name, server in self.servers.items() if server.expert.calls]


@pytest.fixture
async def mesh_of(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    servers = {name: FakeServer(name) for names in EXPERTS.values() for name in names}
    for server in servers.values():
        await server.start()
    pools: list[Pool] = []

    async def build(load: str = "eager", **routing: Any) -> Mesh:
        config = MeshConfig.model_validate(
            {
                "routing": {"fallbacks": {"code": ["general"]}, **routing},
                "experts": [
                    {
                        "expert_id": expert_id,
                        "domain": expert_id,
                        "model_path": f"/models/{expert_id}",
                        "load": load if expert_id == "code" else "eager",
                        "address": servers[names[0]].address,
                        "replicas": [servers[n].address for n in names[1:]],
                    }
                    for expert_id, names in EXPERTS.items()
                ],
            }
        )
        pool = Pool()
        pools.append(pool)
        links = {}
        for expert_id, names in EXPERTS.items():
            pool.replicas[expert_id] = []
            for name in names:
                link = ExpertLink(expert_id, servers[name].address)  # not started: state set by hand
                link.health, link.engine_ready = "SERVING", True
                pool.replicas[expert_id].append(link)
                links[name] = link
        return Mesh(servers, links, GatewayServicer(Router(config), pool))

    yield build
    for pool in pools:
        await pool.close()
    for server in servers.values():
        await server.stop()


def named(mesh: Mesh, decision: pb.RouteDecision) -> str:
    """The fake a decision's address belongs to."""
    return next(name for name, link in mesh.links.items() if link.address == decision.address)


async def agree(mesh: Mesh, request: pb.GenerateRequest) -> tuple[str, list[pb.GenerateResponse]]:
    """Route's choice, checked to be the replica Generate tries first (and the only one called)."""
    decision = await mesh.route(request)
    messages = await mesh.generate(request)
    first = messages[0].route
    # The first message names who serves it, after the skips that came before (none was tried).
    assert all(a.outcome.startswith("skipped") for a in first.attempts)
    assert (first.expert_id, first.address) == (decision.expert_id, decision.address)
    assert mesh.called() == [named(mesh, decision)]
    # Every field of the explanation Route gives is the one Generate gives.
    for field in ("domain", "signal", "confidence", "candidates", "votes"):
        assert getattr(decision, field) == getattr(first, field), field
    return named(mesh, decision), messages


async def test_all_warm_the_least_outstanding_replica_of_the_first_candidate(mesh_of: Any) -> None:
    mesh = await mesh_of()
    mesh.links["code-a"].outstanding = 2  # busier than code-b
    name, _ = await agree(mesh, pb.GenerateRequest(prompt="x", domain="code"))
    assert name == "code-b"


async def test_panic_mode_route_names_whom_generate_tries(mesh_of: Any) -> None:
    mesh = await mesh_of()
    for link in mesh.links.values():
        link.health = "NOT_SERVING"  # health lags: every replica looks down, none is
    name, messages = await agree(mesh, pb.GenerateRequest(prompt="x", domain="code"))
    assert name == "code-a"
    assert messages[-1].finish_reason == "stop"


async def test_a_cold_lazy_candidate_is_skipped_for_a_warm_fallback(mesh_of: Any) -> None:
    mesh = await mesh_of(load="lazy", loading_policy="fallback_while_loading")
    for name in EXPERTS["code"]:
        mesh.links[name].engine_ready = False
    name, messages = await agree(mesh, pb.GenerateRequest(prompt="x", domain="code"))
    assert name == "general-a"
    skipped = [(a.address, a.outcome) for a in messages[0].route.attempts[:2]]
    assert skipped == [(mesh.links[n].address, SKIP_COLD) for n in EXPERTS["code"]]


async def test_a_cold_replica_does_not_hide_its_experts_warm_one(mesh_of: Any) -> None:
    mesh = await mesh_of(load="lazy", loading_policy="fallback_while_loading")
    mesh.links["code-a"].engine_ready = False
    name, messages = await agree(mesh, pb.GenerateRequest(prompt="x", domain="code"))
    assert name == "code-b"
    assert messages[0].route.attempts[0].outcome == SKIP_COLD


async def test_an_eager_expert_that_idled_out_is_cold_as_it_reports(mesh_of: Any) -> None:
    mesh = await mesh_of(load="eager", loading_policy="fallback_while_loading")
    mesh.links["code-a"].engine_ready = False  # unloaded since: it loads on demand
    name, _ = await agree(mesh, pb.GenerateRequest(prompt="x", domain="code"))
    assert name == "code-b"


async def test_an_ejected_replica_is_passed_over(mesh_of: Any) -> None:
    mesh = await mesh_of()
    mesh.links["code-a"].ejection.until = time.monotonic() + 60
    name, _ = await agree(mesh, pb.GenerateRequest(prompt="x", domain="code"))
    assert name == "code-b"


async def test_an_expert_with_every_replica_ejected_is_skipped_with_the_reason(mesh_of: Any) -> None:
    mesh = await mesh_of()
    for name in EXPERTS["code"]:
        mesh.links[name].ejection.until = time.monotonic() + 60
    name, messages = await agree(mesh, pb.GenerateRequest(prompt="x", domain="code"))
    assert name == "general-a"
    skip = messages[0].route.attempts[0]
    assert skip.expert_id == "code" and skip.outcome.startswith("skipped: no replica SERVING")
    assert "ejected: " in skip.outcome


async def test_a_pinned_expert_has_no_fallback(mesh_of: Any) -> None:
    mesh = await mesh_of()
    mesh.links["general-a"].ejection.until = time.monotonic() + 60
    name, messages = await agree(mesh, pb.GenerateRequest(prompt="x", expert_id="general"))
    assert name == "general-b"
    assert list(messages[0].route.candidates) == ["general"]


async def test_an_empty_ok_stream_is_an_answer_not_run_again(mesh_of: Any) -> None:
    mesh = await mesh_of()
    request = pb.GenerateRequest(prompt="empty", domain="code")
    decision = await mesh.route(request)
    assert await mesh.generate(request) == []
    assert mesh.called() == [named(mesh, decision)] == ["code-a"]


async def test_the_plan_is_policy_alone(mesh_of: Any) -> None:
    """The same plan from the same state, whoever asks (no I/O, no side effect)."""
    mesh = await mesh_of(load="lazy", loading_policy="fallback_while_loading")
    mesh.links["code-a"].engine_ready = False
    route = await mesh.servicer.router.route(pb.GenerateRequest(prompt="x", domain="code"))
    routing = mesh.servicer.router.config.routing
    one, two = plan(route, mesh.servicer.pool.of, routing), plan(route, mesh.servicer.pool.of, routing)
    assert one == two and not one.panic
    assert [(s.replica.address if s.replica else None, s.skip) for s in one.steps] == [
        (mesh.links["code-a"].address, SKIP_COLD),
        (mesh.links["code-b"].address, ""),
        (mesh.links["general-a"].address, ""),
        (mesh.links["general-b"].address, ""),
    ]
    assert mesh.called() == []


async def test_pool_add_and_remove_a_replica(mesh_of: Any) -> None:
    """The pool's small API for replicas found at run time: an added one is in the next plan; a
    removed one leaves it, and its link closes only after its last stream."""
    mesh = await mesh_of()
    config = mesh.servicer.router.config
    pool = Pool()
    pool.apply(config)
    try:
        extra = mesh.servers["general-b"].address  # served already: a second address for code
        pool.add_replica("code", extra)
        added = pool.of("code")[-1]
        pool.add_replica("code", extra)
        assert pool.of("code")[-1] is added  # known: the same link
        assert [link.address for link in pool.of("code")][-1] == extra
        route = await mesh.servicer.router.route(pb.GenerateRequest(prompt="x", domain="code"))
        assert extra in [s.replica.address for s in plan(route, pool.of, config.routing).steps if s.replica]
        added.outstanding = 1  # a stream still open on it
        pool.remove_replica("code", extra)
        assert extra not in [link.address for link in pool.of("code")]
        await pool.reap()
        assert added in pool._retired  # kept until its stream ends
        added.outstanding = 0
        await pool.reap()
        assert added not in pool._retired
    finally:
        await pool.close()


async def test_an_expert_added_by_a_reload_is_routed_to_only_once_serving() -> None:
    """A reload's new expert (a process `up` is only starting) is skipped, its domain falls back,
    until its health watch reports SERVING; then it takes its domain's requests."""
    general, code = FakeServer("general"), FakeServer("code")
    await general.start()
    entry = {"domain": "general", "model_path": "/models/general", "address": general.address}
    before = MeshConfig.model_validate({"experts": [{"expert_id": "general", **entry}]})
    after = MeshConfig.model_validate(
        {
            "experts": [
                {"expert_id": "general", **entry},
                {"expert_id": "code", "domain": "code", "model_path": "/m/code", "address": code.address},
            ],
            "routing": {"fallbacks": {"code": ["general"]}},
        }
    )
    pool = Pool()
    try:
        pool.apply(before)
        pool.apply(after)
        (added,) = pool.of("code")
        assert added.health == "STARTING" and not added.available()
        renew, pool._link_security = pool._link_security, lambda config: True  # type: ignore[method-assign]
        pool.apply(after)  # a certificate renewal reopens every link: the hold-out stays
        pool._link_security = renew  # type: ignore[method-assign]
        (added,) = pool.of("code")
        assert added.health == "STARTING" and not added.available()
        route = await Router(after).route(pb.GenerateRequest(prompt="x", domain="code"))
        first = plan(route, pool.of, after.routing).first()
        assert first is not None and first.replica is not None and first.replica.expert_id == "general"
        await code.start()
        while not added.serving:  # until its health watch reports it (a report replaces the event)
            await asyncio.wait_for(added.changed.wait(), 30)
        first = plan(route, pool.of, after.routing).first()
        assert first is not None and first.replica is added
    finally:
        await pool.close()
        await general.stop()
        await code.stop()
