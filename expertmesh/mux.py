"""The gateway-expert link: many Generate streams over one ``Expert/Multiplex`` call.

One gRPC call per request costs both processes an HTTP/2 stream, headers, trailers and a
deadline timer each, and every engine step's tokens leave the expert as one message per stream.
On a small host that CPU comes out of the engine's share. Over ``Multiplex`` the gateway keeps
one call per replica open; each request is a stream of frames in it (``open``, ``chunk``\\*,
``end``), and the expert sends every frame that is ready at once in one batch.

The gateway side (:class:`Multiplexer`) hands out :class:`MuxStream` objects that behave as a
``Generate`` call does for the forwarder: iterate for the messages, ``grpc.aio.AioRpcError``
with the expert's status on failure, a deadline, ``cancel()``. When the call itself fails (the
expert died, or cannot be reached) every stream on it fails with that call's status, and the
next request opens a new call. The expert side (:class:`Multiplexed`) runs each stream through
the servicer's own ``Generate``, with a :class:`StreamContext` standing in for the gRPC context
(call metadata, deadline, abort), so validation, errors, telemetry and cancellation are those
of a ``Generate`` call.

Flow control is per call, not per stream: a caller that reads slowly holds its stream's
messages in the gateway (at most ``max_tokens`` tokens) without slowing the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from expertmesh.errors import status_for
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: Frames per batch at most, so that a batch stays far below gRPC's 4 MiB message limit
#: (a frame holds one stream's tokens of one step: a few hundred bytes, ~10 KiB with logprobs).
MAX_FRAMES = 128


def _status_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a ``Generate`` call would have raised with this status."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _end(stream_id: int, code: grpc.StatusCode, details: str = "") -> pb.StreamFrame:
    return pb.StreamFrame(stream_id=stream_id, end=pb.StreamEnd(code=code.value[0], details=details))


# -- gateway side ---------------------------------------------------------------------------


class _Session:
    """One ``Multiplex`` call and the streams opened on it."""

    def __init__(self, stub: pb_grpc.ExpertStub) -> None:
        self.streams: dict[int, asyncio.Queue[pb.StreamFrame]] = {}
        self.closed = False
        self._outbox: list[pb.StreamFrame] = []
        self._wake = asyncio.Event()
        self.call = stub.Multiplex(self._outgoing())
        self._reader = asyncio.create_task(self._read())

    def send(self, frame: pb.StreamFrame) -> None:
        self._outbox.append(frame)
        self._wake.set()

    async def _outgoing(self) -> AsyncIterator[pb.StreamBatch]:
        while not self.closed:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                frames, self._outbox = self._outbox[:MAX_FRAMES], self._outbox[MAX_FRAMES:]
                yield pb.StreamBatch(frames=frames)

    async def _read(self) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "the expert closed the multiplexed call"
        try:
            async for batch in self.call:
                for frame in batch.frames:
                    queue = self.streams.get(frame.stream_id)
                    if queue is not None:
                        queue.put_nowait(frame)
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or code.name
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "the gateway is closing"
            raise
        finally:
            # Every stream still open ends with the call's status (a dead expert: UNAVAILABLE).
            self.closed = True
            self._wake.set()
            for stream_id, queue in self.streams.items():
                queue.put_nowait(_end(stream_id, code, details))

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class MuxStream:
    """One request's stream: iterate for its messages; a failure raises ``AioRpcError``."""

    def __init__(self, session: _Session, stream_id: int, timeout: float | None) -> None:
        self._session = session
        self._id = stream_id
        self._queue = session.streams[stream_id]
        self._done = False
        # One timer per stream, not a timeout around every message: at the deadline the stream
        # ends as a Generate call would, and the expert is told to stop.
        loop = asyncio.get_running_loop()
        self._timer = None if timeout is None else loop.call_later(timeout, self._expire)

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[pb.GenerateResponse]:
        while True:
            frame = await self._queue.get()
            if frame.HasField("chunk"):
                yield frame.chunk
                continue
            self._finish()
            if frame.end.code == 0:
                return
            raise _status_error(_CODES.get(frame.end.code, grpc.StatusCode.UNKNOWN), frame.end.details)

    def _finish(self) -> bool:
        if self._done:
            return False
        self._done = True
        self._session.streams.pop(self._id, None)
        if self._timer is not None:
            self._timer.cancel()
        return True

    def _expire(self) -> None:
        self._queue.put_nowait(_end(self._id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        self.cancel()

    def cancel(self) -> None:
        """Stop the stream (the expert aborts its engine request); a no-op once it has ended."""
        if self._finish() and not self._session.closed:
            self._session.send(_end(self._id, grpc.StatusCode.CANCELLED, "cancelled by the gateway"))


class Multiplexer:
    """The gateway's streams to one replica, over one call that is reopened when it fails."""

    def __init__(self, stub: pb_grpc.ExpertStub) -> None:
        self._stub = stub
        self._session: _Session | None = None
        self._ids = itertools.count(1)

    def open(
        self, request: pb.GenerateRequest, timeout: float | None, metadata: Sequence[tuple[str, str | bytes]]
    ) -> MuxStream:
        """Start one Generate stream (the call is opened first when there is none)."""
        session = self._session
        if session is None or session.closed:
            session = self._session = _Session(self._stub)
        stream_id = next(self._ids)
        session.streams[stream_id] = asyncio.Queue()
        text = {k: v for k, v in metadata if isinstance(v, str)}  # what we pass on is all text
        opened = pb.StreamOpen(request=request, metadata=text, timeout_s=timeout or 0.0)
        session.send(pb.StreamFrame(stream_id=stream_id, open=opened))
        return MuxStream(session, stream_id, timeout)

    async def close(self) -> None:
        """End the call; streams still open fail with CANCELLED."""
        if self._session is not None:
            await self._session.close()


# -- expert side ----------------------------------------------------------------------------


class StreamAborted(grpc.aio.AbortError):
    """``StreamContext.abort``: the stream ends with this status (an AbortError, as gRPC's is)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class StreamContext:
    """What ``Generate`` and its decorators use of a ``grpc.aio.ServicerContext``, for one stream."""

    def __init__(self, opened: pb.StreamOpen) -> None:
        self._metadata = tuple(opened.metadata.items())
        self._deadline = time.monotonic() + opened.timeout_s if opened.timeout_s > 0 else None
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata the gateway sent with the stream."""
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds left before the stream's deadline (None: no deadline)."""
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

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


GenerateHandler = Callable[[pb.GenerateRequest, Any], AsyncIterator[pb.GenerateResponse]]


class Multiplexed:
    """Mixin for an Expert servicer: ``Multiplex`` runs each stream through ``self.Generate``.

    ``drain()`` (at shutdown) refuses new streams with UNAVAILABLE, so the gateway fails them
    over, and ends each call once its streams have finished.
    """

    Generate: GenerateHandler
    _draining: asyncio.Event | None = None

    def drain(self) -> None:
        """Take no new streams; end every call when its last stream has finished."""
        self._drain_event().set()

    def _drain_event(self) -> asyncio.Event:
        if self._draining is None:
            self._draining = asyncio.Event()
        return self._draining

    async def Multiplex(
        self, request_iterator: AsyncIterator[pb.StreamBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamBatch]:
        """The expert's side of one gateway's call."""
        draining = self._drain_event()
        out: asyncio.Queue[pb.StreamFrame | None] = asyncio.Queue()
        running: dict[int, asyncio.Task[None]] = {}
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
                        out.put_nowait(pb.StreamFrame(stream_id=stream_id, chunk=msg))
                out.put_nowait(_end(stream_id, grpc.StatusCode.OK))
            except StreamAborted as e:
                out.put_nowait(_end(stream_id, e.code, e.details))
            except TimeoutError:
                out.put_nowait(_end(stream_id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            except Exception as e:  # a handler without @grpc_errors: the same table decides
                out.put_nowait(_end(stream_id, *status_for(e)))
            finally:
                running.pop(stream_id, None)
                end_if_idle()

        async def read() -> None:
            nonlocal input_ended
            async for batch in request_iterator:
                for frame in batch.frames:
                    if not frame.HasField("open"):  # an end from the gateway: cancel
                        if frame.stream_id in running:
                            running[frame.stream_id].cancel()
                    elif draining.is_set():
                        out.put_nowait(
                            _end(frame.stream_id, grpc.StatusCode.UNAVAILABLE, "the expert is shutting down")
                        )
                    else:
                        running[frame.stream_id] = asyncio.create_task(run(frame.stream_id, frame.open))
            input_ended = True
            end_if_idle()

        async def wake_on_drain() -> None:
            await draining.wait()
            end_if_idle()

        helpers = [asyncio.create_task(read()), asyncio.create_task(wake_on_drain())]
        try:
            while True:
                frame = await out.get()
                frames = []
                while frame is not None:
                    frames.append(frame)
                    if out.empty() or len(frames) >= MAX_FRAMES:
                        break
                    frame = out.get_nowait()
                if frames:
                    yield pb.StreamBatch(frames=frames)
                if frame is None:
                    return  # draining or half-closed, and nothing left running
        finally:
            for task in [*helpers, *running.values()]:
                task.cancel()
