"""The expert's ``expert.load`` span and load-time metric."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from . import metrics
from .requests import current_request
from .tracing import tracer

L = TypeVar("L", bound=Callable[..., Any])


def traced_load(load: L) -> L:
    """Decorate ``EngineHost.load`` (``self.cfg`` an ExpertConfig): span ``expert.load``, load metric."""

    @functools.wraps(load)
    async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        cfg = self.cfg
        req = current_request()  # a lazy load started by a request belongs to its trace
        span = tracer().start_span(
            "expert.load",
            context=req.context if req is not None else Context(),
            attributes={"expertmesh.expert_id": cfg.expert_id, "gen_ai.request.model": cfg.model_path},
        )
        started = time.monotonic()
        outcome = "ok"
        try:
            # Current (a coroutine, so attach and detach share one context): vLLM's own loading
            # spans, in this process and in the engine processes it spawns, become its children.
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                return await load(self, *args, **kwargs)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except BaseException as exc:
            outcome = "failed"
            if span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            seconds = time.monotonic() - started
            metrics.record_model_load(cfg.expert_id, seconds, outcome)
            span.set_attribute("expertmesh.load.outcome", outcome)
            span.set_attribute("expertmesh.load.duration_s", round(seconds, 3))
            span.end()

    return traced  # type: ignore[return-value]
