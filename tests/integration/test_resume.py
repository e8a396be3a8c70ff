"""Never lose a stream, with real engines: resume mid-stream on another replica, token-exact;
local replicas under ``expertmesh up``; hedging.

One mesh: the code expert with ``local_replicas: 2`` (float32, so that greedy decoding is the
same on both and in any batch), the general expert (another model) as its fallback, ``resume:
any`` for the code domain. Three engines. The tests run in file order, each waiting for the mesh
to be whole again first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from expertmesh.config import MeshConfig, load_config
from expertmesh.cpus import vllm_role
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..expert_support import info
from ..support import VENV_BIN, demo_expert, wait_serving, write_config

pytestmark = pytest.mark.engine
PROMPTS = [f"Story number {i}: once upon a time" for i in range(8)]
TOKENS = 200


class Mesh:
    def __init__(self, proc: subprocess.Popen[bytes], config: MeshConfig) -> None:
        self.proc = proc
        self.config = config
        self.gateway = f"127.0.0.1:{config.gateway.port}"
        self.code = config.local_addresses(0)  # two replicas
        self.general = config.expert_address(1)

    def pid_at(self, address: str) -> int:
        """The expert process listening at ``address``."""
        port = int(address.rsplit(":", 1)[1])
        for child in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.Error):
                if any(
                    c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections()
                ):
                    return child.pid
        raise LookupError(address)

    def engine_core(self, address: str) -> psutil.Process:
        """The vLLM engine core process of the expert at ``address``."""
        tree = psutil.Process(self.pid_at(address)).children(recursive=True)
        (core,) = [p for p in tree if vllm_role(p) == "EngineCore"]
        return core

    async def whole(self) -> None:
        for address in [*self.code, self.general, self.gateway]:
            await wait_serving(address, timeout=300)
        async with grpc.aio.insecure_channel(self.gateway) as channel:  # and the gateway sees it so
            stub = pb_grpc.GatewayStub(channel)
            deadline = time.monotonic() + 60
            while True:
                listed = await stub.ListExperts(pb.ListExpertsRequest(), timeout=5)
                if all(
                    r.health == "SERVING" and not r.ejected_for_s for e in listed.experts for r in e.replicas
                ):
                    return
                assert time.monotonic() < deadline, listed
                await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("resume")
    path = write_config(
        tmp / "mesh.yaml",
        [
            demo_expert(
                "code_tiny", "code", "demo-code", dtype="float32", local_replicas=2, stall_timeout_s=4
            ),
            demo_expert("general_tiny", "general", dtype="float32"),
        ],
        default_domain="general",
        max_restarts=10,
        routing={
            "fallbacks": {"code": ["general"]},
            "domains": {"code": {"resume": "any"}},
            "hedge_after_ms": 1500,
        },
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "expertmesh"), "up", "--config", str(path), "--log-dir", str(tmp / "logs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mesh = Mesh(proc, load_config(path))
    asyncio.run(mesh.whole())
    yield mesh
    proc.send_signal(signal.SIGTERM)
    proc.wait(90)


def _request(prompt: str, tokens: int = TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt,
        domain="code",
        sampling=pb.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
    )


class Stream:
    """One caller's stream: messages as they come, and an event per token count reached."""

    def __init__(self) -> None:
        self.messages: list[pb.GenerateResponse] = []
        self.tokens = 0
        self.reached = asyncio.Event()

    @property
    def token_ids(self) -> list[int]:
        return [i for m in self.messages for i in m.token_ids]

    @property
    def seams(self) -> list[pb.Seam]:
        """Every seam, as the last explanation that carried them lists them."""
        with_seams = [m for m in self.messages if m.route.seams]
        return list(with_seams[-1].route.seams) if with_seams else []

    async def run(self, stub: pb_grpc.GatewayStub, request: pb.GenerateRequest, at: int = 20) -> None:
        async for msg in stub.Generate(request, timeout=180):
            self.messages.append(msg)
            self.tokens += len(msg.token_ids)
            if self.tokens >= at:
                self.reached.set()


async def _reference(mesh: Mesh) -> list[Stream]:
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        streams = [Stream() for _ in PROMPTS]
        stub = pb_grpc.GatewayStub(channel)
        await asyncio.gather(*(s.run(stub, _request(p)) for s, p in zip(streams, PROMPTS, strict=True)))
    return streams


async def test_kill_9_mid_stream_resumes_token_exact_on_the_other_replica(mesh: Mesh) -> None:
    reference = await _reference(mesh)
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)
        streams = [Stream() for _ in PROMPTS]
        tasks = [asyncio.create_task(s.run(stub, _request(p))) for s, p in zip(streams, PROMPTS, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(s.reached.wait() for s in streams)), 120)
        serving = Counter(s.messages[0].route.address for s in streams)
        victim = serving.most_common(1)[0][0]
        os.kill(mesh.pid_at(victim), signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 180)  # every stream ends OK
    survivor = next(a for a in mesh.code if a != victim)
    for stream, ref in zip(streams, reference, strict=True):
        assert stream.token_ids == ref.token_ids  # token-identical to an uninterrupted run
        assert "".join(m.text for m in stream.messages) == "".join(m.text for m in ref.messages)
        last = stream.messages[-1]
        assert (last.finish_reason, last.usage.completion_tokens) == ("length", TOKENS)
        assert last.usage.prompt_tokens == ref.messages[-1].usage.prompt_tokens
        if stream.messages[0].route.address == victim:
            (seam,) = stream.seams
            assert (seam.address, seam.resumed_address) == (victim, survivor)
            assert 20 <= seam.tokens_streamed < TOKENS and seam.cause.startswith("UNAVAILABLE")
    print(f"\nkill -9 of {victim} serving {serving[victim]} of 8 streams: all 8 resumed/finished OK")
    deadline = time.monotonic() + 10
    while (await info(survivor)).engine_unfinished_requests:
        assert time.monotonic() < deadline, "the surviving engine holds unfinished requests"
        await asyncio.sleep(0.1)
    await mesh.whole()  # up restarted the killed replica


def _suspend(process: psutil.Process) -> Callable[[], None]:
    process.suspend()
    return process.resume


def _kill(process: psutil.Process) -> Callable[[], None]:
    process.kill()
    return lambda: None


async def _fault_mid_stream(
    mesh: Mesh, count: int, fault: Callable[[str], Callable[[], None]]
) -> list[pb.Seam]:
    """``count`` greedy streams of 300 tokens run once uninterrupted (the reference), then again
    with ``fault(address)`` done to the replica serving most of them once each has had 20
    tokens (what it returns undoes it when all have ended); returns the seams."""
    await mesh.whole()
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)
        reference, streams = [Stream() for _ in range(count)], [Stream() for _ in range(count)]
        await asyncio.gather(
            *(r.run(stub, _request(p, 300)) for r, p in zip(reference, PROMPTS, strict=False))
        )
        tasks = [
            asyncio.create_task(s.run(stub, _request(p, 300))) for s, p in zip(streams, PROMPTS, strict=False)
        ]
        await asyncio.wait_for(asyncio.gather(*(s.reached.wait() for s in streams)), 120)
        victim = Counter(s.messages[0].route.address for s in streams).most_common(1)[0][0]
        undo = fault(victim)
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), 180)
        finally:
            with contextlib.suppress(psutil.Error):
                undo()
    other = next(a for a in mesh.code if a != victim)
    seams = [seam for s in streams if s.messages[0].route.address == victim for seam in s.seams]
    assert seams and all(seam.resumed_address == other for seam in seams)  # on the other replica
    for stream, ref in zip(streams, reference, strict=True):  # token-exact across the seam
        assert stream.token_ids == ref.token_ids
        assert stream.messages[-1].usage.completion_tokens == 300
    return seams


async def test_a_stalled_engine_core_resumes_within_the_stall_time(mesh: Mesh) -> None:
    seams = await _fault_mid_stream(mesh, 4, lambda a: _suspend(mesh.engine_core(a)))
    assert all("engine stalled" in seam.cause for seam in seams)  # the expert's watchdog
    print(f"\nengine core SIGSTOPped: {len(seams)} streams resumed ({seams[0].cause})")
    await mesh.whole()


async def test_a_frozen_replica_process_is_left_by_the_links_keepalive(mesh: Mesh) -> None:
    # SIGSTOP of the whole expert process: no watchdog of its own runs, no connection resets;
    # the gateway's keepalive pings (rpc.CHANNEL_OPTIONS) go unanswered and close the link.
    seams = await _fault_mid_stream(mesh, 2, lambda a: _suspend(psutil.Process(mesh.pid_at(a))))
    assert all(seam.cause.startswith("UNAVAILABLE") for seam in seams), seams
    print(f"\nexpert process SIGSTOPped: {len(seams)} streams resumed ({seams[0].cause})")
    await mesh.whole()


async def test_an_engine_that_dies_mid_stream_resumes_on_the_other_replica(mesh: Mesh) -> None:
    # kill -9 of the engine core only: its expert answers UNAVAILABLE naming the death, then exits.
    seams = await _fault_mid_stream(mesh, 2, lambda a: _kill(mesh.engine_core(a)))
    assert all("engine died" in seam.cause for seam in seams), seams
    await mesh.whole()  # up restarted the expert


async def test_resume_any_continues_on_the_fallback_model(mesh: Mesh) -> None:
    await mesh.whole()
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)
        stream = Stream()
        task = asyncio.create_task(stream.run(stub, _request(PROMPTS[0], 300)))
        await asyncio.wait_for(stream.reached.wait(), 120)
        for address in mesh.code:  # no replica of the code model is left
            os.kill(mesh.pid_at(address), signal.SIGKILL)
        await asyncio.wait_for(task, 180)
    seam = stream.seams[-1]
    assert seam.resumed_expert_id == "general_tiny" and seam.resumed_address == mesh.general
    before = [m for m in stream.messages if m.expert_id == "code_tiny"]
    after = [m for m in stream.messages if m.expert_id == "general_tiny"]
    assert before and after and stream.messages == [*before, *after]  # one seam
    last = stream.messages[-1]
    assert last.usage.completion_tokens == 300 == len(stream.token_ids)
    # Continuous, nothing repeated or missing: after the seam the caller got exactly what the
    # fallback's model writes, greedily, after the prompt and the text streamed before it.
    streamed = "".join(m.text for m in before)
    done = sum(len(m.token_ids) for m in before)
    async with grpc.aio.insecure_channel(mesh.general) as channel:
        direct = pb_grpc.ExpertStub(channel).Generate(
            _request(PROMPTS[0] + streamed, 300 - done), timeout=120
        )
        expected = "".join([m.text async for m in direct])
    assert "".join(m.text for m in after) == expected
    await mesh.whole()


async def test_hedging_beats_a_replica_whose_first_token_is_late(mesh: Mesh) -> None:
    await mesh.whole()
    slow = mesh.code[0]  # both idle: the first replica in order takes the request
    core = mesh.engine_core(slow)
    core.suspend()
    try:
        async with grpc.aio.insecure_channel(mesh.gateway) as channel:
            messages = [
                m async for m in pb_grpc.GatewayStub(channel).Generate(_request(PROMPTS[1], 8), timeout=60)
            ]
    finally:
        core.resume()
    route = messages[0].route
    assert route.address == mesh.code[1]
    outcomes = {a.address: a.outcome for a in route.attempts}
    assert outcomes[slow] == "cancelled: the hedge on another replica answered first"
    deadline = time.monotonic() + 10
    while (await info(slow)).engine_unfinished_requests:  # the loser's engine request was aborted
        assert time.monotonic() < deadline, "the loser's request is still in its engine"
        await asyncio.sleep(0.1)
