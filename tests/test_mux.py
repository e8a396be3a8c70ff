"""The multiplexed gateway-expert link, both ends in-process over real gRPC (fake Generate)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from expertmesh.mux import Multiplexed, Multiplexer
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
