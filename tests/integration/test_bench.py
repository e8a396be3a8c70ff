"""The benchmark: its statistics and outputs (fast), and a smoke-sized run of every scenario (engine)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expertmesh.bench.context import Context, Group, Turn
from expertmesh.bench.load import BenchError, Recorder, percentile, run_load
from expertmesh.bench.plan import CONCURRENCY, SCENARIOS, EngineSettings, LoadPlan
from expertmesh.bench.procs import Server, wait_for_quiet
from expertmesh.bench.report import check_targets, plot, write_json
from expertmesh.bench.runner import run_groups
from expertmesh.services.expert.ipc_dir import PREFIX

METRICS = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "peak_rss_mib")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_shape(doc: dict[str, object]) -> None:
    scenarios = doc["scenarios"]
    assert isinstance(scenarios, dict)
    assert sorted(scenarios) == sorted(SCENARIOS)
    for name, levels in scenarios.items():
        assert sorted(levels) == sorted(str(c) for c in CONCURRENCY), name
        for c, row in levels.items():
            assert sorted(row) == sorted(METRICS), (name, c)
            for key, value in row.items():
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, c, key, value)


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert math.isnan(percentile([], 50))


async def test_run_load_keeps_concurrency_and_counts_per_token_gaps() -> None:
    in_flight = peak = 0

    async def one(index: int, rec: Recorder) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        rec.tokens(1)
        await asyncio.sleep(0.02)
        rec.tokens(3)  # one message with three tokens: three gaps of a third each
        in_flight -= 1

    result = await run_load(one, concurrency=4, requests=10, expect_tokens=4)
    assert peak == 4
    assert (result.requests, result.tokens) == (10, 40)
    assert len(result.ttft_s) == 10 and len(result.itl_s) == 30
    summary = result.summary()
    assert 5 <= summary["ttft_p50_ms"] < 100
    assert 3 <= summary["itl_p50_ms"] < 40
    assert summary["tok_s"] == pytest.approx(40 / result.wall_s)


async def test_run_load_rejects_a_short_stream() -> None:
    async def one(index: int, rec: Recorder) -> None:
        rec.tokens(2 if index == 3 else 4)

    with pytest.raises(BenchError, match="1 of 5 requests"):
        await run_load(one, concurrency=2, requests=5, expect_tokens=4)


def test_quick_plan_keeps_every_concurrency_level() -> None:
    plan = LoadPlan.quick()
    assert plan.concurrency == list(CONCURRENCY)
    assert all(plan.requests[c] >= c for c in CONCURRENCY)
    assert len(set(plan.prompts)) == len(plan.prompts) >= max(plan.requests.values())


class _FakeGroup(Group):
    """Records what the runner does with it; ``fail`` names the step that raises."""

    fail = ""
    log: ClassVar[list[str]] = []

    async def start(self) -> None:
        self.log.append(f"start {self.names[0]}")
        await asyncio.sleep(0)
        if self.fail == "start":
            raise BenchError(f"{self.names[0]} would not start")

    async def turns(self, stack: contextlib.AsyncExitStack) -> list[Turn]:
        async def trial(name: str, concurrency: int) -> None:
            await asyncio.sleep(0)  # a trial awaits its streams
            if self.fail == "trial" and concurrency == 32:
                raise BenchError("the server went away")
            self.log.append(f"{name} {concurrency}")

        return [Turn(name, functools.partial(trial, name)) for name in self.names]

    async def stop(self) -> None:
        self.log.append(f"stop {self.names[0]}")


def _fake_groups(fail: dict[str, str]) -> tuple[type[Group], ...]:
    names = (("a1", "a2"), ("b",), ("c",))
    return tuple(type(f"G{n[0]}", (_FakeGroup,), {"names": n, "fail": fail.get(n[0], "")}) for n in names)


async def test_a_full_run_measures_every_scenario_in_turns(tmp_path: Path) -> None:
    plan = replace(LoadPlan.for_rounds({1: 1, 32: 1}, warmup_requests=1, trials=2), quiet_wait_s=0)
    ctx = Context(EngineSettings(model="m"), plan, tmp_path, say=lambda line: None)
    log: list[str] = []
    _FakeGroup.log = log
    await run_groups(ctx, together=True, groups=_fake_groups({"b": "start", "c": "trial"}))
    # Every group starts before any is measured; every trial goes round every scenario.
    assert log[:3] == ["start a1", "start b", "start c"]
    assert log[3:-3] == ["a1 1", "a2 1", "c 1"] * 2 + ["a1 32", "a2 32"] * 2
    assert sorted(log[-3:]) == ["stop a1", "stop b", "stop c"]
    assert ctx.results.errors == {"b": "b would not start", "c": "the server went away in c at 32 streams"}


async def test_a_quick_run_measures_one_group_after_the_other(tmp_path: Path) -> None:
    plan = LoadPlan.for_rounds({1: 1}, warmup_requests=1, trials=1)
    ctx = Context(EngineSettings(model="m"), plan, tmp_path, say=lambda line: None)
    log: list[str] = []
    _FakeGroup.log = log
    await run_groups(ctx, together=False, groups=_fake_groups({}))
    # One group after the other; the next one starts while one is measured, not earlier.
    assert [line for line in log if not line.startswith(("start", "stop"))] == ["a1 1", "a2 1", "b 1", "c 1"]
    assert log.index("start b") < log.index("a1 1")
    assert log.index("stop a1") < log.index("start c") < log.index("b 1")
    assert ctx.results.errors == {}


def test_report_writes_json_targets_and_png(tmp_path: Path) -> None:
    speed = {
        "inprocess": 1.0,
        "expert": 0.95,
        "gateway": 0.8,
        "gateway_openai": 0.7,
        "gateway_tls": 0.76,
        "relay": 0.85,
        "up_expert": 0.92,
        "up_gateway": 0.55,
        "vllm_grpc": 0.5,
        "vllm_openai": 0.6,
    }
    scenarios = {
        name: {
            str(c): {
                "tok_s": 100.0 * c * f,
                "ttft_p50_ms": 5.0 + (0.5 if name == "gateway" else 0),
                "ttft_p99_ms": 9.0,
                "itl_p50_ms": 2.0,
                "itl_p99_ms": 4.0,
                "peak_rss_mib": 3000.0,
            }
            for c in CONCURRENCY
        }
        for name, f in speed.items()
    }
    doc = write_json(tmp_path / "results.json", scenarios, {"errors": {}})
    _assert_shape(json.loads((tmp_path / "results.json").read_text()))
    assert doc["ratios_vs_inprocess"]["expert"]["32"] == 0.95
    met = {(t["target"], t["streams"]): t["met"] for t in check_targets(scenarios)}
    assert met[("expert tok/s vs inprocess", 32)]
    assert met[("expert tok/s vs best vLLM server", 128)]  # 0.95 / 0.6 = 1.58
    assert met[("TTFT p50 added by gateway (ms)", 1)]
    assert not met[("gateway tok/s vs expert", 8)]  # 0.8 / 0.95 = 0.84
    assert met[("gateway_tls tok/s vs gateway", 32)]  # 0.76 / 0.8 = 0.95
    assert met[("TTFT p50 added by TLS + auth (ms)", 1)]  # 5.0 - 5.5 ms: none added
    assert met[("gateway_openai tok/s vs vllm_openai", 32)]  # 0.7 / 0.6
    assert met[("up_expert tok/s vs inprocess", 8)]  # 0.92
    assert not met[("up_gateway tok/s vs up_expert", 32)]  # 0.55 / 0.92 = 0.6
    assert not met[("up_gateway tok/s vs best vLLM server", 128)]  # 0.55 / 0.6
    added = {(t["target"], t["streams"]): t["value"] for t in check_targets(scenarios)}
    assert added[("TTFT p50 added by HTTP front over gateway (ms)", 1)] == -0.5  # 5.0 - 5.5 ms
    plot(tmp_path / "results.png", scenarios, list(CONCURRENCY))
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_SIGNATURE)


async def test_servers_start_without_grpc_fork_handlers_while_grpc_is_busy(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # The benchmark starts servers while its channels are busy. A fork() then runs gRPC's fork
    # handlers in this process ("skipping fork() handlers" on stderr), which crashed it now and then.
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    done = asyncio.Event()
    checks = 0

    async def poll() -> None:
        nonlocal checks
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not done.is_set():
                await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                checks += 1

    pollers = [asyncio.create_task(poll()) for _ in range(4)]
    try:
        for i in range(20):
            s = Server(f"s{i}", [sys.executable, "-c", "pass"], tmp_path / "s.log")
            s.start()
            assert await s.wait(30) and s.returncode == 0
            await s.stop()
    finally:
        done.set()
        await asyncio.gather(*pollers)
        await server.stop(None)
    assert checks > 20
    assert "fork() handlers" not in capfd.readouterr().err


async def test_server_stop_ends_its_whole_process_group(tmp_path: Path) -> None:
    s = Server("sleepers", ["sh", "-c", "sleep 60 & sleep 60"], tmp_path / "s.log")
    s.start()
    await asyncio.sleep(0.3)
    s.record_descendants()
    children = list(s.descendants.values())
    assert children and s.returncode is None
    await s.stop(grace=5)
    assert s.returncode == -15  # SIGTERM
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    with pytest.raises(BenchError, match="sleepers exited with code -15"):
        s.check_alive()


async def test_wait_for_quiet_waits_for_our_own_busy_processes() -> None:
    # A vLLM engine of ours spins a core for about a second after its last request; the next
    # trial must not start before that ends (it used to: our own processes were left out).
    spin = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        await asyncio.sleep(0.2)
        await wait_for_quiet(limit_s=10)
        assert child.poll() == 0, "returned while our own child was still spinning"
    finally:
        child.kill()
        child.wait()


def _ipc_leftovers() -> set[Path]:
    """Socket files in the temp dir (what vLLM's engines leave) and IPC directories of ours."""
    tmp = Path(tempfile.gettempdir())
    # vLLM's sockets, our IPC dirs, and the files of vLLM's torch rendezvous stores.
    sockets = {p for p in tmp.iterdir() if p.is_socket()}
    return sockets | set(tmp.glob(f"{PREFIX}*")) | set(tmp.glob("vllm_dist_*"))


def _owner_alive(path: Path) -> bool:
    """An IPC folder ``expertmesh-ipc-<pid>-...`` whose process still runs."""
    parts = path.name.removeprefix(PREFIX).split("-")
    return path.name.startswith(PREFIX) and parts[0].isdigit() and psutil.pid_exists(int(parts[0]))


@pytest.mark.engine
@pytest.mark.timeout(420)
def test_bench_quick_runs_every_scenario(tmp_path: Path) -> None:
    ipc_before = _ipc_leftovers()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode} after {elapsed:.0f} s:\n{proc.stderr[-4000:]}"
    doc = json.loads((tmp_path / "results.json").read_text())
    _assert_shape(doc)
    assert doc["errors"] == {}
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_SIGNATURE)
    # The table names every scenario and the targets.
    for name in SCENARIOS:
        assert name in proc.stdout
    assert "targets" in proc.stdout
    # Every engine of the run (vLLM's servers too) left its sockets in the run's own directory,
    # which went at the end.
    # New ones only, and not the IPC folder of a process still running (another program's)
    new = {p for p in _ipc_leftovers() - ipc_before if not _owner_alive(p)}
    assert new == set()


def test_the_shipped_topology_is_the_configs_mesh_on_free_ports_with_the_bench_engine(tmp_path: Path) -> None:
    from expertmesh.bench.topology import DEFAULT_CONFIG, mesh_data
    from expertmesh.config import MeshConfig

    ctx = Context(EngineSettings(model="/models/tiny"), LoadPlan.quick(), tmp_path, say=lambda line: None)
    data = mesh_data(DEFAULT_CONFIG, ctx)
    config = MeshConfig.model_validate(data)
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert [e.expert_id for e in config.experts] == [e["expert_id"] for e in shipped["experts"]]
    assert config.routing.fallbacks == shipped["routing"]["fallbacks"]
    ports = [config.gateway.port, config.gateway.http_port, *(e.port for e in config.experts)]
    assert len(set(ports)) == len(ports) and shipped["gateway"]["port"] not in ports
    assert {(e.model_path, e.max_model_len, e.max_num_seqs) for e in config.experts} == {
        ("/models/tiny", 1024, 128)
    }
    # The code expert keeps what makes it the code expert.
    assert config.expert("code_smol").system_prompt == shipped["experts"][1]["system_prompt"]
    alone = MeshConfig.model_validate(mesh_data(DEFAULT_CONFIG, ctx, alone=True))
    assert [e.domain for e in alone.experts] == ["general"] and not alone.routing.fallbacks


def test_extra_scenarios_run_only_when_named(tmp_path: Path) -> None:
    from expertmesh.bench.plan import EXTRA_SCENARIOS

    plan = LoadPlan.quick()
    every = Context(EngineSettings(model="m"), plan, tmp_path, say=lambda line: None)
    assert every.wants("up_expert") and not any(every.wants(n) for n in EXTRA_SCENARIOS)
    named = Context(
        EngineSettings(model="m"), plan, tmp_path, say=lambda line: None, only=frozenset({"alone_expert"})
    )
    assert named.wants("alone_expert") and not named.wants("up_expert")


def test_affinity_prompts_share_a_long_system_prompt_per_trial(demo_models: list[Path]) -> None:
    from tokenizers import Tokenizer

    from expertmesh.bench.prefix import prompts, system_prompt

    one, two = prompts(1), prompts(2)
    assert len(set(one)) == len(one) and all(p.startswith(system_prompt(1)) for p in one)
    assert not any(p.startswith(system_prompt(1)) for p in two)  # each trial starts cold
    tokens = len(Tokenizer.from_file(str(demo_models[0] / "tokenizer.json")).encode(system_prompt(1)).ids)
    assert 1400 <= tokens <= 1700
