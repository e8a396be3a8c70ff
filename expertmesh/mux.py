"""The gateway-expert link: many Generate streams over one ``Expert/Multiplex`` call.

One gRPC call per request costs both processes an HTTP/2 stream, headers, trailers and a
deadline timer each, and every engine step's tokens leave the expert as one message per stream.
On a small host that CPU comes out of the engine's share. Over ``Multiplex`` the gateway keeps
one call per replica open; each request is a stream of frames in it (``open``, ``chunk``\\*,
``end``), and each side sends every frame that is ready at once in one batch.

This module holds the frame helpers both sides share and the gateway's side
(:class:`Multiplexer`), which hands out :class:`MuxStream` objects that behave as a
``Generate`` call does for the forwarder: iterate for the messages, ``grpc.aio.AioRpcError``
with the expert's status (and trailing metadata) on failure, a deadline, ``cancel()``. When the
call itself fails (the expert died, or cannot be reached) every stream on it fails with that
call's status, and the next request opens a new call. The expert's side is
:mod:`expertmesh.muxserve`.

Limits (``limits`` in the config) keep one stream from hurting the others on its call: a batch
stops growing at ``link_batch_bytes`` and never passes ``max_message_bytes`` (gRPC would fail
the whole call); a frame too big for the link fails only its own stream; a caller that does not
read has at most ``stream_buffer_messages`` held for it, then its stream alone ends with
RESOURCE_EXHAUSTED and the expert is told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc

from expertmesh.config import LimitsConfig
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

CODES = {code.value[0]: code for code in grpc.StatusCode}
#: Frames per batch at most: a batch is handed on whole, and a long one delays the first frame.
MAX_FRAMES = 128
#: What a batch adds around its frames (field tags and lengths), with room to spare.
BATCH_OVERHEAD = 64


def status_error(
    code: grpc.StatusCode, details: str, trailers: Iterable[tuple[str, str]] = ()
) -> grpc.aio.AioRpcError:
    """The error a ``Generate`` call would have raised with this status."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


def end_frame(
    stream_id: int, code: grpc.StatusCode, details: str = "", trailers: Iterable[tuple[str, str]] = ()
) -> pb.StreamFrame:
    """The frame that ends stream ``stream_id`` with a status."""
    end = pb.StreamEnd(code=code.value[0], details=details, trailers=dict(trailers))
    return pb.StreamFrame(stream_id=stream_id, end=end)


def oversize(what: str, frame: pb.StreamFrame, limits: LimitsConfig) -> str | None:
    """Why ``frame`` cannot travel on the link (too big for one message), or None when it can."""
    room = limits.max_message_bytes - BATCH_OVERHEAD
    size = frame.ByteSize()
    if size <= room:
        return None
    return f"{what} is {size} bytes; the link carries at most {room} per message (limits.max_message_bytes)"


def batches(frames: list[pb.StreamFrame], limits: LimitsConfig) -> Iterable[list[pb.StreamFrame]]:
    """Cut ``frames`` (each one fits, see :func:`oversize`) into batches of at most MAX_FRAMES
    frames, which stop growing at ``link_batch_bytes`` and never pass ``max_message_bytes``."""
    cap = min(limits.link_batch_bytes, limits.max_message_bytes - BATCH_OVERHEAD)
    batch: list[pb.StreamFrame] = []
    size = 0
    for frame in frames:
        n = frame.ByteSize() + 8  # with the frame's own tag and length
        if batch and (len(batch) >= MAX_FRAMES or size + n > cap):
            yield batch
            batch, size = [], 0
        batch.append(frame)
        size += n
    if batch:
        yield batch


# -- gateway side ---------------------------------------------------------------------------


class _Session:
    """One ``Multiplex`` call and the streams opened on it."""

    def __init__(self, stub: pb_grpc.ExpertStub, limits: LimitsConfig) -> None:
        self.limits = limits
        self.streams: dict[int, MuxStream] = {}
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
            frames, self._outbox = self._outbox, []
            for batch in batches(frames, self.limits):
                yield pb.StreamBatch(frames=batch)

    async def _read(self) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "the expert closed the multiplexed call"
        try:
            async for batch in self.call:
                for frame in batch.frames:
                    stream = self.streams.get(frame.stream_id)
                    if stream is not None:
                        stream.deliver(frame)
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or code.name
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "the gateway is closing"
            raise
        finally:
            # Every stream still open ends with the call's status (a dead expert: UNAVAILABLE).
            self.closed = True
            self._wake.set()
            for stream_id, stream in list(self.streams.items()):
                stream.deliver(end_frame(stream_id, code, details))

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
        self._queue: asyncio.Queue[pb.StreamFrame] = asyncio.Queue()
        self._limit = session.limits.stream_buffer_messages
        self._done = False
        # One timer per stream, not a timeout around every message: at the deadline the stream
        # ends as a Generate call would, and the expert is told to stop.
        loop = asyncio.get_running_loop()
        self._timer = None if timeout is None else loop.call_later(timeout, self._expire)

    def deliver(self, frame: pb.StreamFrame) -> None:
        """A frame from the expert for this stream (called by the session's reader)."""
        if self._done:
            return
        if frame.HasField("chunk") and self._queue.qsize():
            # The caller is behind. A frame read from a batch keeps the whole batch alive, so
            # what waits here is copied out of it; and only so much may wait.
            if self._queue.qsize() >= self._limit:
                self._fail(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the caller did not read its stream: {self._limit} messages were waiting for it "
                    f"(limits.stream_buffer_messages)",
                )
                return
            copy = pb.StreamFrame(stream_id=frame.stream_id)
            copy.chunk.CopyFrom(frame.chunk)
            frame = copy
        self._queue.put_nowait(frame)
        if frame.HasField("end"):
            self._finish()

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[pb.GenerateResponse]:
        while True:
            frame = await self._queue.get()
            if frame.HasField("chunk"):
                yield frame.chunk
                continue
            self._finish()
            end = frame.end
            if end.code == 0:
                return
            code = CODES.get(end.code, grpc.StatusCode.UNKNOWN)
            raise status_error(code, end.details, end.trailers.items())

    def _finish(self) -> bool:
        if self._done:
            return False
        self._done = True
        self._session.streams.pop(self._id, None)
        if self._timer is not None:
            self._timer.cancel()
        return True

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream here with ``code`` (what is queued is dropped) and tell the expert."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(end_frame(self._id, code, details))
        self.cancel()

    def _expire(self) -> None:
        self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def cancel(self) -> None:
        """Stop the stream (the expert aborts its engine request); a no-op once it has ended."""
        if self._finish() and not self._session.closed:
            self._session.send(end_frame(self._id, grpc.StatusCode.CANCELLED, "cancelled by the gateway"))


class Multiplexer:
    """The gateway's streams to one replica, over one call that is reopened when it fails."""

    def __init__(self, stub: pb_grpc.ExpertStub, limits: LimitsConfig | None = None) -> None:
        self._stub = stub
        self.limits = limits or LimitsConfig()
        self._session: _Session | None = None
        self._ids = itertools.count(1)

    def open(
        self, request: pb.GenerateRequest, timeout: float | None, metadata: Sequence[tuple[str, str | bytes]]
    ) -> MuxStream:
        """Start one Generate stream (the call is opened first when there is none)."""
        session = self._session
        if session is None or session.closed:
            session = self._session = _Session(self._stub, self.limits)
        stream_id = next(self._ids)
        stream = session.streams[stream_id] = MuxStream(session, stream_id, timeout)
        text = {k: v for k, v in metadata if isinstance(v, str)}  # what we pass on is all text
        opened = pb.StreamOpen(request=request, metadata=text, timeout_s=timeout or 0.0)
        frame = pb.StreamFrame(stream_id=stream_id, open=opened)
        refused = oversize("the request", frame, self.limits)
        if refused:
            stream.deliver(end_frame(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, refused))
        else:
            session.send(frame)
        return stream

    async def close(self) -> None:
        """End the call; streams still open fail with CANCELLED."""
        if self._session is not None:
            await self._session.close()
