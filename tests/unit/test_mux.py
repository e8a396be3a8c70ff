"""The multiplexed gateway-expert link, both ends in-process over real gRPC (fake Generate)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
import pytest

from expertmesh.config import LimitsConfig
from expertmesh.mux import Multiplexer, batches
from expertmesh.muxserve import Multiplexed
from expertmesh.rpc import bind
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc


class Streamer(Multiplexed, pb_grpc.ExpertServicer):
    """Streams ``n`` numbered pieces (``sampling.max_tokens``) of the prompt, or what the prompt says."""

    def __init__(self) -> None:
        self.multiplex_calls = 0
        self.metadata: list[dict[str, str]] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()

    async def Multiplex(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.StreamBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamBatch]:
        self.multiplex_calls += 1
        async for batch in super().Multiplex(request_iterator, context):
            yield batch

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:  # type: ignore[override]
        self.metadata.append(dict(context.invocation_metadata() or ()))
        try:
            if request.prompt == "invalid":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt says invalid")
            if request.prompt == "broken":
                raise RuntimeError("broken handler")
            if request.prompt == "hold":
                yield pb.GenerateResponse(text="held ")
                await self.release.wait()
            for i in range(request.sampling.max_tokens):
                yield pb.GenerateResponse(text=f"{request.prompt}-{i} ", token_ids=[i])
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled.append(request.prompt)
            raise


@pytest.fixture
async def expert() -> AsyncIterator[tuple[Streamer, grpc.aio.Server, int]]:
    streamer = Streamer()
    server = grpc.aio.server()
    pb_grpc.add_ExpertServicer_to_server(streamer, server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    yield streamer, server, port
    await server.stop(0)


@pytest.fixture
async def mux(expert: tuple[Streamer, grpc.aio.Server, int]) -> AsyncIterator[Multiplexer]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{expert[2]}")
    link = Multiplexer(pb_grpc.ExpertStub(channel))
    yield link
    await link.close()
    await channel.close()


def _request(prompt: str, n: int = 3) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=n))


async def _collect(link: Multiplexer, prompt: str, n: int = 3, timeout: float | None = 10) -> str:
    return "".join([m.text async for m in link.open(_request(prompt, n), timeout, [])])


async def test_many_streams_share_one_call_and_keep_their_own_order(
    expert: tuple[Streamer, grpc.aio.Server, int], mux: Multiplexer
) -> None:
    texts = await asyncio.gather(*(_collect(mux, f"p{i}", 20) for i in range(50)))
    for i, text in enumerate(texts):
        assert text == "".join(f"p{i}-{k} " for k in range(20))
    assert expert[0].multiplex_calls == 1


async def test_metadata_and_statuses_pass_through(
    expert: tuple[Streamer, grpc.aio.Server, int], mux: Multiplexer
) -> None:
    parent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    meta: list[tuple[str, str | bytes]] = [("x-request-id", "r-1"), ("traceparent", parent), ("k-bin", b"\0")]
    assert "".join([m.text async for m in mux.open(_request("m", 1), 10, meta)]) == "m-0 "
    assert expert[0].metadata[-1] == {"x-request-id": "r-1", "traceparent": parent}
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await _collect(mux, "invalid")
    assert (invalid.value.code(), invalid.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt says invalid",
    )
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await _collect(mux, "broken")
    assert broken.value.code() == grpc.StatusCode.INTERNAL
    assert "broken handler" in (broken.value.details() or "")
    assert await _collect(mux, "after") == "after-0 after-1 after-2 "  # the call survived both


async def test_cancel_and_deadline_reach_the_expert(
    expert: tuple[Streamer, grpc.aio.Server, int], mux: Multiplexer
) -> None:
    streamer = expert[0]
    stream = mux.open(_request("hold"), None, [])
    messages = stream.__aiter__()
    assert (await anext(messages)).text == "held "
    stream.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await _collect(mux, "hold", timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if streamer.cancelled == ["hold", "hold"]:
            break
        await asyncio.sleep(0.02)
    assert streamer.cancelled == ["hold", "hold"]


async def test_a_dead_expert_fails_every_open_stream_and_the_next_call_reconnects(
    expert: tuple[Streamer, grpc.aio.Server, int], mux: Multiplexer
) -> None:
    streamer, server, port = expert
    stream = mux.open(_request("hold"), None, [])
    messages = stream.__aiter__()
    assert (await anext(messages)).text == "held "
    await server.stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as dead:
        await anext(messages)
    assert dead.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _collect(mux, "p")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    again = grpc.aio.server()
    pb_grpc.add_ExpertServicer_to_server(streamer, again)
    bind(again, "127.0.0.1", port)
    await again.start()
    try:
        for _ in range(50):  # the channel's reconnect backoff
            try:
                assert await _collect(mux, "back", 1) == "back-0 "
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("no stream after the expert came back")
    finally:
        await again.stop(0)


async def test_drain_refuses_new_streams_and_lets_running_ones_finish(
    expert: tuple[Streamer, grpc.aio.Server, int], mux: Multiplexer
) -> None:
    streamer = expert[0]
    stream = mux.open(_request("hold", 2), None, [])
    messages = stream.__aiter__()
    assert (await anext(messages)).text == "held "
    streamer.drain()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _collect(mux, "new")
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "the expert is shutting down",
    )
    streamer.release.set()
    assert [m.text async for m in messages] == ["hold-0 ", "hold-1 "]


async def _raw(
    port: int, *batches: list[pb.StreamFrame]
) -> tuple[list[pb.StreamFrame], grpc.StatusCode, str]:
    """Send ``batches`` on a raw Multiplex call, half-close, and collect what comes back."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

        async def requests() -> AsyncIterator[pb.StreamBatch]:
            for frames in batches:
                yield pb.StreamBatch(frames=frames)

        call = pb_grpc.ExpertStub(channel).Multiplex(requests(), timeout=10)
        got: list[pb.StreamFrame] = []
        try:
            async for batch in call:
                got.extend(batch.frames)
        except grpc.aio.AioRpcError as e:
            return got, e.code(), e.details() or ""
        return got, grpc.StatusCode.OK, ""


def _open(stream_id: int, prompt: str = "p", n: int = 2, timeout_s: float = 0.0) -> pb.StreamFrame:
    return pb.StreamFrame(
        stream_id=stream_id, open=pb.StreamOpen(request=_request(prompt, n), timeout_s=timeout_s)
    )


def _cancel(stream_id: int) -> pb.StreamFrame:
    return pb.StreamFrame(stream_id=stream_id, end=pb.StreamEnd(code=grpc.StatusCode.CANCELLED.value[0]))


def _ends(frames: list[pb.StreamFrame]) -> dict[int, tuple[int, str]]:
    return {f.stream_id: (f.end.code, f.end.details) for f in frames if f.HasField("end")}


@pytest.mark.parametrize(
    ("frames", "details"),
    [
        ([pb.StreamFrame(stream_id=1)], "link protocol error: frame without a kind for stream 1"),
        (
            [pb.StreamFrame(stream_id=2, chunk=pb.GenerateResponse(text="x"))],
            "link protocol error: frame chunk for stream 2: the gateway sends only open and end frames",
        ),
        ([_open(3, "hold"), _open(3, "hold")], "link protocol error: stream 3 was opened twice"),
    ],
)
async def test_a_peer_that_breaks_the_protocol_loses_its_call(
    expert: tuple[Streamer, grpc.aio.Server, int], frames: list[pb.StreamFrame], details: str
) -> None:
    streamer, _, port = expert
    streamer.release.set()
    _, code, got = await _raw(port, frames)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and got.startswith(details), got
    frames_after, code_after, _ = await _raw(port, [_open(9)])  # only that call ended
    assert code_after == grpc.StatusCode.OK and _ends(frames_after) == {9: (0, "")}


@pytest.mark.parametrize("timeout_s", [-1.0, math.nan, math.inf])
async def test_a_bad_timeout_fails_only_its_stream(
    expert: tuple[Streamer, grpc.aio.Server, int], timeout_s: float
) -> None:
    frames, code, _ = await _raw(expert[2], [_open(1, timeout_s=timeout_s), _open(2)])
    ends = _ends(frames)
    assert code == grpc.StatusCode.OK
    assert ends[1] == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        f"timeout_s must be a finite number of seconds >= 0 (0 = none), got {timeout_s}",
    )
    assert ends[2] == (0, "")


async def test_cancel_with_or_before_its_open_leaves_nothing_behind(
    expert: tuple[Streamer, grpc.aio.Server, int],
) -> None:
    # open + cancel in one batch, and a cancel before its open: the call still ends at half-close
    frames, code, _ = await _raw(expert[2], [_open(1, "hold"), _cancel(1), _cancel(2)], [_open(2, "hold")])
    assert code == grpc.StatusCode.OK
    assert not any(f.HasField("chunk") for f in frames if f.stream_id == 2)  # 2 never ran


async def test_streams_per_link_are_bounded(expert: tuple[Streamer, grpc.aio.Server, int]) -> None:
    streamer, _, port = expert
    streamer.max_streams_per_link = 2
    try:
        frames, code, _ = await _raw(
            port, [_open(1, "hold"), _open(2, "hold"), _open(3)], [_cancel(1), _cancel(2)]
        )
    finally:
        del streamer.max_streams_per_link
    assert code == grpc.StatusCode.OK
    assert _ends(frames)[3] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        "this link already carries 2 streams (max_streams_per_link)",
    )


async def test_a_message_too_big_for_the_link_fails_only_its_stream(
    expert: tuple[Streamer, grpc.aio.Server, int],
) -> None:
    streamer, _, port = expert
    streamer.link_limits = LimitsConfig(
        max_message_bytes=256 * 1024, max_request_bytes=1024, link_batch_bytes=64 * 1024
    )
    try:
        big = "b" * (300 * 1024)  # each echoed piece is larger than a link message may be
        frames, code, _ = await _raw(port, [_open(1, big, 1), _open(2, "small", 3)])
    finally:
        del streamer.link_limits
    ends = _ends(frames)
    assert code == grpc.StatusCode.OK
    assert ends[1][0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "the link carries at most 262080 per message (limits.max_message_bytes)" in ends[1][1]
    assert ends[2] == (0, "") and [
        f.chunk.text for f in frames if f.stream_id == 2 and f.HasField("chunk")
    ] == [
        "small-0 ",
        "small-1 ",
        "small-2 ",
    ]


def test_batches_stop_growing_at_the_byte_limit() -> None:
    limits = LimitsConfig(max_message_bytes=256 * 1024, max_request_bytes=1024, link_batch_bytes=64 * 1024)
    frames = [pb.StreamFrame(stream_id=i, chunk=pb.GenerateResponse(text="t" * 10_000)) for i in range(20)]
    cut = list(batches(frames, limits))
    assert [len(b) for b in cut] == [6, 6, 6, 2]
    assert all(pb.StreamBatch(frames=b).ByteSize() <= 64 * 1024 for b in cut)


async def test_a_request_too_big_for_the_link_is_refused_at_the_gateway(mux: Multiplexer) -> None:
    mux.limits = LimitsConfig(
        max_message_bytes=128 * 1024, max_request_bytes=1024, link_batch_bytes=64 * 1024
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(mux, "x" * (200 * 1024))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details().startswith("the request is 2048")
