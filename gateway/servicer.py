"""expertmesh.v1.Gateway: route, forward, stream back unchanged; Route (dry run); ListExperts."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from expertmesh.errors import grpc_errors
from expertmesh.telemetry import gateway_generate, note_route
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc
from expertmesh.validation import check_request

from . import affinity
from .admission import Admission
from .auth import current_tenant
from .call import CallContext
from .forward import Forwarder
from .link import ExpertLink
from .plan import Plan, plan
from .pool import Pool
from .router import Route as _Route
from .router import Router
from .tenants import Tenants

log = logging.getLogger(__name__)
INFO_TIMEOUT_S = 1.0


class GatewayServicer(pb_grpc.GatewayServicer):
    """Routes each request; ``router`` is replaced as a whole when the config is reloaded."""

    def __init__(
        self, router: Router, pool: Pool, tenants: Tenants | None = None, admission: Admission | None = None
    ) -> None:
        self.router = router
        self.pool = pool
        self.tenants = tenants or Tenants(router.config.auth)
        gw = router.config.gateway
        self.admission = admission or Admission(gw.max_concurrent_streams, gw.max_streams_per_peer)

    @gateway_generate
    async def generate(
        self, request: pb.GenerateRequest, context: CallContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The one routing path of both fronts (gRPC ``Generate`` and the OpenAI HTTP API):
        admission, checks, tenant, route, forwarding, telemetry. Raises the cause of a failure;
        each front turns it into its own status. The caller's tenant is ``current_tenant``."""
        router = self.router  # one config for the whole request, even across a reload
        with self.admission.admit(context.peer()):
            check_request(request, router.config.limits)  # before any routing work
            if not request.request_id:
                request.request_id = uuid.uuid4().hex  # so that every log line and both hops share it
            tenant = current_tenant.get()
            route = self.tenants.permit(tenant, request, await router.route(request))
            note_route(route.domain, route.signal, route.confidence)
            routing = router.config.routing
            forwarder = Forwarder(request, self._plan(route, request, context), self.pool, routing, context)
            lease = self.tenants.admit(tenant, request)
            try:
                async for msg in forwarder.stream():
                    lease.observe(msg)
                    yield msg
            finally:
                lease.close()
                log.info(
                    "request %s -> domain %s (%s %.2f): %s",
                    request.request_id or "-",
                    route.domain,
                    route.signal,
                    route.confidence,
                    forwarder.summary() or "cancelled before any attempt",
                )

    #: gRPC ``Generate``: the routing path, its failures as gRPC statuses.
    Generate = grpc_errors(generate)

    @grpc_errors
    async def Route(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.RouteDecision:
        check_request(request, self.router.config.limits)
        route = self.tenants.permit(current_tenant.get(), request, await self.router.route(request))
        return self._plan(route, request, context).decision()  # as Generate would go

    def _plan(self, route: _Route, request: pb.GenerateRequest, context: CallContext) -> Plan[ExpertLink]:
        """The route plan (:mod:`.plan`), its replica order by ``routing.affinity`` (:mod:`.affinity`)."""
        routing = self.router.config.routing
        order = affinity.replica_order(request, context.invocation_metadata(), routing, self.pool.of)
        return plan(route, self.pool.of, routing, order)

    @grpc_errors
    async def ListExperts(
        self, request: pb.ListExpertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExpertsResponse:
        config = self.router.config
        tenant = current_tenant.get()
        allowed = self.tenants.state(tenant).config.domains if tenant is not None else []
        experts = [e for e in config.experts if not allowed or e.domain in allowed]  # a tenant sees its own
        statuses = await asyncio.gather(*(self._status(e.expert_id, e.domain) for e in experts))
        return pb.ListExpertsResponse(experts=statuses, default_domain=config.effective_default_domain())

    async def _status(self, expert_id: str, domain: str) -> pb.ExpertStatus:
        links = self.pool.of(expert_id)
        best = next((link for link in links if link.serving), links[0])
        status = pb.ExpertStatus(
            expert_id=expert_id,
            domain=domain,
            address=links[0].address,
            health=best.health,
            replicas=[link.status() for link in links],
        )
        try:
            info = await best.stub.Info(pb.InfoRequest(), timeout=INFO_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            status.last_error = f"Info from {best.address}: {e.code().name}: {e.details()}"
        else:
            status.state = info.state
            status.last_error = info.last_error
        return status
