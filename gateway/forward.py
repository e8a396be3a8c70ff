"""Forward one request along its route, failing over before the first token.

Candidates are tried in the route plan's order (:mod:`.plan`): within an expert, its available
replicas by least outstanding requests, the one holding the request's prefix first when
``routing.affinity`` says so (:mod:`.affinity`). What an attempt's failure means is decided here, once:

- the replica's own failure (it is unreachable or died, UNAVAILABLE, INTERNAL, UNKNOWN, no
  first message within ``routing.first_token_timeout_s``): counted toward its ejection, and
  the next replica or candidate is tried;
- not the replica's fault, but another may serve (RESOURCE_EXHAUSTED: full; an expert-specific
  refusal: its context is too small, it has no chat template): the next is tried, nothing counted;
- the request's or the caller's doing (INVALID_ARGUMENT, NOT_FOUND, ...; the caller's deadline
  or cancel): the stream ends with that status at once, nothing counted.

When every candidate failed, the caller gets the status they all agree on (every one full:
RESOURCE_EXHAUSTED with retry pushback; every one refused the request: that refusal), else
UNAVAILABLE with every attempt's outcome. The caller's deadline is DEADLINE_EXCEEDED wherever
it hits. When the replica fails after the first message, the stream is resumed on another
(:mod:`.resume`), or ends UNAVAILABLE naming the expert and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from expertmesh.config import ExpertConfig, RoutingConfig
from expertmesh.errors import (
    DeadlineExceeded,
    ExpertLimit,
    MeshError,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from expertmesh.telemetry import Attempt, attempt_span, record_ejection
from expertmesh.v1 import expertmesh_pb2 as pb

from . import resume
from .call import CallContext
from .ejection import may_eject_replica
from .link import ExpertLink
from .outcome import ELSEWHERE, REPLICA_FAULTS, MidStream, Tried, expert_specific
from .plan import Plan
from .pool import Pool

log = logging.getLogger(__name__)

#: Taken off the caller's deadline so that the gateway, not the caller, sees an expert time out.
DEADLINE_MARGIN_S = 0.05
#: Metadata passed on to the expert as is.
PASSTHROUGH = ("x-request-id",)


class Forwarder:
    """Runs the attempts for one request and keeps the record the explanation is built from."""

    def __init__(
        self,
        request: pb.GenerateRequest,
        plan: Plan[ExpertLink],
        pool: Pool,
        routing: RoutingConfig,
        context: CallContext,
    ) -> None:
        self.request = request
        self.plan = plan
        self.route = route = plan.route
        self.pool = pool
        self.routing = routing
        self.context = context
        self.decision = route.decision()
        self.failures: list[tuple[grpc.StatusCode, str]] = []  # attempts that failed, and how
        self.streamed = resume.Streamed()  # what the caller has had, should a resume need it
        self.hedge_lost = False
        self.keep_streamed = resume.policy(routing, route.domain) != "off" and routing.max_resumes > 0

    def _attempt(self, link: ExpertLink | ExpertConfig, outcome: str) -> None:
        address = link.address if isinstance(link, ExpertLink) else ""
        self.decision.attempts.add(expert_id=link.expert_id, address=address, outcome=outcome)

    def summary(self) -> str:
        """``a@host:port: UNAVAILABLE: ...; b@host:port: ok``."""
        return "; ".join(f"{a.expert_id}@{a.address}: {a.outcome}" for a in self.decision.attempts)

    def _timeout(self) -> float | None:
        remaining = self.context.time_remaining()
        return None if remaining is None else max(remaining - DEADLINE_MARGIN_S, 0.001)

    def _deadline_spent(self) -> bool:
        remaining = self.context.time_remaining()
        return remaining is not None and remaining <= DEADLINE_MARGIN_S

    def _may_eject(self, link: ExpertLink, experts: Sequence[ExpertConfig]) -> bool:
        candidates = (other for e in experts for other in self.pool.of(e.expert_id))
        return may_eject_replica(
            link, self.pool.of(link.expert_id), candidates, self.routing.max_ejection_percent
        )

    def _count_failure(self, link: ExpertLink, experts: Sequence[ExpertConfig], outcome: str) -> None:
        if link.ejection.failure(may_eject=self._may_eject(link, experts)):
            log.warning("expert %s at %s ejected: %s", link.expert_id, link.address, outcome)
            record_ejection(link.expert_id)

    def _final_error(self) -> MeshError:
        """What the caller gets when no candidate served (see the module docstring)."""
        summary = self.summary() or "no candidate"
        if self._deadline_spent():
            return DeadlineExceeded(f"deadline exceeded before any expert answered: {summary}")
        codes = {code for code, _ in self.failures}
        if codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}:
            return ResourceExhausted(f"every expert for this request is full: {summary}")
        if codes and codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED}:
            code, details = self.failures[-1]
            refusal = ExpertLimit if code == grpc.StatusCode.INVALID_ARGUMENT else Unimplemented
            return refusal(f"no expert for this request can serve it: {details} ({summary})")
        return Unavailable(f"every expert for this request failed: {summary}")

    async def stream(self) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the answer of the first replica that takes the request, resumed elsewhere if
        that replica fails mid-stream (:mod:`.resume`)."""
        try:
            async for msg in self._first():
                yield msg
            return
        except MidStream as cut:
            fault = cut
        while True:
            try:
                async for msg in self._resume(fault):
                    yield msg
                return
            except MidStream as cut:
                fault = cut

    async def _first(self) -> AsyncIterator[pb.GenerateResponse]:
        """The plan's steps in order (:mod:`.plan`), until one serves."""
        for index, step in enumerate(self.plan.steps):
            link = step.replica
            if step.skip:
                if step.load and link is not None:
                    _start_loading(link)
                self._attempt(link or step.expert, step.skip)
                continue
            assert link is not None
            tried = Tried()
            hedge = None if step.cold else self.plan.hedge_target(index)
            attempts = self._attempt_at(link, step.expert, step.cold, self.request, tried)
            if hedge is not None and self.routing.hedge_after_ms is not None:
                assert hedge.replica is not None
                attempts = self._hedged(attempts, tried, hedge.expert, hedge.replica)
            async for msg in attempts:
                yield msg
            if tried.served:
                return
        raise self._final_error()

    async def _hedged(
        self,
        primary: AsyncIterator[pb.GenerateResponse],
        tried: Tried,
        expert: ExpertConfig,
        link: ExpertLink,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """``primary``, unless it sends nothing for ``hedge_after_ms``: then also ``link``, and
        whichever sends its first message first goes on; the other is cancelled (its engine
        request aborted)."""
        assert self.routing.hedge_after_ms is not None
        runners = {asyncio.ensure_future(anext(primary)): primary}
        _, pending = await asyncio.wait(runners, timeout=self.routing.hedge_after_ms / 1000)
        if pending:
            second = self._attempt_at(link, expert, False, self.request, tried)
            runners[asyncio.ensure_future(anext(second))] = second
        winner: AsyncIterator[pb.GenerateResponse] | None = None
        first: pb.GenerateResponse | None = None
        try:
            while runners and winner is None:
                done, _ = await asyncio.wait(runners, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    attempt = runners.pop(task)
                    if task.exception() is None:
                        winner, first = attempt, task.result()
                        break
                    if not isinstance(task.exception(), StopAsyncIteration):
                        raise task.exception()  # type: ignore[misc]  # the request's own failure
                    if tried.served:  # an empty stream that ended OK: served, nothing to hedge
                        return
        finally:
            self.hedge_lost = True  # what the loser's attempt records as its outcome
            for task, attempt in runners.items():  # the loser: cancelled, its request aborted
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                await attempt.aclose()  # type: ignore[attr-defined]
            self.hedge_lost = False
        if winner is None or first is None:
            return  # both ended before a message: the caller reads ``tried``
        attempts = first.route.attempts  # the explanation as it is now, the loser included
        del attempts[:]
        attempts.extend(self.decision.attempts)
        yield first
        async for msg in winner:
            yield msg

    async def _resume(self, fault: MidStream) -> AsyncIterator[pb.GenerateResponse]:
        """Go on after ``fault`` on the best resume target that takes it; else end UNAVAILABLE."""
        mode = resume.policy(self.routing, self.route.domain)
        ended = f"expert {fault.link.expert_id} at {fault.link.address} failed mid-stream: {fault.outcome}"
        if mode == "off" or self._deadline_spent():
            raise Unavailable(ended)
        if len(self.decision.seams) >= self.routing.max_resumes:
            raise Unavailable(f"{ended} (after {len(self.decision.seams)} resumes, routing.max_resumes)")
        for expert, link, same_model in resume.targets(self.pool, self.route.experts, fault.link, mode):
            self.decision.seams.add(
                expert_id=fault.link.expert_id,
                address=fault.link.address,
                tokens_streamed=len(self.streamed.token_ids),
                cause=fault.outcome,
                resumed_expert_id=link.expert_id,
                resumed_address=link.address,
            )
            request = self.streamed.continuation(self.request, same_model)
            tried = Tried()
            async for msg in self._attempt_at(link, expert, False, request, tried):
                msg.request_id = ""  # the caller had it with the first message
                yield msg
            if tried.served:
                return
            del self.decision.seams[-1]  # it did not take it (its attempt says why): the next may
        raise Unavailable(f"{ended}; no replica to resume on ({mode})")

    async def _attempt_at(
        self, link: ExpertLink, expert: ExpertConfig, cold: bool, request: pb.GenerateRequest, tried: Tried
    ) -> AsyncIterator[pb.GenerateResponse]:
        """One attempt, its span, and the route explanation on its first message; ``tried``
        says whether it served."""
        first = True
        with attempt_span(link.expert_id, link.address) as attempt:
            async for msg in self._try(link, self.route.experts, cold, attempt, request, tried):
                if first:
                    msg.route.CopyFrom(self.decision)
                    msg.route.expert_id, msg.route.address = link.expert_id, link.address
                    first = False
                if self.keep_streamed:
                    self.streamed.add(msg)
                yield msg

    async def _try(
        self,
        link: ExpertLink,
        experts: Sequence[ExpertConfig],
        cold: bool,
        attempt: Attempt,
        request: pb.GenerateRequest,
        tried: Tried,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """One attempt. Yields the expert's messages; returns quietly, ``tried.served`` telling
        whether the stream ended OK (an empty one too) or another may be tried; MidStream when
        the replica failed after its first message."""
        metadata = tuple((k, v) for k, v in self.context.invocation_metadata() or () if k in PASSTHROUGH)
        call = link.mux.open(request, self._timeout(), attempt.metadata(metadata))
        link.outstanding += 1
        sent = 0
        # A cold lazy expert loads first: wait for that as long as configured; a loaded one
        # that sends nothing for first_token_timeout_s is hung, as far as this request goes.
        first_wait = self.routing.load_wait_s if cold else self.routing.first_token_timeout_s
        try:
            iterator = call.__aiter__()
            first = await asyncio.wait_for(anext(iterator), first_wait)
            sent = 1
            yield first
            async for msg in iterator:
                sent += 1
                yield msg
            link.ejection.success()
            tried.served = True
            self._attempt(link, "ok")
        except StopAsyncIteration:
            link.ejection.success()
            tried.served = True
            self._attempt(link, "ok (empty stream)")
        except (asyncio.CancelledError, GeneratorExit):
            if self.hedge_lost:
                self._attempt(link, "cancelled: the hedge on another replica answered first")
            else:
                self._attempt(link, f"CANCELLED by the caller after {sent} messages")
            raise
        except TimeoutError:
            if cold:
                outcome = f"DEADLINE_EXCEEDED: engine still loading after {first_wait:g} s"
            else:
                outcome = (
                    f"UNAVAILABLE: no first message within {first_wait:g} s (routing.first_token_timeout_s)"
                )
                self._count_failure(link, experts, outcome)
            self._attempt(link, outcome)
            self.failures.append((grpc.StatusCode.UNAVAILABLE, outcome))
            attempt.set_outcome(grpc.StatusCode.DEADLINE_EXCEEDED, outcome)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            outcome = f"{code.name}: {e.details()}"
            self._attempt(link, outcome)
            attempt.set_outcome(code, e.details() or "")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED or self._deadline_spent():
                # The stream's deadline is the caller's (less a margin): it has passed.
                where = f"mid-stream at expert {link.expert_id}" if sent else f"at expert {link.expert_id}"
                raise DeadlineExceeded(f"deadline exceeded {where} after {sent} messages") from None
            if code in REPLICA_FAULTS:
                self._count_failure(link, experts, outcome)
                if sent:
                    raise MidStream(link, outcome) from None
            elif sent or not (code in ELSEWHERE or expert_specific(e)):
                # The request's (or its caller's) doing, e.g. a caller that did not read: as is.
                link.ejection.success()
                raise
            self.failures.append((code, e.details() or code.name))
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
