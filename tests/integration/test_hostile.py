"""Hostile callers against a real mesh (``expertmesh up``, two tiny engines): every bad request is
refused with a precise status before it costs anything, callers' deadlines never eject an expert,
neighbours' streams are untouched, and a 1 000-stream burst is shed, not crashed on.

The table-driven suite goes through the gateway, straight to an expert, and as raw
``Multiplex`` frames; each case asserts the code and the details, and the mesh serves after.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from expertmesh.config import MeshConfig, load_config
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..support import VENV_BIN, demo_expert, wait_serving, write_config

pytestmark = pytest.mark.engine

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MIB = 1024 * 1024
MAX_CONCURRENT = 256


class Mesh:
    def __init__(self, proc: subprocess.Popen[bytes], config: MeshConfig) -> None:
        self.proc = proc
        self.config = config
        self.gateway = f"127.0.0.1:{config.gateway.port}"
        self.expert = config.expert_address(0)  # general_tiny


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("hostile")
    path = write_config(
        tmp / "mesh.yaml",
        [
            demo_expert("general_tiny", "general", max_queue=64),
            demo_expert("code_tiny", "code", "demo-code", max_queue=64),
        ],
        default_domain="general",
        gateway={"max_concurrent_streams": MAX_CONCURRENT, "max_streams_per_peer": MAX_CONCURRENT},
        routing={"fallbacks": {"code": ["general"]}, "domains": {"code": {"code": True}}},
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "expertmesh"), "up", "--config", str(path), "--log-dir", str(tmp / "logs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mesh = Mesh(proc, load_config(path))

    async def ready() -> None:
        for i in range(len(mesh.config.experts)):
            await wait_serving(mesh.config.expert_address(i), timeout=300)
        await wait_serving(mesh.gateway, timeout=60)

    asyncio.run(ready())
    yield mesh
    proc.send_signal(signal.SIGTERM)
    proc.wait(90)


def _req(prompt: str = "hello", **fields: Any) -> pb.GenerateRequest:
    sampling = fields.pop("sampling", {})
    sampling = pb.SamplingParams(**{"max_tokens": 4, **sampling})
    return pb.GenerateRequest(prompt=prompt, sampling=sampling, **fields)


def _msgs(*turns: tuple[str, str], **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.Message(role=r, content=c) for r, c in turns], **fields)


TOO_LONG_CONTEXT = "sampling.max_tokens is 100000, but the prompt has"
#: (name, request, code, details prefix) — through the gateway.
GATEWAY_CASES: list[tuple[str, pb.GenerateRequest, grpc.StatusCode, str]] = [
    (
        "request_id 129",
        _req(request_id="r" * 129),
        INVALID,
        "request_id has 129 characters; the limit is 128",
    ),
    ("request_id 10 kB", _req(request_id="r" * 10_000), INVALID, "request_id has 10000 characters"),
    ("request_id newline", _req(request_id="a\nb"), INVALID, "request_id 'a\\nb' contains non-printable"),
    ("domain 16 KiB", _req(domain="d" * 16384), INVALID, "domain has 16384 characters; the limit is 128"),
    ("expert_id 9 KiB", _req(expert_id="e" * 9000), INVALID, "expert_id has 9000 characters"),
    ("unknown domain", _req(domain="nope"), grpc.StatusCode.NOT_FOUND, "no expert serves domain 'nope'"),
    (
        "unknown expert",
        _req(expert_id="nobody"),
        grpc.StatusCode.NOT_FOUND,
        "no expert with expert_id 'nobody'",
    ),
    ("prompt 2 MiB", _req("p" * (2 * MIB)), INVALID, "the request is 2097"),
    (
        "prompt and messages",
        pb.GenerateRequest(prompt="x", messages=[pb.Message(role="user", content="y")]),
        INVALID,
        "set either prompt or messages, not both",
    ),
    ("neither", pb.GenerateRequest(), INVALID, "the request has neither prompt nor messages"),
    ("300 messages", _msgs(*[("user", "hi")] * 300), INVALID, "messages has 300 turns; the limit is 256"),
    ("bad role", _msgs(("robot", "beep")), INVALID, "messages[0].role 'robot' is not one of"),
    (
        "role 9000",
        _msgs(("r" * 9000, "beep")),
        INVALID,
        f"messages[0].role {'r' * 48!r}... (9000 characters)",
    ),
    (
        "temperature 2.5",
        _req(sampling={"temperature": 2.5}),
        INVALID,
        "sampling.temperature must be in [0, 2]",
    ),
    ("temperature nan", _req(sampling={"temperature": math.nan}), INVALID, "sampling.temperature must be in"),
    ("temperature -1", _req(sampling={"temperature": -1}), INVALID, "sampling.temperature must be in"),
    ("top_p 0", _req(sampling={"top_p": 0.0}), INVALID, "sampling.top_p must be in (0, 1], got 0.0"),
    ("top_p 1.5", _req(sampling={"top_p": 1.5}), INVALID, "sampling.top_p must be in (0, 1], got 1.5"),
    ("top_k -2", _req(sampling={"top_k": -2}), INVALID, "sampling.top_k must be -1, 0 (disabled) or > 0"),
    ("logprobs 21", _req(sampling={"logprobs": 21}), INVALID, "sampling.logprobs must be <= 20, got 21"),
    ("seed 2^63", _req(sampling={"seed": 2**63}), INVALID, "sampling.seed must be <="),
    (
        "17 stops",
        _req(sampling={"stop": ["x"] * 17}),
        INVALID,
        "sampling.stop has 17 strings; the limit is 16",
    ),
    ("empty stop", _req(sampling={"stop": [""]}), INVALID, "sampling.stop[0] must be 1..256 characters"),
    ("stop 257", _req(sampling={"stop": ["s" * 257]}), INVALID, "sampling.stop[0] must be 1..256 characters"),
    (
        "time_limit -1",
        _req(sampling={"time_limit_s": -1}),
        INVALID,
        "sampling.time_limit_s must be in (0, 86400]",
    ),
    (
        "time_limit nan",
        _req(sampling={"time_limit_s": math.nan}),
        INVALID,
        "sampling.time_limit_s must be in",
    ),
    (
        "max_tokens 100000 (every expert)",
        pb.GenerateRequest(prompt="hello", domain="code", sampling=pb.SamplingParams(max_tokens=100_000)),
        INVALID,
        f"no expert for this request can serve it: {TOO_LONG_CONTEXT}",
    ),
    (
        "prompt over the context",
        _req("word " * 3000, domain="general"),
        INVALID,
        "no expert for this request can serve it: prompt has",
    ),
]
# max_tokens 0 is refused by the field check, before any expert
GATEWAY_CASES.append(
    ("max_tokens 0", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=0)), INVALID,
     "sampling.max_tokens must be > 0, got 0")
)  # fmt: skip

#: Straight to an expert (its own Generate checks the same limits before tokenizing).
EXPERT_CASES: list[tuple[str, pb.GenerateRequest, grpc.StatusCode, str]] = [
    (
        "request_id 129",
        _req(request_id="r" * 129),
        INVALID,
        "request_id has 129 characters; the limit is 128",
    ),
    ("prompt 2 MiB", _req("p" * (2 * MIB)), INVALID, "the request is 2097"),
    ("300 messages", _msgs(*[("user", "hi")] * 300), INVALID, "messages has 300 turns; the limit is 256"),
    ("bad role", _msgs(("robot", "beep")), INVALID, "messages[0].role 'robot' is not one of"),
    (
        "temperature 2.5",
        _req(sampling={"temperature": 2.5}),
        INVALID,
        "sampling.temperature must be in [0, 2]",
    ),
    ("17 stops", _req(sampling={"stop": ["x"] * 17}), INVALID, "sampling.stop has 17 strings"),
    ("max_tokens 100000", _req(sampling={"max_tokens": 100_000}), INVALID, TOO_LONG_CONTEXT),
    ("prompt over the context", _req("word " * 3000), INVALID, "prompt has"),
]


async def _generate(address: str, stub_class: Any, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [m async for m in stub_class(channel).Generate(request, timeout=60)]


async def _serves(address: str, stub_class: Any) -> None:
    """The mesh serves after a hostile case: one token, end to end."""
    request = _req(sampling={"max_tokens": 1, "ignore_eos": True})
    messages = await _generate(address, stub_class, request)
    assert (messages[-1].finish_reason, messages[-1].usage.completion_tokens) == ("length", 1)


CASES = [("gateway", *c) for c in GATEWAY_CASES] + [("expert", *c) for c in EXPERT_CASES]


@pytest.mark.parametrize(
    ("target", "name", "request_", "code", "details"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES]
)
async def test_refused_precisely(
    mesh: Mesh, target: str, name: str, request_: pb.GenerateRequest, code: grpc.StatusCode, details: str
) -> None:
    address, stub = (
        (mesh.gateway, pb_grpc.GatewayStub) if target == "gateway" else (mesh.expert, pb_grpc.ExpertStub)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(address, stub, request_)
    assert err.value.code() == code, err.value.details()
    assert (err.value.details() or "").startswith(details), err.value.details()
    assert len(err.value.details() or "") < 1024  # client values are quoted cut short
    await _serves(address, stub)


async def test_callers_deadlines_never_eject_a_healthy_expert(mesh: Mesh) -> None:
    """A caller's deadline is DEADLINE_EXCEEDED and not the replica's failure: more of them than
    ``routing.eject_after_failures`` (3) leave the expert unejected, with no failure counted."""
    request = pb.GenerateRequest(
        prompt="go",
        domain="general",
        sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True, temperature=0),
    )
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [m async for m in stub.Generate(request, timeout=0.25)]
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        listed = await stub.ListExperts(pb.ListExpertsRequest(), timeout=10)
    (general,) = [e for e in listed.experts if e.expert_id == "general_tiny"]
    assert [(r.ejections, r.consecutive_failures) for r in general.replicas] == [(0, 0)], general
    await _serves(mesh.gateway, pb_grpc.GatewayStub)


def _open(stream_id: int, timeout_s: float = 0.0) -> pb.StreamFrame:
    return pb.StreamFrame(stream_id=stream_id, open=pb.StreamOpen(request=_req(), timeout_s=timeout_s))


RAW_CASES: list[tuple[str, list[pb.StreamFrame], str]] = [
    ("frame without a kind", [pb.StreamFrame(stream_id=1)], "link protocol error: frame without a kind"),
    ("chunk from the gateway", [pb.StreamFrame(stream_id=1, chunk=pb.GenerateResponse())],
     "link protocol error: frame chunk for stream 1"),
    ("stream id twice", [_open(1), _open(1)], "link protocol error: stream 1 was opened twice"),
    ("negative timeout", [_open(1, -1.0)], "timeout_s must be a finite number of seconds >= 0"),
    ("NaN timeout", [_open(1, math.nan)], "timeout_s must be a finite number of seconds >= 0"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "frames", "details"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
async def test_raw_multiplex_frames_are_checked(
    mesh: Mesh, name: str, frames: list[pb.StreamFrame], details: str
) -> None:
    async with grpc.aio.insecure_channel(mesh.expert) as channel:

        async def batches() -> AsyncIterator[pb.StreamBatch]:
            yield pb.StreamBatch(frames=frames)

        got: list[pb.StreamFrame] = []
        try:
            async for batch in pb_grpc.ExpertStub(channel).Multiplex(batches(), timeout=30):
                got.extend(batch.frames)
        except grpc.aio.AioRpcError as e:  # the call is ended: a protocol error
            assert (e.code(), (e.details() or "")[: len(details)]) == (INVALID, details)
        else:
            ends = [f.end for f in got if f.HasField("end")]  # or only the stream fails
            assert [(e.code, e.details[: len(details)]) for e in ends] == [(INVALID.value[0], details)]
    await _serves(mesh.expert, pb_grpc.ExpertStub)


async def test_time_limit_ends_the_stream_normally(mesh: Mesh) -> None:
    request = pb.GenerateRequest(
        prompt="count",
        sampling=pb.SamplingParams(max_tokens=900, temperature=0, ignore_eos=True, time_limit_s=0.2),
    )
    messages = await _generate(mesh.gateway, pb_grpc.GatewayStub, request)
    assert messages[-1].finish_reason == "time_limit"
    assert 0 < messages[-1].usage.completion_tokens < 900
    assert messages[-1].usage.completion_tokens == sum(len(m.token_ids) for m in messages)
    assert [bool(m.request_id) for m in messages] == [True] + [False] * (len(messages) - 1)  # sent once


GREEDY = [f"Tell me about the number {i}." for i in range(8)]


async def _greedy(address: str, prompt: str) -> str:
    request = pb.GenerateRequest(
        prompt=prompt, domain="general", sampling=pb.SamplingParams(max_tokens=48, temperature=0)
    )
    return "".join(m.text for m in await _generate(address, pb_grpc.GatewayStub, request))


async def test_neighbours_are_not_hurt_by_hostile_callers(mesh: Mesh) -> None:
    alone = [await _greedy(mesh.gateway, p) for p in GREEDY]

    async def hostile() -> list[str]:
        outcomes = []
        for request in (
            _req("p" * (4 * MIB)),  # over gRPC's receive limit
            # a 100 kB one-word prompt without a domain: classified (on its start) in well under
            # a millisecond, then too long for every expert's context
            _req("x" * 100_000),
            _req(request_id="r" * 10_000),
        ):
            try:
                await _generate(mesh.gateway, pb_grpc.GatewayStub, request)
                outcomes.append("OK")
            except grpc.aio.AioRpcError as e:
                outcomes.append(e.code().name)
        return outcomes

    async def stops_reading() -> None:
        async with grpc.aio.insecure_channel(mesh.gateway) as channel:
            request = pb.GenerateRequest(
                prompt="go", sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True, temperature=0)
            )
            call = pb_grpc.GatewayStub(channel).Generate(request, timeout=60)
            await anext(call.__aiter__())
            await asyncio.sleep(5)  # holds its stream open without reading
            call.cancel()

    results = await asyncio.gather(*(_greedy(mesh.gateway, p) for p in GREEDY), hostile(), stops_reading())
    assert results[:8] == alone
    assert results[8] == ["RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]


def _label(proc: psutil.Process) -> str:
    """gateway, an expert's id, vLLM's process title, or the name."""
    with contextlib.suppress(psutil.Error):
        cmd = proc.cmdline()
        if "expertmesh.gateway" in cmd:
            return "gateway"
        if "--expert-id" in cmd:
            return cmd[cmd.index("--expert-id") + 1]
        if cmd and cmd[0].startswith("VLLM::"):
            return cmd[0].removeprefix("VLLM::")
        if "up" in cmd:
            return "up"
    return proc.name()


async def test_a_burst_of_1000_streams_is_shed_not_crashed_on(mesh: Mesh) -> None:
    procs = [psutil.Process(mesh.proc.pid), *psutil.Process(mesh.proc.pid).children(recursive=True)]
    peak: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    stop_at = time.monotonic() + 10

    async def sample() -> None:
        while time.monotonic() < stop_at:
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    peak[p.pid] = max(peak[p.pid], p.memory_info().rss)
            await asyncio.sleep(0.2)

    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)

        async def client(i: int) -> None:
            request = pb.GenerateRequest(prompt=f"load {i}", sampling=pb.SamplingParams(max_tokens=8))
            while time.monotonic() < stop_at:
                try:
                    replies = [m async for m in stub.Generate(request, timeout=30)]
                    codes["OK" if replies and replies[-1].finish_reason else "OK without a finish"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
                    pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    await asyncio.sleep(int(pushback) / 1000 if pushback else 0.1)

        await asyncio.gather(sample(), *(client(i) for i in range(1000)))
    table = "\n".join(f"  {code:20} {n}" for code, n in codes.most_common())
    rss = ", ".join(f"{_label(p)} {peak[p.pid] / MIB:.0f} MiB" for p in procs if peak[p.pid])
    print(
        f"1000 concurrent streams for 10 s (gateway.max_concurrent_streams={MAX_CONCURRENT}):\n{table}\n{rss}"
    )
    assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert mesh.proc.poll() is None and all(p.is_running() for p in procs)
    await wait_serving(mesh.gateway, timeout=30)
    assert await _greedy(mesh.gateway, GREEDY[0])  # and it serves after
