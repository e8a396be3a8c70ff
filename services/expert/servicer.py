"""expertmesh.v1.Expert: Generate, Info, Load, Unload and Tokenize over one expert's lifecycle."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from expertmesh.config import LimitsConfig
from expertmesh.errors import InvalidRequest, ResourceExhausted, Unavailable, grpc_errors
from expertmesh.muxserve import Multiplexed
from expertmesh.telemetry import expert_generate, trace_headers
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc
from expertmesh.validation import check_request

from .lifecycle import FAILED, READY, Lifecycle
from .proctree import tree_rss
from .prompt import Prompts
from .request import engine_prompt, fit_max_tokens, sampling_params
from .sampling_defaults import SamplingDefaults, default_max_tokens, with_defaults
from .stream import Chunker, stream_interval


def describe(life: Lifecycle) -> pb.InfoResponse:
    """The expert's Info: model, settings, state, load facts, activity."""
    cfg = life.cfg
    engine = life.engine
    return pb.InfoResponse(
        expert_id=cfg.expert_id,
        domain=cfg.domain,
        model_path=cfg.model_path,
        dtype=cfg.dtype,
        quantization=cfg.quantization or "",
        max_model_len=life.max_model_len or 0,
        state=life.state,  # type: ignore[arg-type]
        load_seconds=life.load_seconds,
        last_error=life.last_error,
        requests_in_flight=life.in_flight,
        engine_unfinished_requests=engine.get_num_unfinished_requests() if engine is not None else 0,
        load_count=life.load_count,
        idle_seconds=life.idle_seconds,
        memory_bytes=tree_rss(),
        unload_reason=life.unload_reason,
        load_mode=cfg.load,
    )


def _admit(life: Lifecycle, engine: Any) -> None:
    """RESOURCE_EXHAUSTED when the engine already holds ``max_queue`` requests.

    vLLM enforces the same limit (max_num_queued_reqs); checking first gives the caller the
    expert and the limit instead of vLLM's generic "busy" text.
    """
    limit = life.cfg.max_queue
    if limit is not None and engine.get_num_unfinished_requests() >= limit:
        raise ResourceExhausted(
            f"expert {life.cfg.expert_id} is full: {limit} requests running or queued (max_queue); "
            f"retry later or on another expert"
        )


def _time_limit(
    engine: Any, engine_request_id: str, sampling: pb.SamplingParams, chunker: Chunker
) -> asyncio.TimerHandle | None:
    """``sampling.time_limit_s``: abort the engine request when it is up; the stream then ends
    normally, with what was generated and ``finish_reason: "time_limit"``."""
    if not sampling.HasField("time_limit_s"):
        return None

    def expire() -> None:
        chunker.time_limited = True
        task = asyncio.ensure_future(engine.abort(engine_request_id))
        _aborts.add(task)
        task.add_done_callback(_aborts.discard)

    return asyncio.get_running_loop().call_later(sampling.time_limit_s, expire)


_aborts: set[asyncio.Future[None]] = set()


class ExpertServicer(Multiplexed, pb_grpc.ExpertServicer):
    """Serves one expert. Requests are validated (and measured against the context) before the
    engine, or a lazy load, is involved; the engine only ever sees requests it can run.
    ``Multiplex`` (the gateway's link) runs each of its streams through ``Generate``."""

    def __init__(self, life: Lifecycle, prompts: Prompts, limits: LimitsConfig | None = None) -> None:
        self.life = life
        self.prompts = prompts
        self.link_limits = limits or LimitsConfig()
        self.max_streams_per_link = life.cfg.max_streams_per_link
        self.defaults = SamplingDefaults()

    @grpc_errors
    @expert_generate
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        life = self.life
        if self.draining():  # stopping: the caller (the gateway) goes elsewhere
            raise Unavailable(f"expert {life.cfg.expert_id} is shutting down")
        kwargs = check_request(request, self.link_limits)  # sizes first: before tokenizing
        resume = request.resume if request.HasField("resume") else None
        base_ids, token_ids, owed = await self.prompts.prepare(request.prompt, request.messages, resume)
        if life.max_model_len:  # known before any load when configured: fail without loading
            fit_max_tokens(len(base_ids), request.sampling, life.max_model_len)
        request_id = request.request_id or uuid.uuid4().hex
        with life.use():
            was_ready, started = life.state == READY, time.monotonic()
            engine = await life.ensure_ready()
            waited = 0.0 if was_ready else time.monotonic() - started
            assert life.max_model_len is not None  # known once loaded
            _admit(life, engine)
            if not engine.get_num_unfinished_requests():
                life.progress_at = time.monotonic()  # the stall watchdog counts from here
            defaults = self.defaults.of(engine)  # the model's generation_config, under the request's
            kwargs = with_defaults(kwargs, defaults)
            # A continuation gets what the whole request would have had, less what was streamed.
            done = resume.completion_tokens if resume is not None else 0
            room = fit_max_tokens(
                len(base_ids), request.sampling, life.max_model_len, default_max_tokens(defaults)
            )
            max_tokens = room - done
            if max_tokens <= 0:
                raise InvalidRequest(f"resume.completion_tokens is {done}: nothing is left to generate")
            interval = stream_interval(life.in_flight, life.cfg.stream_interval)
            if interval > 1:  # coalesce tokens into fewer messages while many streams run
                kwargs = {**kwargs, "stream_interval": interval}
            params = sampling_params(kwargs, max_tokens)
            chunker = Chunker(life.cfg.expert_id, request_id, len(base_ids), kwargs.get("logprobs"))
            chunker.completion_tokens = done
            # The engine's id is unique even when a caller reuses request_id for concurrent calls.
            engine_request_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
            # Cancelling this handler (client cancel, deadline, shutdown) raises CancelledError
            # inside engine.generate, which aborts the engine request.
            stream = engine.generate(
                engine_prompt(token_ids),
                params,
                engine_request_id,
                trace_headers=trace_headers(engine),
            )
            limit = _time_limit(engine, engine_request_id, request.sampling, chunker)
            try:
                async for out in stream:
                    life.progress_at = time.monotonic()
                    msg = chunker.chunk(out)
                    if owed:  # what the failed replica had not sent yet leads the stream
                        msg.text, owed = owed + msg.text, ""
                    if waited:
                        msg.load_wait_seconds, waited = waited, 0.0
                    yield msg
            except Exception as e:
                if life.check_engine():  # the engine died under this request: say whose and why
                    raise Unavailable(life.failure()) from e
                raise
            finally:
                if limit is not None:
                    limit.cancel()

    @grpc_errors
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return describe(self.life)

    @grpc_errors
    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        # A FAILED expert answers UNAVAILABLE (as Generate does), so callers fail over the same way
        # whichever RPC they used; the message carries the original cause.
        if self.life.state == FAILED:
            raise Unavailable(self.life.failure())
        if request.wait:
            await self.life.ensure_ready(wait_initial=True)
        else:
            self.life.start_load()
        return describe(self.life)

    @grpc_errors
    async def Unload(self, request: pb.UnloadRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        task = self.life.request_unload(request.reason or "Unload requested")
        if task is not None:
            await asyncio.shield(task)
        return describe(self.life)

    @grpc_errors
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        token_ids = await self.prompts.token_ids(request.prompt, request.messages)
        return pb.TokenizeResponse(
            token_ids=token_ids, count=len(token_ids), max_model_len=self.life.max_model_len or 0
        )
