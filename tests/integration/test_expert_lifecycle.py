"""Lazy experts on real engines: load on first request, idle unload, memory budget, SIGTERM.

Two lazy expert processes share one config with ``memory_budget_gib: 5``, which fits one
loaded tiny engine (~3 GiB) but not two, so at most one engine is alive at a time. The tests
run in order and each starts from the state the previous one left:

1. both COLD: reachable, SERVING, engine NOT_SERVING; Tokenize and validation need no load;
2. the first request loads ``lazy_general`` and says so; Info shows LOADING then READY;
3. idle for ``idle_unload_after_s``: COLD again, memory released; the next request reloads;
4. a request to ``lazy_code`` whose deadline expires while it loads; the load goes on, and
   the budget unloads the idle ``lazy_general`` first; ``lazy_code`` streams 3 tokens per message;
5. SIGTERM: in-flight streams finish, new ones are refused, the process exits 0.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from expertmesh.config import MeshConfig, load_config
from expertmesh.services.expert.ipc_dir import dirs_of as ipc_dirs
from expertmesh.services.expert.proctree import tree_rss
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..expert_support import assert_off_worker_cores, info, start_expert, stop_group, wait_state
from ..support import demo_expert, health_status, wait_serving, write_config

pytestmark = pytest.mark.engine
IDLE_S = 10.0
GIB = 1024**3
ENGINE = "expertmesh.v1.Expert/engine"


@dataclass
class Experts:
    """Two running lazy expert processes."""

    config: MeshConfig
    procs: dict[str, subprocess.Popen[bytes]]
    log_dir: Path

    def address(self, expert_id: str) -> str:
        index = [e.expert_id for e in self.config.experts].index(expert_id)
        return self.config.expert_address(index)


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[Experts]:
    tmp = tmp_path_factory.mktemp("lazy")
    path = write_config(
        tmp / "mesh.yaml",
        [
            demo_expert("lazy_general", "general", load="lazy", idle_unload_after_s=IDLE_S),
            demo_expert("lazy_code", "code", "demo-code", load="lazy", stream_interval=3),
        ],
        memory_budget_gib=5,
    )
    config = load_config(path)
    procs = {e.expert_id: start_expert(path, e.expert_id, tmp / "logs") for e in config.experts}
    yield Experts(config, procs, tmp / "logs")
    for proc in procs.values():
        stop_group(proc)


async def _generate(
    address: str, prompt: str, timeout: float = 300, **sampling: object
) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.ExpertStub(channel).Generate(
            pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(**sampling)),  # type: ignore[arg-type]
            timeout=timeout,
        )
        return [m async for m in call]


async def test_lazy_experts_listen_cold_and_tokenize_without_loading(experts: Experts) -> None:
    for expert_id in experts.procs:
        address = experts.address(expert_id)
        await wait_serving(address, timeout=120)
        assert await health_status(address, "expertmesh.v1.Expert") == "SERVING"
        assert await health_status(address, ENGINE) == "NOT_SERVING"
        cold = await info(address)
        assert (cold.state, cold.load_count, cold.load_mode, cold.max_model_len) == (
            pb.EXPERT_STATE_COLD,
            0,
            "lazy",
            1024,
        )
    address = experts.address("lazy_general")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExpertStub(channel)
        tokens = await stub.Tokenize(pb.TokenizeRequest(prompt="Hello there, general."), timeout=60)
        assert tokens.count == len(tokens.token_ids) > 3 and tokens.max_model_len == 1024
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(address, "hi", top_p=2.0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "sampling.top_p must be in (0, 1], got 2.0"
    assert (await info(address)).state == pb.EXPERT_STATE_COLD  # a bad request never loads


async def test_first_request_loads_the_engine_and_reports_it(experts: Experts) -> None:
    address = experts.address("lazy_general")
    seen = [(await info(address)).state]

    async def watch() -> None:
        while seen[-1] != pb.EXPERT_STATE_READY:
            state = (await info(address)).state
            if state not in seen[-1:]:
                seen.append(state)
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    messages = await _generate(address, "Once upon a time", max_tokens=8, temperature=0, ignore_eos=True)
    first_s = time.monotonic() - started
    await asyncio.wait_for(watcher, 10)
    assert seen == [pb.EXPERT_STATE_COLD, pb.EXPERT_STATE_LOADING, pb.EXPERT_STATE_READY]
    assert messages[0].load_wait_seconds > 1
    assert all(m.load_wait_seconds == 0 for m in messages[1:])
    assert (messages[-1].finish_reason, messages[-1].usage.completion_tokens) == ("length", 8)
    ready = await info(address)
    assert (ready.state, ready.load_count) == (pb.EXPERT_STATE_READY, 1)
    assert 0 < ready.load_seconds <= messages[0].load_wait_seconds
    assert await health_status(address, ENGINE) == "SERVING"
    assert_off_worker_cores(experts.procs["lazy_general"].pid)

    started = time.monotonic()
    warm = await _generate(address, "Once upon a time", max_tokens=8, temperature=0, ignore_eos=True)
    warm_s = time.monotonic() - started
    assert warm[0].load_wait_seconds == 0
    assert "".join(m.text for m in warm) == "".join(m.text for m in messages)
    print(
        f"\nMEASURED lazy first request {first_s:.1f} s (load {ready.load_seconds:.1f} s), "
        f"warm {warm_s:.3f} s"
    )


async def test_idle_unload_frees_memory_and_the_next_request_reloads(experts: Experts) -> None:
    address = experts.address("lazy_general")
    pid = experts.procs["lazy_general"].pid
    rss_ready = tree_rss(pid)
    cold = await wait_state(address, pb.EXPERT_STATE_COLD, timeout=IDLE_S + 60)
    deadline = time.monotonic() + 10  # the killed engine processes may take a moment to go
    while (rss_cold := tree_rss(pid)) >= rss_ready - 1.5 * GIB and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert (
        cold.unload_reason.startswith("idle for ") and f"idle_unload_after_s={IDLE_S:g}" in cold.unload_reason
    )
    assert rss_cold < rss_ready - 1.5 * GIB, (rss_ready, rss_cold)
    assert cold.memory_bytes < rss_ready - 1.5 * GIB
    assert await health_status(address) == "SERVING"  # it still takes requests ...
    assert await health_status(address, ENGINE) == "NOT_SERVING"  # ... but is cold
    [ipc] = ipc_dirs(pid)
    assert list(ipc.iterdir()) == []  # the sockets the engine's processes left went with them
    messages = await _generate(address, "Again", max_tokens=4)
    left = [p.name for p in ipc.iterdir()]
    assert left  # the new engine's sockets are there, not in the temp dir, and so is the file
    assert any(name.startswith("vllm_dist_") for name in left)  # of its torch rendezvous store
    assert messages[0].load_wait_seconds > 1
    again = await info(address)
    assert (again.state, again.load_count) == (pb.EXPERT_STATE_READY, 2)
    assert_off_worker_cores(pid)  # the new engine's worker was bound from every core again
    print(
        f"\nMEASURED RSS of the expert process tree: READY {rss_ready / GIB:.2f} GiB, "
        f"COLD {rss_cold / GIB:.2f} GiB"
    )


async def test_deadline_while_loading_and_the_memory_budget(experts: Experts) -> None:
    general, code = experts.address("lazy_general"), experts.address("lazy_code")
    async with grpc.aio.insecure_channel(
        code
    ) as channel:  # the tokenizer is warm: the deadline hits the load
        await pb_grpc.ExpertStub(channel).Tokenize(pb.TokenizeRequest(prompt="def f(x):"), timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(code, "def f(x):", timeout=2, max_tokens=4)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "Deadline Exceeded" in (err.value.details() or "")
    assert (await info(code)).state == pb.EXPERT_STATE_LOADING  # the load goes on without the caller
    async with grpc.aio.insecure_channel(code) as channel:
        stub = pb_grpc.ExpertStub(channel)
        loaded = await stub.Load(pb.LoadRequest(wait=True), timeout=300)
        assert (loaded.state, loaded.load_count) == (pb.EXPERT_STATE_READY, 1)
        again = await stub.Load(pb.LoadRequest(wait=False), timeout=5)
        assert (again.state, again.load_count) == (pb.EXPERT_STATE_READY, 1)  # idempotent
        # stream_interval: 3 in its config: the first token at once, then 3 per message (a lagging
        # reader may get two merged), where "auto" would send each token alone to one stream.
        request = pb.GenerateRequest(
            prompt="def f(x):", sampling=pb.SamplingParams(max_tokens=10, ignore_eos=True)
        )
        sizes = [len(m.token_ids) async for m in stub.Generate(request, timeout=60)]
        assert (sizes[0], sum(sizes)) == (1, 10), sizes
        assert len(sizes) > 1 and all(n % 3 == 0 for n in sizes[1:]), sizes
    unloaded = await info(general)
    assert unloaded.state == pb.EXPERT_STATE_COLD
    assert unloaded.unload_reason.startswith("memory budget 5.0 GiB: made room for lazy_code")


async def test_sigterm_lets_in_flight_streams_finish(experts: Experts) -> None:
    address = experts.address("lazy_code")
    proc = experts.procs["lazy_code"]
    family = psutil.Process(proc.pid).children(recursive=True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExpertStub(channel)
        call = stub.Generate(
            pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=600, ignore_eos=True)),
            timeout=60,
        )
        first = await call.read()
        assert isinstance(first, pb.GenerateResponse)
        proc.terminate()
        while await health_status(address) == "SERVING":
            await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(address, "late", timeout=10, max_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = []
        while (msg := await call.read()) != grpc.aio.EOF:
            rest.append(msg)
    assert isinstance(rest[-1], pb.GenerateResponse)
    assert (rest[-1].finish_reason, rest[-1].usage.completion_tokens) == ("length", 600)
    assert await asyncio.to_thread(proc.wait, experts.config.grace_period_s + 15) == 0
    _, alive = psutil.wait_procs(family, timeout=5)
    assert alive == []
    assert ipc_dirs(proc.pid) == []
