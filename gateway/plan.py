"""The route plan: which replicas a request tries, in which order, which it skips and why, and
whether it is in panic mode, decided once, by policy alone (no I/O). The dry run
(``Gateway.Route``) reports the plan's first step; ``Generate`` executes the plan
(:mod:`.forward`), so the two cannot disagree.

- The order: the route's candidates (:mod:`.router`); within an expert, its available replicas
  in the order of the replica-order policy (:data:`ReplicaOrder`, by default least outstanding
  first: the single place where another order, e.g. prefix affinity, plugs in).
- Panic mode, as Envoy's: when no replica of any candidate looks available (health can lag,
  e.g. pings answered late on an overloaded host), every replica is tried rather than none.
- ``routing.loading_policy: fallback_while_loading``: a cold replica (its engine not loaded, as
  the expert reports it) is skipped while a warm one comes later in the plan; it is asked to
  load in the background.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from expertmesh.config import ExpertConfig, RoutingConfig
from expertmesh.v1 import expertmesh_pb2 as pb

from .replica import Replica
from .router import Route

R = TypeVar("R", bound=Replica)

#: The replica-order policy: an expert's replicas to try (already filtered by availability),
#: best first.
ReplicaOrder = Callable[[ExpertConfig, Sequence[R]], list[R]]

SKIP_COLD = "skipped: engine not loaded; loading it in the background"


def least_outstanding(expert: ExpertConfig, replicas: Sequence[R]) -> list[R]:
    """The default replica order: least outstanding requests first (stable)."""
    return sorted(replicas, key=lambda r: r.outstanding)


@dataclass(frozen=True)
class Step(Generic[R]):
    """One entry of the plan: a replica to try, or a skip and its reason."""

    expert: ExpertConfig
    replica: R | None  # None: the expert has no replica to try (``skip`` says why)
    skip: str = ""  # why this step is not tried; "" when it is
    cold: bool = False  # engine not loaded: the first wait is routing.load_wait_s, no hedge
    load: bool = False  # a skipped cold replica: ask it to load in the background


@dataclass(frozen=True)
class Plan(Generic[R]):
    """The steps of one request, in order."""

    route: Route
    panic: bool
    steps: tuple[Step[R], ...]

    def tried(self) -> Iterator[tuple[int, Step[R]]]:
        """(index, step) of the steps that are tried, in order."""
        return ((i, s) for i, s in enumerate(self.steps) if not s.skip)

    def first(self) -> Step[R] | None:
        """The first step that is tried; None when every candidate is skipped."""
        return next((s for _, s in self.tried()), None)

    def hedge_target(self, index: int) -> Step[R] | None:
        """Where a hedge of step ``index`` goes: the next warm, available replica in the plan."""
        current = self.steps[index].replica
        for step in self.steps[index + 1 :]:
            if step.replica is not current and _warm(step):
                return step
        return None

    def decision(self) -> pb.RouteDecision:
        """The dry run's answer: the route, and the replica the first attempt goes to."""
        decision = self.route.decision()
        first = self.first()
        if first is not None and first.replica is not None:
            decision.expert_id, decision.address = first.replica.expert_id, first.replica.address
        return decision


def plan(
    route: Route,
    replicas_of: Callable[[str], Sequence[R]],
    routing: RoutingConfig,
    order: ReplicaOrder[R] = least_outstanding,
) -> Plan[R]:
    """The plan for ``route`` over the replicas as they stand now (``replicas_of(expert_id)``)."""
    every = [(e, list(replicas_of(e.expert_id))) for e in route.experts]
    panic = not any(r.available() for _, replicas in every for r in replicas)
    steps: list[Step[R]] = []
    for expert, replicas in every:
        ordered = order(expert, [r for r in replicas if panic or r.available()])
        if not ordered:
            steps.append(Step(expert, None, skip="skipped: no replica SERVING" + _describe(replicas)))
        steps.extend(Step(expert, r, cold=r.cold) for r in ordered)
    if routing.loading_policy == "fallback_while_loading":
        for i, step in enumerate(steps):
            later_warm = any(
                s.replica is not None and not s.cold and s.replica.available() for s in steps[i + 1 :]
            )
            if step.cold and later_warm:
                steps[i] = replace(step, skip=SKIP_COLD, load=True)
    return Plan(route, panic, tuple(steps))


def _warm(step: Step[R]) -> bool:
    return step.replica is not None and not step.cold and step.replica.available()


def _describe(replicas: Sequence[Replica]) -> str:
    """`` (host:port NOT_SERVING, ...; ejected: host:port)``: why none is tried."""
    ejected = [r.address for r in replicas if r.ejection.ejected()]
    health = ", ".join(f"{r.address} {r.health}" for r in replicas)
    return f" ({health}" + (f"; ejected: {', '.join(ejected)})" if ejected else ")")
