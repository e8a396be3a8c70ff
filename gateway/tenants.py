"""Tenants at the gateway: which domains each may reach, and how much it may use.

Admission, per request, in this order: the route's domain (or pinned expert) must be one of the
tenant's domains, else PERMISSION_DENIED, and fallbacks into other domains are dropped from the
route; then its open streams must be under ``max_concurrent_streams``; then its tokens: the
request reserves ``max_tokens`` (the expert's default when unset) against the tenant's budget of
``tokens_per_minute`` over a sliding ``auth.rate_window_s`` window, and at the end of the stream
the reservation is replaced by what was really used (prompt + completion tokens), as Envoy AI
Gateway does. Over a limit: RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms`` saying when the
window will have room again.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from expertmesh.config import AuthConfig, TenantConfig
from expertmesh.contract import DEFAULT_MAX_TOKENS
from expertmesh.errors import InvalidRequest, PermissionDenied, RateLimited
from expertmesh.telemetry import current_request
from expertmesh.telemetry.metrics import TENANT_ADMISSIONS, TENANT_STREAMS, TENANT_TOKENS
from expertmesh.v1 import expertmesh_pb2 as pb

from .auth import DEFAULT_TENANT
from .router import Route

#: Pushback for a tenant at its stream limit: streams end at their own pace, so this is a guess.
STREAMS_RETRY_S = 0.5
#: Pushback when the window's room is held by streams still running (they settle when they end).
RESERVED_RETRY_S = 1.0
Clock = Callable[[], float]


@dataclass
class TenantState:
    """One tenant's open streams, in-flight reservations and charged tokens."""

    name: str
    config: TenantConfig
    window_s: float
    clock: Clock = time.monotonic
    streams: int = 0
    reserved: int = 0
    charged: deque[tuple[float, int]] = field(default_factory=deque)

    @property
    def budget(self) -> int | None:
        """Tokens the tenant may use in one window; None = unbounded."""
        rate = self.config.tokens_per_minute
        return None if rate is None else max(int(rate * self.window_s / 60.0), 1)

    def _expire(self, now: float) -> None:
        while self.charged and self.charged[0][0] <= now - self.window_s:
            self.charged.popleft()

    def used(self) -> int:
        """Tokens charged in the current window plus those reserved by open streams."""
        self._expire(self.clock())
        return sum(n for _, n in self.charged) + self.reserved

    def _retry_after(self, want: int, budget: int, now: float) -> float:
        """Seconds until ``want`` more fits, as charged tokens leave the window."""
        over = sum(n for _, n in self.charged) + self.reserved + want - budget
        for at, n in self.charged:
            over -= n
            if over <= 0:
                return max(at + self.window_s - now, 0.001)
        return RESERVED_RETRY_S

    def admit(self, want: int, defaulted: bool = False) -> Lease:
        """Reserve ``want`` tokens and a stream, or raise RateLimited / InvalidRequest.

        ``defaulted``: the request left max_tokens unset and ``want`` is the expert's default."""
        limit = self.config.max_concurrent_streams
        if limit is not None and self.streams >= limit:
            TENANT_ADMISSIONS.labels(self.name, "streams").inc()
            raise RateLimited(
                f"tenant {self.name} has {self.streams} streams open (max_concurrent_streams {limit})",
                STREAMS_RETRY_S,
            )
        budget = self.budget
        if budget is not None:
            if want > budget:
                unset = " (unset: the default)" if defaulted else ""
                raise InvalidRequest(
                    f"sampling.max_tokens {want}{unset} is more than tenant {self.name} may use in "
                    f"{self.window_s:g} s ({budget} tokens at tokens_per_minute "
                    f"{self.config.tokens_per_minute})"
                )
            now = self.clock()
            used = self.used()
            if used + want > budget:
                TENANT_ADMISSIONS.labels(self.name, "tokens").inc()
                raise RateLimited(
                    f"tenant {self.name} is over its token rate: {used} of {budget} tokens used or reserved "
                    f"in the last {self.window_s:g} s (tokens_per_minute {self.config.tokens_per_minute}), "
                    f"this request reserves {want}",
                    self._retry_after(want, budget, now),
                )
        self.streams += 1
        self.reserved += want
        TENANT_ADMISSIONS.labels(self.name, "admitted").inc()
        TENANT_STREAMS.labels(self.name).inc()
        return Lease(self, want)


@dataclass
class Lease:
    """One admitted stream: its reservation, settled with the real usage when it ends."""

    tenant: TenantState | None
    reserved: int = 0
    streamed_tokens: int = 0
    usage: int | None = None
    closed: bool = False

    def observe(self, msg: pb.GenerateResponse) -> None:
        """Count one streamed message; the last one carries the real usage."""
        self.streamed_tokens += len(msg.token_ids)
        if msg.HasField("usage"):
            self.usage = msg.usage.prompt_tokens + msg.usage.completion_tokens

    def close(self) -> None:
        """Release the stream; charge the real usage (what was streamed, if the end never came)."""
        if self.closed or self.tenant is None:
            return
        self.closed = True
        t = self.tenant
        t.streams -= 1
        t.reserved -= self.reserved
        used = self.usage if self.usage is not None else self.streamed_tokens
        if used:
            t.charged.append((t.clock(), used))
            TENANT_TOKENS.labels(t.name).inc(used)
        TENANT_STREAMS.labels(t.name).dec()


class Tenants:
    """Every tenant's state; ``apply`` takes a reloaded auth config and keeps the counters."""

    def __init__(self, auth: AuthConfig | None, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.states: dict[str, TenantState] = {}
        self.apply(auth)

    def apply(self, auth: AuthConfig | None) -> None:
        """Use new limits; open streams and charged tokens carry over."""
        self.auth = auth or AuthConfig()
        for name, state in self.states.items():
            state.config = self.auth.tenants.get(name, TenantConfig())
            state.window_s = self.auth.rate_window_s

    def state(self, name: str) -> TenantState:
        """The tenant's state; PERMISSION_DENIED for a tenant no longer in auth.tenants.

        Tokens name tenants that auth.tenants declares (checked when the file is read); one
        removed from the config by a reload must lose its access, not its limits.
        """
        if name != DEFAULT_TENANT and name not in self.auth.tenants:
            raise PermissionDenied(f"tenant {name} is not in auth.tenants")
        if name not in self.states:
            self.states[name] = TenantState(
                name, self.auth.tenants.get(name, TenantConfig()), self.auth.rate_window_s, self.clock
            )
        return self.states[name]

    def permit(self, name: str | None, request: pb.GenerateRequest, route: Route) -> Route:
        """The route, limited to the tenant's domains; PERMISSION_DENIED outside them."""
        if name is None:
            return route
        req = current_request()
        if req is not None and req.span.is_recording():
            req.span.set_attribute("expertmesh.tenant", name)
        allowed = self.state(name).config.domains
        if not allowed:
            return route
        if route.domain not in allowed:
            TENANT_ADMISSIONS.labels(name, "domain").inc()
            what = (
                f"expert {request.expert_id!r} (domain {route.domain!r})"
                if request.expert_id
                else (f"domain {route.domain!r}")
            )
            raise PermissionDenied(f"tenant {name} may not use {what}; its domains: {', '.join(allowed)}")
        return dataclasses.replace(route, experts=tuple(e for e in route.experts if e.domain in allowed))

    def admit(self, name: str | None, request: pb.GenerateRequest) -> Lease:
        """Reserve a stream and ``max_tokens`` for the tenant (a no-op lease when auth is off)."""
        if name is None:
            return Lease(None)
        s = request.sampling
        given = s.HasField("max_tokens")
        return self.state(name).admit(s.max_tokens if given else DEFAULT_MAX_TOKENS, defaulted=not given)
