"""The walking skeleton end to end: `expertmesh up` with two real vLLM experts and the gateway.

Three engines at most: the mesh's two experts, and one in-process AsyncLLM (in a subprocess,
started at the same time) that gives the reference text for the same greedy request.
The last test stops the mesh with SIGTERM and checks that no process is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from expertmesh import cpus
from expertmesh.client import MeshClient, SyncMeshClient
from expertmesh.config import MeshConfig, load_config
from expertmesh.services.expert import ipc_dir
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..expert_support import all_workers, assert_off_worker_cores, thread_cores
from ..support import GRPCURL, REPO, VENV_BIN, demo_expert, health_status, wait_serving, write_config

pytestmark = pytest.mark.engine
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 24


@dataclass
class Mesh:
    """A running `expertmesh up` process and its config."""

    proc: subprocess.Popen[bytes]
    config: MeshConfig
    log_dir: Path

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.config.gateway.port}"

    def expert(self, expert_id: str) -> str:
        index = [e.expert_id for e in self.config.experts].index(expert_id)
        return self.config.expert_address(index)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]
) -> Iterator[subprocess.Popen[str]]:
    """AsyncLLM's own greedy text for PROMPT on the code model, computed while the mesh loads."""
    ipc = tmp_path_factory.mktemp("reference-ipc")  # for the socket files vLLM leaves
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "reference_generate.py"),
            str(demo_models[1]),
            PROMPT,
            str(MAX_TOKENS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, ipc_dir.ENV: str(ipc)},
    )
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[Mesh]:
    """`expertmesh up` on a general and a code expert; not waited for (tests watch it load)."""
    tmp = tmp_path_factory.mktemp("mesh")
    path = write_config(
        tmp / "mesh.yaml",
        [demo_expert("general_tiny", "general"), demo_expert("code_tiny", "code", "demo-code")],
        default_domain="general",
        routing={"fallbacks": {"code": ["general"]}},
    )
    log_dir = tmp / "logs"
    proc = subprocess.Popen(
        [str(VENV_BIN / "expertmesh"), "up", "--config", str(path), "--log-dir", str(log_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    yield Mesh(proc, load_config(path), log_dir)
    if proc.poll() is None:  # the last test normally stops it; make sure on failure too
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


async def test_health_goes_not_serving_then_serving(mesh: Mesh) -> None:
    """Each expert binds first (NOT_SERVING while its engine loads), then turns SERVING."""
    seen: dict[str, list[str]] = {e.expert_id: [] for e in mesh.config.experts}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(s[-1:] == ["SERVING"] for s in seen.values()):
        for expert_id, statuses in seen.items():
            status = await health_status(mesh.expert(expert_id), "expertmesh.v1.Expert")
            if status != "UNREACHABLE" and status not in statuses[-1:]:
                statuses.append(status)
        await asyncio.sleep(0.2)
    assert seen == {"general_tiny": ["NOT_SERVING", "SERVING"], "code_tiny": ["NOT_SERVING", "SERVING"]}
    await wait_serving(mesh.gateway, timeout=30)


def test_grpcurl_sees_reflection_and_health(mesh: Mesh) -> None:
    """What an operator types: list services on both servers, check health."""

    def grpcurl(*args: str) -> str:
        return subprocess.run(
            [GRPCURL, "-plaintext", *args], capture_output=True, text=True, check=True
        ).stdout

    assert set(grpcurl(mesh.gateway, "list").split()) == {
        "expertmesh.v1.Gateway",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert "expertmesh.v1.Expert" in grpcurl(mesh.expert("code_tiny"), "list").split()
    health = json.loads(
        grpcurl(
            "-d",
            '{"service": "expertmesh.v1.Expert"}',
            mesh.expert("code_tiny"),
            "grpc.health.v1.Health/Check",
        )
    )
    assert health == {"status": "SERVING"}
    described = grpcurl(mesh.gateway, "describe", "expertmesh.v1.GenerateRequest")
    for name in ("request_id", "prompt", "messages", "domain", "expert_id", "sampling"):
        assert name in described
    # The gateway's link, by hand: two streams in one call; the call ends when both have.
    opens = [
        {"stream_id": i, "open": {"request": {"prompt": p, "sampling": {"max_tokens": 3, "temperature": 0}}}}
        for i, p in ((1, "def add(a, b):"), (2, "Hello"))
    ]
    out = grpcurl(
        "-d", json.dumps({"frames": opens}), mesh.expert("code_tiny"), "expertmesh.v1.Expert/Multiplex"
    )
    frames = [f for batch in _json_objects(out) for f in batch["frames"]]
    for stream in ("1", "2"):  # uint64 in proto JSON is a string
        mine = [f for f in frames if f["stream_id"] == stream]
        assert sum(len(f["chunk"].get("token_ids", [])) for f in mine if "chunk" in f) == 3
        assert mine[-1] == {"stream_id": stream, "end": {}}  # code 0 (OK), omitted in JSON


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects grpcurl prints one after another for a stream."""
    decoder, objects, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        obj, i = decoder.raw_decode(text, i)
        objects.append(obj)
    return objects


async def test_code_domain_streams_what_asyncllm_yields(mesh: Mesh, reference: subprocess.Popen[str]) -> None:
    """Gateway, domain=code: several messages from the code expert, the same text as AsyncLLM yields."""
    async with MeshClient(mesh.gateway, timeout=60) as client:
        messages = [
            m
            async for m in client.stream(
                PROMPT, domain="code", max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
            )
        ]
    assert len(messages) > 1
    assert {m.expert_id for m in messages} == {"code_tiny"}
    last = messages[-1]
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == MAX_TOKENS
    assert last.usage.prompt_tokens > 0
    assert all(not m.finish_reason for m in messages[:-1])
    assert sum(len(m.token_ids) for m in messages) == MAX_TOKENS
    out, _ = await asyncio.to_thread(reference.communicate, timeout=300)
    expected = json.loads(out.split("REFERENCE ", 1)[1])["text"]
    assert "".join(m.text for m in messages) == expected


async def test_cancel_midway_leaves_no_unfinished_engine_request(mesh: Mesh) -> None:
    """Cancelling the caller's stream cancels the expert's request and aborts it in the engine."""
    async with grpc.aio.insecure_channel(mesh.expert("general_tiny")) as channel:
        expert = pb_grpc.ExpertStub(channel)
        async with MeshClient(mesh.gateway) as client:
            got = 0
            async for _ in client.stream("Once upon a time", max_tokens=900, ignore_eos=True):
                got += 1
                if got == 3:
                    info = await expert.Info(pb.InfoRequest())
                    assert info.engine_unfinished_requests == 1
                    break  # leaving the iterator cancels the call
        deadline = time.monotonic() + 1.0
        while True:
            info = await expert.Info(pb.InfoRequest())
            if info.engine_unfinished_requests == 0 and info.requests_in_flight == 0:
                break
            assert time.monotonic() < deadline, f"still unfinished after 1 s: {info}"
            await asyncio.sleep(0.05)


async def test_routing_errors_are_precise_and_the_mesh_keeps_serving(mesh: Mesh) -> None:
    async with MeshClient(mesh.gateway, timeout=30) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("hi", domain="law")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no expert serves domain 'law' (domains: general, code)"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("hi", expert_id="nobody")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no expert with expert_id 'nobody'" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("hi", top_p=2.0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "sampling.top_p must be in (0, 1], got 2.0"
        result = await client.complete("hi", max_tokens=4)
        assert (result.expert_id, result.completion_tokens) == ("general_tiny", 4)


async def test_list_experts_reports_health_and_addresses(mesh: Mesh) -> None:
    async with MeshClient(mesh.gateway, timeout=10) as client:
        reply = await client.list_experts()
    assert reply.default_domain == "general"
    rows = {(e.expert_id, e.domain, e.address, e.health, e.state) for e in reply.experts}
    assert rows == {
        ("general_tiny", "general", mesh.expert("general_tiny"), "SERVING", pb.EXPERT_STATE_READY),
        ("code_tiny", "code", mesh.expert("code_tiny"), "SERVING", pb.EXPERT_STATE_READY),
    }


def test_sync_client_and_chat_messages(mesh: Mesh) -> None:
    """The sync client streams text pieces; `messages` go through the model's chat template."""
    with SyncMeshClient(mesh.gateway, timeout=60) as client:
        pieces = list(client.stream_text(messages=[("user", "Hello!")], expert_id="code_tiny", max_tokens=6))
        assert len(pieces) >= 2 and all(isinstance(p, str) for p in pieces)
        chat = client.complete(
            messages=[{"role": "user", "content": "Hello!"}], expert_id="code_tiny", max_tokens=6
        )
        raw = client.complete("Hello!", expert_id="code_tiny", max_tokens=6, temperature=0)
    # the template adds role markers, so the prompt is longer than the raw one
    assert chat.prompt_tokens > raw.prompt_tokens
    assert chat.completion_tokens == 6


def test_generate_command_streams_to_the_terminal(mesh: Mesh) -> None:
    done = subprocess.run(
        [
            str(VENV_BIN / "expertmesh"),
            "generate",
            "--gateway",
            mesh.gateway,
            "--domain",
            "code",
            "--max-tokens",
            "5",
            "x =",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "[code_tiny] finish_reason=length" in done.stderr
    assert "completion_tokens=5" in done.stderr
    bad = subprocess.run(
        [str(VENV_BIN / "expertmesh"), "generate", "--gateway", mesh.gateway, "--domain", "law", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "error: NOT_FOUND: no expert serves domain 'law'" in bad.stderr


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:  # exited (or a zombie) since the listing
        return []


async def test_experts_and_gateway_keep_off_the_engine_workers_cores(mesh: Mesh) -> None:
    """On one host, the servers and engine cores leave vLLM's workers their cores to themselves."""
    family = psutil.Process(mesh.proc.pid).children()
    experts = [p for p in family if "expertmesh.services.expert" in _cmdline(p)]
    (gateway,) = [p for p in family if "expertmesh.gateway" in _cmdline(p)]
    assert len(experts) == 2
    for expert in experts:
        assert_off_worker_cores(expert.pid)
    workers = frozenset().union(*(w.cpu_affinity() for w in all_workers(mesh.proc.pid)))
    want = frozenset(os.sched_getaffinity(0)) - workers
    deadline = time.monotonic() + cpus.PLACE_EVERY_S + 10  # it looks again every few seconds
    while (now := thread_cores(gateway)) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert now == want, (now, workers)


def test_sigterm_stops_every_process_within_the_grace_period(mesh: Mesh) -> None:
    """`expertmesh up` + SIGTERM: the gateway, experts and vLLM's engine processes all exit."""
    family = psutil.Process(mesh.proc.pid).children(recursive=True)
    names = " ".join(" ".join(_cmdline(p)) for p in family)
    assert "expertmesh.gateway" in names and names.count("expertmesh.services.expert") == 2
    assert len(family) >= 7  # gateway, 2 experts, and each expert's engine core + worker
    started = time.monotonic()
    mesh.proc.send_signal(signal.SIGTERM)
    mesh.proc.wait(mesh.config.grace_period_s + 5)
    _, alive = psutil.wait_procs(
        family, timeout=max(mesh.config.grace_period_s - (time.monotonic() - started), 0.1)
    )
    assert alive == [], f"left behind: {[_cmdline(p) for p in alive]}"
    assert time.monotonic() - started < mesh.config.grace_period_s
    output = mesh.proc.stdout.read().decode() if mesh.proc.stdout else ""
    assert "stopping ..." in output and "code_tiny: stopped (exit code 0)" in output
    assert os.path.exists(mesh.log_dir / "code_tiny.log")
