"""The operators' view: vLLM's engine metrics on the expert's /metrics, and the dashboard and alert
rules under deploy/observability/ naming only metrics a running mesh serves.

The engine test starts `expertmesh up` (gateway + one real vLLM expert) with both /metrics
endpoints on, sends requests, scrapes both, and checks every metric of every dashboard panel and
every alert rule against what was served.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.client import MeshClient
from expertmesh.config import MeshConfig, load_config
from expertmesh.telemetry.engine_metrics import EngineMetrics

from ..support import VENV_BIN, demo_expert, free_port, wait_serving, write_config

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
METRIC = re.compile(r"\b(expertmesh_[a-z_]+|vllm:[a-z_:]+)")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _exprs() -> dict[str, str]:
    """Where each PromQL expression is (dashboard panel or alert) -> the expression."""
    found: dict[str, str] = {}
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for group in yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]
    return found


def test_dashboard_and_alerts_cover_what_operators_need() -> None:
    alerts = {k.removeprefix("alert ") for k in _exprs() if k.startswith("alert ")}
    assert {
        "ExpertDown",
        "ExpertReplicaEjected",
        "ExpertQueueNearFull",
        "ExpertKVCacheNearFull",
        "TimeToFirstTokenP99High",
    } <= alerts
    used = {m for e in _exprs().values() for m in METRIC.findall(e)}
    assert {"vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_preemptions_total"} <= used


def test_engine_metrics_are_relabelled_with_the_expert() -> None:
    """A unit check of the collector on a registry of its own (vLLM's is the process's global one)."""
    source = CollectorRegistry()
    Gauge("vllm:kv_cache_usage_perc", "KV", ["model_name", "engine"], registry=source).labels("m", "0").set(
        0.5
    )
    Counter("vllm:num_preemptions", "p", ["model_name", "engine"], registry=source).labels("m", "0").inc(3)
    Gauge("other_metric", "not vLLM's", registry=source).set(1)
    served = CollectorRegistry()
    served.register(EngineMetrics("coder", source))
    assert (
        served.get_sample_value(
            "vllm:kv_cache_usage_perc", {"model_name": "m", "engine": "0", "expert": "coder"}
        )
        == 0.5
    )
    assert (
        served.get_sample_value(
            "vllm:num_preemptions_total", {"model_name": "m", "engine": "0", "expert": "coder"}
        )
        == 3
    )
    assert served.get_sample_value("other_metric") is None


def _scrape(port: int | None) -> tuple[set[str], list[tuple[str, dict[str, str]]]]:
    """(family names, samples as (name, labels)) at http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        families = list(text_string_to_metric_families(reply.read().decode()))
    return {f.name for f in families}, [(s.name, s.labels) for f in families for s in f.samples]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[MeshConfig]:
    tmp = tmp_path_factory.mktemp("observed")
    path = write_config(
        tmp / "mesh.yaml",
        [demo_expert("general_tiny", "general", metrics_port=free_port(), max_queue=64)],
        gateway={"host": "127.0.0.1", "port": free_port(), "metrics_port": free_port()},
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "expertmesh"), "up", "--config", str(path), "--log-dir", str(tmp / "logs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield load_config(path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


@pytest.mark.engine
async def test_a_running_mesh_serves_every_metric_the_dashboard_and_alerts_use(mesh: MeshConfig) -> None:
    gateway = f"127.0.0.1:{mesh.gateway.port}"
    await wait_serving(gateway)
    async with MeshClient(gateway, timeout=120) as client:
        for i in range(3):
            done = await client.complete(f"hello {i}", max_tokens=8, ignore_eos=True)
            assert done.completion_tokens == 8
    expert = mesh.experts[0]
    families, samples = set(), []
    for port in (mesh.gateway.metrics_port, expert.metrics_port):
        names, found = _scrape(port)
        families |= names
        samples += found
    sample_names = {name for name, _ in samples}

    def served(metric: str) -> bool:
        if metric in sample_names:
            return True
        base = next((metric.removesuffix(s) for s in SUFFIXES if metric.endswith(s)), metric)
        return base in families  # declared, with no labelled child yet (a counter never incremented)

    missing = {where: m for where, e in _exprs().items() for m in METRIC.findall(e) if not served(m)}
    assert not missing, missing
    # vLLM's own engine metrics come from the expert, labelled with its id
    kv = [labels for name, labels in samples if name == "vllm:kv_cache_usage_perc"]
    assert kv and all(labels["expert"] == expert.expert_id for labels in kv)
    generated = [labels for name, labels in samples if name == "vllm:generation_tokens_total"]
    assert generated and generated[0]["expert"] == expert.expert_id
    assert ("expertmesh_max_queue", {"expert": expert.expert_id}) in samples
