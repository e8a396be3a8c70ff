"""The expert's side of the gateway-expert link (:mod:`expertmesh.mux`).

:class:`Multiplexed` runs each stream of a ``Multiplex`` call through the servicer's own
``Generate``, with a :class:`StreamContext` standing in for the gRPC context (call metadata,
deadline, trailing metadata, abort), so validation, errors, telemetry and cancellation are
those of a ``Generate`` call.

The peer is not trusted: a frame without a kind, a chunk from the gateway or a stream id opened
twice ends the call with INVALID_ARGUMENT naming the frame (a well-behaved gateway sends none);
a bad ``timeout_s`` fails its stream; at most ``max_streams_per_link`` streams run at once on
one call (more are refused with RESOURCE_EXHAUSTED); a cancel that arrives with its open, or
before it, leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from expertmesh.config import LimitsConfig
from expertmesh.errors import ResourceExhausted, status_for, trailers_for
from expertmesh.mux import batches, end_frame, oversize
from expertmesh.v1 import expertmesh_pb2 as pb

#: Ids of streams cancelled before they were opened, remembered at most this many per call.
EARLY_CANCELS = 1024


class StreamAborted(grpc.aio.AbortError):
    """``StreamContext.abort``: the stream ends with this status (an AbortError, as gRPC's is)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class ProtocolError(Exception):
    """The gateway broke the link's protocol; the call ends with INVALID_ARGUMENT."""


class StreamContext:
    """What ``Generate`` and its decorators use of a ``grpc.aio.ServicerContext``, for one stream."""

    def __init__(self, opened: pb.StreamOpen) -> None:
        self._metadata = tuple(opened.metadata.items())
        self._deadline = time.monotonic() + opened.timeout_s if opened.timeout_s > 0 else None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.trailers: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata the gateway sent with the stream."""
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds left before the stream's deadline (None: no deadline)."""
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        """Sent with the stream's end, as a call's trailing metadata."""
        self.trailers = tuple(trailers)

    def code(self) -> grpc.StatusCode | None:
        """The status the stream was aborted with (None before)."""
        return self._code

    def details(self) -> str:
        """The message the stream was aborted with."""
        return self._details

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream with ``code`` and ``details``."""
        self._code, self._details = code, details
        raise StreamAborted(code, details)


def check_open(opened: pb.StreamOpen) -> str | None:
    """Why an open frame cannot start a stream, or None."""
    if not math.isfinite(opened.timeout_s) or opened.timeout_s < 0:
        return f"timeout_s must be a finite number of seconds >= 0 (0 = none), got {opened.timeout_s}"
    return None


GenerateHandler = Callable[[pb.GenerateRequest, Any], AsyncIterator[pb.GenerateResponse]]


class Multiplexed:
    """Mixin for an Expert servicer: ``Multiplex`` runs each stream through ``self.Generate``.

    ``drain()`` (at shutdown) refuses new streams with UNAVAILABLE, so the gateway fails them
    over, and ends each call once its streams have finished. ``link_limits`` and
    ``max_streams_per_link`` may be set by the servicer.
    """

    Generate: GenerateHandler
    link_limits: LimitsConfig = LimitsConfig()
    max_streams_per_link: int = 2048
    _draining: asyncio.Event | None = None

    def drain(self) -> None:
        """Take no new streams; end every call when its last stream has finished."""
        self._drain_event().set()

    def draining(self) -> bool:
        """True once :meth:`drain` was called."""
        return self._draining is not None and self._draining.is_set()

    def _drain_event(self) -> asyncio.Event:
        if self._draining is None:
            self._draining = asyncio.Event()
        return self._draining

    async def Multiplex(
        self, request_iterator: AsyncIterator[pb.StreamBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamBatch]:
        """The expert's side of one gateway's call."""
        draining = self._drain_event()
        limits = self.link_limits
        out: asyncio.Queue[pb.StreamFrame | None] = asyncio.Queue()
        running: dict[int, asyncio.Task[None]] = {}
        early_cancels: dict[int, None] = {}  # insertion-ordered, bounded
        input_ended = False

        def end_if_idle() -> None:
            # Draining, or the gateway half-closed (grpcurl does after its requests), and
            # nothing left running: end the call (None tells the writer below).
            if (draining.is_set() or input_ended) and not running:
                out.put_nowait(None)

        async def run(stream_id: int, opened: pb.StreamOpen) -> None:
            ctx = StreamContext(opened)
            try:
                async with asyncio.timeout(ctx.time_remaining()):
                    async for msg in self.Generate(opened.request, ctx):
                        frame = pb.StreamFrame(stream_id=stream_id, chunk=msg)
                        refused = oversize("a response message", frame, limits)
                        if refused:
                            raise ResourceExhausted(refused)
                        out.put_nowait(frame)
                out.put_nowait(end_frame(stream_id, grpc.StatusCode.OK))
            except StreamAborted as e:
                out.put_nowait(end_frame(stream_id, e.code, e.details, ctx.trailers))
            except TimeoutError:
                out.put_nowait(end_frame(stream_id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            except Exception as e:  # a handler without @grpc_errors: the same table decides
                out.put_nowait(end_frame(stream_id, *status_for(e), trailers_for(e)))

        def finished(stream_id: int, task: asyncio.Task[None]) -> None:
            # A done callback, not a finally in run(): a task cancelled before it ever ran
            # (its cancel came in the same batch as its open) never enters run().
            if running.get(stream_id) is task:
                del running[stream_id]
            end_if_idle()

        def start(stream_id: int, opened: pb.StreamOpen) -> None:
            if stream_id in running:
                raise ProtocolError(f"stream {stream_id} was opened twice")
            if stream_id in early_cancels:
                del early_cancels[stream_id]
                return  # cancelled before it was opened: nothing to run, nothing to answer
            refused = check_open(opened)
            if refused is None and draining.is_set():
                out.put_nowait(
                    end_frame(stream_id, grpc.StatusCode.UNAVAILABLE, "the expert is shutting down")
                )
                return
            if refused is None and len(running) >= self.max_streams_per_link:
                error = ResourceExhausted(
                    f"this link already carries {len(running)} streams (max_streams_per_link)"
                )
                out.put_nowait(end_frame(stream_id, error.code, str(error), error.trailers))
                return
            if refused is not None:
                out.put_nowait(end_frame(stream_id, grpc.StatusCode.INVALID_ARGUMENT, refused))
                return
            task = running[stream_id] = asyncio.create_task(run(stream_id, opened))
            task.add_done_callback(lambda t: finished(stream_id, t))

        def cancel(stream_id: int) -> None:
            task = running.get(stream_id)
            if task is not None:
                task.cancel()
                return
            early_cancels[stream_id] = None
            while len(early_cancels) > EARLY_CANCELS:
                del early_cancels[next(iter(early_cancels))]

        async def read() -> None:
            nonlocal input_ended
            async for batch in request_iterator:
                for frame in batch.frames:
                    kind = frame.WhichOneof("kind")
                    if kind == "open":
                        start(frame.stream_id, frame.open)
                    elif kind == "end":
                        cancel(frame.stream_id)
                    else:
                        raise ProtocolError(
                            f"frame {kind or 'without a kind'} for stream {frame.stream_id}: "
                            f"the gateway sends only open and end frames"
                        )
            input_ended = True
            end_if_idle()

        async def wake_on_drain() -> None:
            await draining.wait()
            end_if_idle()

        reader = asyncio.create_task(read())
        helpers = [reader, asyncio.create_task(wake_on_drain())]
        reader.add_done_callback(
            lambda t: None if t.cancelled() or t.exception() is None else out.put_nowait(None)
        )
        try:
            while True:
                frame = await out.get()
                frames = []
                while frame is not None:
                    frames.append(frame)
                    if out.empty():
                        break
                    frame = out.get_nowait()
                for batch in batches(frames, limits):
                    yield pb.StreamBatch(frames=batch)
                if frame is None:
                    break  # draining or half-closed and nothing left running, or the reader failed
        finally:
            for task in [*helpers, *running.values()]:
                task.cancel()
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            error = reader.exception()
            if isinstance(error, ProtocolError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"link protocol error: {error}")
            assert error is not None
            raise error
