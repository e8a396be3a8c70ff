"""Pick the expert for a request: ``expert_id`` pin > explicit ``domain`` > default domain."""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.config import ExpertConfig, MeshConfig
from expertmesh.errors import NotFound
from expertmesh.v1 import expertmesh_pb2 as pb


@dataclass(frozen=True)
class Route:
    """The routing decision: which domain, why, and the experts that serve it, in order."""

    domain: str
    reason: str  # "expert_id", "domain" or "default"
    experts: tuple[ExpertConfig, ...]


class Router:
    """Routing decisions over one mesh config."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config

    def route(self, request: pb.GenerateRequest) -> Route:
        """The route for ``request``; NotFound names an unknown expert or domain."""
        if request.expert_id:
            try:
                expert = self.config.expert(request.expert_id)
            except KeyError:
                known = ", ".join(e.expert_id for e in self.config.experts)
                raise NotFound(f"no expert with expert_id {request.expert_id!r} (known: {known})") from None
            return Route(expert.domain, "expert_id", (expert,))
        if request.domain:
            domain, reason = request.domain, "domain"
        else:
            domain, reason = self.config.effective_default_domain(), "default"
        experts = tuple(e for e in self.config.experts if e.domain == domain)
        if not experts:
            known = ", ".join(self.config.domains())
            raise NotFound(f"no expert serves domain {domain!r} (domains: {known})")
        return Route(domain, reason, experts)
