"""expertmesh.v1.Gateway: route, forward, stream back unchanged; ListExperts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from expertmesh.errors import grpc_errors
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .forward import Forwarding, forward
from .health import ExpertLink
from .router import Router

log = logging.getLogger(__name__)
INFO_TIMEOUT_S = 1.0


class GatewayServicer(pb_grpc.GatewayServicer):
    """Routes each request to an expert by ``expert_id`` / ``domain`` / default domain."""

    def __init__(self, router: Router, links: dict[str, ExpertLink]) -> None:
        self.router = router
        self.links = links

    @grpc_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        route = self.router.route(request)
        candidates = [self.links[e.expert_id] for e in route.experts]
        forwarding = Forwarding()
        try:
            async for msg in forward(request, candidates, context, forwarding):
                yield msg
        finally:
            log.info(
                "request %s domain=%s (%s): %s",
                request.request_id or "-",
                route.domain,
                route.reason,
                forwarding.summary() or "cancelled",
            )

    @grpc_errors
    async def ListExperts(
        self, request: pb.ListExpertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExpertsResponse:
        config = self.router.config
        statuses = await asyncio.gather(*(self._status(e.expert_id, e.domain) for e in config.experts))
        return pb.ListExpertsResponse(experts=statuses, default_domain=config.effective_default_domain())

    async def _status(self, expert_id: str, domain: str) -> pb.ExpertStatus:
        link = self.links[expert_id]
        status = pb.ExpertStatus(expert_id=expert_id, domain=domain, address=link.address, health=link.health)
        try:
            info = await pb_grpc.ExpertStub(link.channel).Info(pb.InfoRequest(), timeout=INFO_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            status.last_error = f"Info: {e.code().name}: {e.details()}"
        else:
            status.state = info.state
            status.last_error = info.last_error
        return status
