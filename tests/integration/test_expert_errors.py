"""Precise errors from real experts under `expertmesh up`: a failed load, validation, limits,
deadlines, cancellation, chat templates, logprobs, engine death and supervisor restarts.

One engine stays alive (``general``); ``broken`` (a truncated weights file) fails its preflight
and stays up as FAILED; ``plain`` and ``templated`` are lazy copies of the general model
without a chat template that never load (everything they are asked needs no engine).
The last test kills ``general``'s engine core and waits for the supervisor to bring it back.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from expertmesh.client import MeshClient
from expertmesh.config import MeshConfig, load_config
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..expert_support import info, wait_state
from ..support import VENV_BIN, demo_expert, health_status, wait_serving, write_config

pytestmark = pytest.mark.engine
MAX_QUEUE = 100
TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
NO_TEMPLATE = (
    "this expert's model has no chat template, so messages cannot be rendered; "
    "send a raw prompt, or configure chat_template for this expert"
)


@dataclass
class Mesh:
    """A running `expertmesh up` and where it writes."""

    proc: subprocess.Popen[bytes]
    config: MeshConfig
    output: Path

    def address(self, expert_id: str) -> str:
        index = [e.expert_id for e in self.config.experts].index(expert_id)
        return self.config.expert_address(index)

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.config.gateway.port}"

    def said(self) -> str:
        return self.output.read_text(errors="replace")


def _up(config: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    output = tmp / "up.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "expertmesh"), "up", "--config", str(config), "--log-dir", str(tmp / "logs")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, output


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("errors")
    broken = tmp / "broken-model"
    shutil.copytree(demo_models[0], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    untemplated = tmp / "untemplated-model"
    shutil.copytree(demo_models[0], untemplated)
    (untemplated / "chat_template.jinja").unlink()
    path = write_config(
        tmp / "mesh.yaml",
        [
            demo_expert("general", "general", max_queue=MAX_QUEUE),
            demo_expert("broken", "broken", model_path=str(broken)),
            demo_expert("plain", "plain", model_path=str(untemplated), load="lazy"),
            demo_expert(
                "templated", "templated", model_path=str(untemplated), load="lazy", chat_template=TEMPLATE
            ),
        ],
        max_restarts=2,
    )
    proc, output = _up(path, tmp)
    yield Mesh(proc, load_config(path), output)
    _stop(proc)


async def _generate(
    address: str, request: pb.GenerateRequest, timeout: float = 60
) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [m async for m in pb_grpc.ExpertStub(channel).Generate(request, timeout=timeout)]


async def _tokenize(address: str, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.ExpertStub(channel).Tokenize(request, timeout=60)


def _request(
    prompt: str = "", messages: Sequence[tuple[str, str]] = (), **sampling: object
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt,
        messages=[pb.Message(role=r, content=c) for r, c in messages],
        sampling=pb.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def test_failed_load_reports_the_real_cause_while_others_serve(mesh: Mesh) -> None:
    general, broken = mesh.address("general"), mesh.address("broken")
    failed = await wait_state(broken, pb.EXPERT_STATE_FAILED, timeout=300)
    # the preflight reads it off the file before vLLM is started
    assert "PreflightError: model.safetensors is " in failed.last_error
    assert "the file is truncated" in failed.last_error
    assert "download model.safetensors again" in failed.last_error
    assert await health_status(broken) == "NOT_SERVING"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(broken, _request("hi", max_tokens=4))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == f"expert broken is FAILED: {failed.last_error}"
    async with grpc.aio.insecure_channel(broken) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.ExpertStub(channel).Load(pb.LoadRequest(wait=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == f"expert broken is FAILED: {failed.last_error}"

    await wait_serving(general, timeout=300)
    await wait_serving(mesh.gateway, timeout=60)
    async with MeshClient(mesh.gateway, timeout=60) as client:
        listed = {e.expert_id: e for e in (await client.list_experts()).experts}
        result = await client.complete("Hello", expert_id="general", max_tokens=4)
    assert (listed["broken"].state, listed["broken"].last_error) == (
        pb.EXPERT_STATE_FAILED,
        failed.last_error,
    )
    assert listed["broken"].health == "NOT_SERVING"
    assert (listed["general"].state, listed["general"].health) == (pb.EXPERT_STATE_READY, "SERVING")
    assert (result.expert_id, result.completion_tokens) == ("general", 4)
    assert "broken: exited" not in mesh.said()  # a failed load keeps the process (and its cause) up


VALIDATION_CASES = [
    (_request(), "the request has neither prompt nor messages"),
    (_request("x", [("user", "y")]), "set either prompt or messages, not both"),
    (
        _request(messages=[("robot", "beep")]),
        "messages[0].role 'robot' is not one of system, user, assistant, tool",
    ),
    (_request("x", max_tokens=0), "sampling.max_tokens must be > 0, got 0"),
    (_request("x", temperature=-1.0), "sampling.temperature must be in [0, 2], got -1.0"),
    (_request("x", temperature=math.inf), "sampling.temperature must be in [0, 2], got inf"),
    (_request("x", top_p=0.0), "sampling.top_p must be in (0, 1], got 0.0"),
    (_request("x", top_p=1.01), "sampling.top_p must be in (0, 1], got 1.0099999904632568"),
    (_request("x", logprobs=21), "sampling.logprobs must be <= 20, got 21"),
    (_request("x", stop=["s"] * 17), "sampling.stop has 17 strings; the limit is 16"),
    (_request("x", stop=["y" * 257]), "sampling.stop[0] must be 1..256 characters long, got 257"),
    (
        _request("x", max_tokens=1024),
        "sampling.max_tokens is 1024, but the prompt has 1 tokens and this expert's max_model_len is 1024: "
        "at most 1023 new tokens fit",
    ),
]


@pytest.mark.parametrize(("request_", "details"), VALIDATION_CASES, ids=[d[:40] for _, d in VALIDATION_CASES])
async def test_validation_errors_are_invalid_argument(
    mesh: Mesh, request_: pb.GenerateRequest, details: str
) -> None:
    await wait_serving(mesh.address("general"), timeout=300)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(mesh.address("general"), request_)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)


async def test_prompt_longer_than_the_context_names_both_numbers(mesh: Mesh) -> None:
    address = mesh.address("general")
    prompt = "hello world " * 700
    tokens = await _tokenize(address, pb.TokenizeRequest(prompt=prompt))
    assert tokens.count > tokens.max_model_len == 1024
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(address, _request(prompt))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"prompt has {tokens.count} tokens; this expert's max_model_len is 1024"


async def test_the_expert_keeps_serving_after_bad_requests(mesh: Mesh) -> None:
    address = mesh.address("general")
    messages = await _generate(address, _request("def add(a, b):", max_tokens=5, ignore_eos=True))
    assert messages[-1].usage.completion_tokens == 5
    after = await info(address)
    assert (after.state, after.requests_in_flight, after.engine_unfinished_requests) == (
        pb.EXPERT_STATE_READY,
        0,
        0,
    )


async def test_tokenize_counts_what_generate_sends_to_the_engine(mesh: Mesh) -> None:
    address = mesh.address("general")
    for prompt, messages in (("The quick brown fox", []), ("", [("system", "Be brief."), ("user", "Hi!")])):
        tokens = await _tokenize(
            address,
            pb.TokenizeRequest(prompt=prompt, messages=[pb.Message(role=r, content=c) for r, c in messages]),
        )
        out = await _generate(address, _request(prompt, messages, max_tokens=2))
        assert tokens.count == len(tokens.token_ids) == out[-1].usage.prompt_tokens


async def test_chat_needs_a_template_from_the_model_or_the_config(mesh: Mesh) -> None:
    plain, templated = mesh.address("plain"), mesh.address("templated")
    hello = [pb.Message(role="user", content="Hello!")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(plain, _request(messages=[("user", "Hello!")]))
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNIMPLEMENTED, NO_TEMPLATE)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _tokenize(plain, pb.TokenizeRequest(messages=hello))
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNIMPLEMENTED, NO_TEMPLATE)
    rendered = await _tokenize(templated, pb.TokenizeRequest(messages=hello))
    raw = await _tokenize(templated, pb.TokenizeRequest(prompt="[user] Hello!\n"))
    assert rendered.token_ids == raw.token_ids  # the configured template; the demo tokenizer adds no BOS
    for address in (plain, templated):
        assert (await info(address)).state == pb.EXPERT_STATE_COLD  # none of this needed an engine


async def test_logprobs_stream_with_each_token(mesh: Mesh) -> None:
    messages = await _generate(
        mesh.address("general"),
        _request("Once upon a time", max_tokens=6, temperature=0, logprobs=3, ignore_eos=True),
    )
    entries = [lp for m in messages for lp in m.logprobs]
    assert [lp.token_id for lp in entries] == [t for m in messages for t in m.token_ids]
    assert len(entries) == 6
    for lp in entries:
        assert lp.rank == 1 and lp.logprob <= 0  # greedy: the sampled token is the most likely one
        assert [t.token_id for t in lp.top][:1] == [lp.token_id] and len(lp.top) == 3
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
    plain = await _generate(mesh.address("general"), _request("Once upon a time", max_tokens=3))
    assert all(not m.logprobs for m in plain)


async def _drained(address: str, within: float) -> float:
    """Seconds until the engine holds no request and no stream is open; fails after ``within``."""
    started = time.monotonic()
    while True:
        now = await info(address)
        if now.engine_unfinished_requests == 0 and now.requests_in_flight == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"still busy after {within} s: {now}"
        await asyncio.sleep(0.02)


async def test_a_deadline_aborts_the_engine_request(mesh: Mesh) -> None:
    address = mesh.address("general")
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.ExpertStub(channel).Generate(
            _request("x", max_tokens=1000, ignore_eos=True), timeout=1.0
        )
        got = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for msg in call:
                got += len(msg.token_ids)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "Deadline Exceeded" in (err.value.details() or "")  # grpc's text: "Stream removed (...)" or not
    assert 0 < got < 1000
    await _drained(address, within=1.0)


async def test_full_queue_then_100_cancelled_streams_drain(mesh: Mesh) -> None:
    address = mesh.address("general")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExpertStub(channel)
        calls = [
            stub.Generate(_request("x", max_tokens=1000, ignore_eos=True), timeout=120) for _ in range(100)
        ]
        firsts = await asyncio.gather(*(c.read() for c in calls))
        assert all(isinstance(m, pb.GenerateResponse) for m in firsts)
        busy = await info(address)
        assert (busy.engine_unfinished_requests, busy.requests_in_flight) == (100, 100)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(address, _request("one more", max_tokens=2))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == (
            f"expert general is full: {MAX_QUEUE} requests running or queued (max_queue); "
            "retry later or on another expert"
        )
        for call in calls:
            call.cancel()
        drain_s = await _drained(address, within=1.0)
    print(f"\nMEASURED 100 cancelled streams drained from the engine in {drain_s * 1000:.0f} ms")


def _expert_process(mesh: Mesh, expert_id: str) -> psutil.Process:
    for proc in psutil.Process(mesh.proc.pid).children(recursive=True):
        if (
            f"--expert-id {expert_id}" in " ".join(proc.cmdline())
            and "expertmesh.services.expert" in proc.cmdline()
        ):
            return proc
    raise LookupError(expert_id)


async def test_engine_death_fails_requests_and_the_supervisor_restarts(mesh: Mesh) -> None:
    address = mesh.address("general")
    await wait_serving(address)
    expert = _expert_process(mesh, "general")
    core = next(p for p in expert.children(recursive=True) if "EngineCore" in p.name())
    # Freeze the engine first so that the request is certainly still in it when it dies: a tiny
    # model can finish a whole request while the caller is still reading its first message.
    core.suspend()
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.ExpertStub(channel).Generate(
            _request("x", max_tokens=1000, ignore_eos=True), timeout=60
        )
        deadline = time.monotonic() + 10
        while (now := await info(address)).engine_unfinished_requests != 1:
            assert time.monotonic() < deadline, f"the request never reached the engine: {now}"
            await asyncio.sleep(0.05)
        core.kill()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() != grpc.aio.EOF:
                continue  # only the error matters: the test fails if the stream ends normally
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (err.value.details() or "").startswith("expert general is FAILED: engine died: EngineDeadError")
    await asyncio.to_thread(expert.wait, 60)  # the expert exits (code 1) once its engine is dead
    deadline = time.monotonic() + 300
    while "general: restart 1/2" not in mesh.said():
        assert time.monotonic() < deadline, mesh.said()
        await asyncio.sleep(0.2)
    await wait_serving(address, timeout=300)
    back = await info(address)
    assert (back.state, back.load_count, back.last_error) == (pb.EXPERT_STATE_READY, 1, "")
    assert "general: exited with code 1" in mesh.said()
    result = await _generate(address, _request("Hello", max_tokens=3))
    assert result[-1].usage.completion_tokens == 3


async def test_the_supervisor_gives_up_and_says_why(tmp_path: Path) -> None:
    """An expert that exits at once (its port is taken) is restarted with backoff, then given up."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        path = write_config(
            tmp_path / "mesh.yaml",
            [demo_expert("blocked", "general", port=port, load="lazy")],
            max_restarts=1,
        )
        proc, output = _up(path, tmp_path)
        try:
            deadline = time.monotonic() + 120
            while "blocked: giving up" not in output.read_text(errors="replace"):
                assert time.monotonic() < deadline, output.read_text(errors="replace")
                await asyncio.sleep(0.2)
        finally:
            _stop(proc)
    said = output.read_text(errors="replace")
    assert "blocked: restart 1/1 in 0 s" in said  # the first restart at once
    assert "blocked: giving up (exited with code 1 after 1 restarts; last error: " in said
    assert f"expert blocked cannot listen on 127.0.0.1:{port}" in said.split("blocked: giving up", 1)[1]
