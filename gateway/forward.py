"""Forward one request along its route, failing over before the first token.

Candidates are tried in route order; within an expert, its available replicas by least
outstanding requests. An attempt that fails with UNAVAILABLE, RESOURCE_EXHAUSTED, a connect
failure or a hang (the per-attempt deadline) *before any message reached the caller* moves on
to the next replica or candidate; INVALID_ARGUMENT and other caller errors are never retried.
Once a message has been streamed, a failure ends the stream with UNAVAILABLE naming the expert
and the cause, because replaying would duplicate text the caller already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from expertmesh.config import ExpertConfig, RoutingConfig
from expertmesh.errors import Unavailable
from expertmesh.telemetry import Attempt, attempt_span, record_ejection
from expertmesh.v1 import expertmesh_pb2 as pb

from .health import ExpertLink
from .pool import Pool
from .router import Route

log = logging.getLogger(__name__)

#: Codes that mean "this replica cannot take it now, another one may".
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
#: Taken off the caller's deadline so that the gateway, not the caller, sees an expert time out.
DEADLINE_MARGIN_S = 0.05
#: Metadata passed on to the expert as is.
PASSTHROUGH = ("x-request-id",)


def ordered_replicas(links: Sequence[ExpertLink], panic: bool = False) -> list[ExpertLink]:
    """Available replicas (all of them in panic mode), least outstanding first (stable order)."""
    return sorted((link for link in links if panic or link.available()), key=lambda link: link.outstanding)


class Forwarder:
    """Runs the attempts for one request and keeps the record the explanation is built from."""

    def __init__(
        self,
        request: pb.GenerateRequest,
        route: Route,
        pool: Pool,
        routing: RoutingConfig,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.request = request
        self.route = route
        self.pool = pool
        self.routing = routing
        self.context = context
        self.decision = route.decision()

    def _attempt(self, link: ExpertLink | ExpertConfig, outcome: str) -> None:
        address = link.address if isinstance(link, ExpertLink) else ""
        self.decision.attempts.add(expert_id=link.expert_id, address=address, outcome=outcome)

    def summary(self) -> str:
        """``a@host:port: UNAVAILABLE: ...; b@host:port: ok``."""
        return "; ".join(f"{a.expert_id}@{a.address}: {a.outcome}" for a in self.decision.attempts)

    def _timeout(self) -> float | None:
        remaining = self.context.time_remaining()
        return None if remaining is None else max(remaining - DEADLINE_MARGIN_S, 0.001)

    def _others_available(self, link: ExpertLink, experts: Sequence[ExpertConfig]) -> bool:
        return any(
            other is not link and other.available()
            for e in experts
            for other in self.pool.replicas.get(e.expert_id, [])
        )

    def _warm_later(self, index: int) -> bool:
        return any(
            other.available() and other.engine_ready
            for e in self.route.experts[index + 1 :]
            for other in self.pool.replicas.get(e.expert_id, [])
        )

    async def stream(self) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the answer of the first replica that takes the request."""
        experts = self.route.experts
        # Panic mode, as Envoy's: when no candidate looks available (health can lag, e.g. pings
        # answered late on an overloaded host), try them all rather than fail without trying.
        # A dead replica refuses at once; the attempts say what happened.
        panic = not any(link.available() for e in experts for link in self.pool.replicas.get(e.expert_id, []))
        for index, expert in enumerate(experts):
            links = ordered_replicas(self.pool.replicas.get(expert.expert_id, []), panic)
            if not links:
                self._attempt(expert, "skipped: no replica SERVING" + _ejected(self.pool, expert))
                continue
            for link in links:
                cold = expert.load == "lazy" and not link.engine_ready
                if (
                    cold
                    and self.routing.loading_policy == "fallback_while_loading"
                    and self._warm_later(index)
                ):
                    _start_loading(link)
                    self._attempt(link, "skipped: engine not loaded; loading it in the background")
                    break
                sent = 0
                with attempt_span(link.expert_id, link.address) as attempt:
                    async for msg in self._try(link, expert, experts, cold, attempt):
                        if sent == 0:
                            msg.route.CopyFrom(self.decision)
                            msg.route.expert_id, msg.route.address = link.expert_id, link.address
                        sent += 1
                        yield msg
                if sent:
                    return
        raise Unavailable(f"every expert for this request failed: {self.summary() or 'no candidate'}")

    async def _try(
        self,
        link: ExpertLink,
        expert: ExpertConfig,
        experts: Sequence[ExpertConfig],
        cold: bool,
        attempt: Attempt,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """One attempt. Yields the expert's messages; returns quietly when another may be tried."""
        metadata = tuple((k, v) for k, v in self.context.invocation_metadata() or () if k in PASSTHROUGH)
        call = link.mux.open(self.request, self._timeout(), attempt.metadata(metadata))
        link.outstanding += 1
        sent = 0
        try:
            iterator = call.__aiter__()
            # A cold lazy expert loads first; wait for that only as long as configured.
            first = await asyncio.wait_for(anext(iterator), self.routing.load_wait_s if cold else None)
            sent = 1
            yield first
            async for msg in iterator:
                sent += 1
                yield msg
            link.ejection.success()
            self._attempt(link, "ok")
        except StopAsyncIteration:
            link.ejection.success()
            self._attempt(link, "ok (empty stream)")
        except (asyncio.CancelledError, GeneratorExit):
            self._attempt(link, f"CANCELLED by the caller after {sent} messages")
            raise
        except TimeoutError:
            self._attempt(
                link, f"DEADLINE_EXCEEDED: engine still loading after {self.routing.load_wait_s:g} s"
            )
            attempt.set_outcome(grpc.StatusCode.DEADLINE_EXCEEDED, "engine still loading")
        except grpc.aio.AioRpcError as e:
            outcome = f"{e.code().name}: {e.details()}"
            self._attempt(link, outcome)
            attempt.set_outcome(e.code(), e.details() or "")
            if e.code() not in RETRYABLE:
                link.ejection.success()  # the replica answered properly; the request was bad
                raise
            if link.ejection.failure(may_eject=self._others_available(link, experts)):
                log.warning("expert %s at %s ejected: %s", link.expert_id, link.address, outcome)
                record_ejection(link.expert_id)
            if sent:
                raise Unavailable(
                    f"expert {link.expert_id} at {link.address} failed mid-stream: {outcome}"
                ) from None
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and (self._timeout() or 1) <= 0.001:
                raise  # the caller's own deadline is spent: nothing left to fail over with
        finally:
            link.outstanding -= 1
            call.cancel()  # no-op when finished; aborts the expert's request when we were cancelled


def _start_loading(link: ExpertLink) -> None:
    """Ask a cold lazy expert to load, without waiting; errors show up in its health and Info."""

    async def load() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await link.stub.Load(pb.LoadRequest(wait=False), timeout=5)

    task = asyncio.create_task(load())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


def _ejected(pool: Pool, expert: ExpertConfig) -> str:
    links = pool.replicas.get(expert.expert_id, [])
    ejected = [link.address for link in links if link.ejection.ejected()]
    health = ", ".join(f"{link.address} {link.health}" for link in links)
    return f" ({health}" + (f"; ejected: {', '.join(ejected)})" if ejected else ")")
