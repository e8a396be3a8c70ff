"""Pick the experts for a request, in the order to try them.

Order of decision: ``expert_id`` pin > explicit ``domain`` > automatic classification >
the configured default domain. The candidates are the chosen domain's experts, then those of
its fallback chain (``routing.fallbacks``, not transitive). A pinned expert has no fallback:
the caller asked for that one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from expertmesh.config import ExpertConfig, MeshConfig
from expertmesh.errors import NotFound
from expertmesh.v1 import expertmesh_pb2 as pb

from .classify import Classifier
from .signals import Vote


@dataclass(frozen=True)
class Route:
    """The routing decision: domain, the signal that decided it and how sure, the experts to try."""

    domain: str
    signal: str  # "expert_id", "domain", a classifier signal, or "default"
    confidence: float
    experts: tuple[ExpertConfig, ...]
    votes: tuple[Vote, ...] = ()

    def decision(self) -> pb.RouteDecision:
        """The wire form of this route (attempts are added by the caller)."""
        return pb.RouteDecision(
            domain=self.domain,
            signal=self.signal,
            confidence=self.confidence,
            candidates=[e.expert_id for e in self.experts],
            votes=[
                pb.SignalVote(signal=v.signal, domain=v.domain, confidence=v.confidence, detail=v.detail)
                for v in self.votes
            ],
        )


def prompt_text(request: pb.GenerateRequest) -> str:
    """What the classifier reads: the prompt, or the user turns of a chat."""
    if request.prompt:
        return request.prompt
    return "\n".join(m.content for m in request.messages if m.role == "user")


class Router:
    """Routing decisions over one mesh config (replaced as a whole on hot reload)."""

    def __init__(self, config: MeshConfig, classifier: Classifier | None = None) -> None:
        self.config = config
        self.classifier = classifier or Classifier(config)

    def candidates(self, domain: str) -> tuple[ExpertConfig, ...]:
        """The domain's experts, then its fallbacks' (a fallback entry is a domain or an expert id)."""
        chosen: dict[str, ExpertConfig] = {e.expert_id: e for e in self.config.experts if e.domain == domain}
        for name in self.config.routing.fallbacks.get(domain, []):
            for e in self.config.experts:
                if e.domain == name or e.expert_id == name:
                    chosen.setdefault(e.expert_id, e)
        return tuple(chosen.values())

    async def route(self, request: pb.GenerateRequest) -> Route:
        """The route for ``request``; NotFound names an unknown expert or domain."""
        if request.expert_id:
            try:
                expert = self.config.expert(request.expert_id)
            except KeyError:
                known = ", ".join(e.expert_id for e in self.config.experts)
                raise NotFound(f"no expert with expert_id {request.expert_id!r} (known: {known})") from None
            return Route(expert.domain, "expert_id", 1.0, (expert,))
        if request.domain:
            if request.domain not in self.config.domains():
                known = ", ".join(self.config.domains())
                raise NotFound(f"no expert serves domain {request.domain!r} (domains: {known})")
            return Route(request.domain, "domain", 1.0, self.candidates(request.domain))
        text = prompt_text(request)
        if self.classifier.embeddings:
            # ~10 ms of matrix work: keep it off the event loop that streams everyone's tokens.
            result = await asyncio.to_thread(self.classifier.classify, text)
        else:
            result = self.classifier.classify(text)
        return Route(
            result.domain, result.signal, result.confidence, self.candidates(result.domain), result.votes
        )
