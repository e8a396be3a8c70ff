"""Routing benchmarks: classification latency per signal, and failover detection after kill -9.

    python -m expertmesh.bench.routing [--no-failover] [--out DIR]

Targets (README): rules + code + language <= 1 ms p50; embeddings <= 10 ms p50; a killed expert
out of rotation (first request served by the fallback) <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from expertmesh.client import MeshClient
from expertmesh.config import MeshConfig, load_config
from expertmesh.demo_models import demo_expert, ensure_demo_models
from expertmesh.gateway.signals import CodeSignal, EmbeddingSignal, LanguageSignal, RulesSignal
from expertmesh.supervisor import Supervisor

from .procs import free_port

PROMPTS = [
    "How do I reverse a list in Python?",
    "def add(a, b):\n    return a + b",
    "Bonjour, pouvez-vous m'expliquer comment fonctionne la photosynthèse ?",
    "What is the capital of Australia?",
    "Traceback (most recent call last):\n  File \"app.py\", line 3\nKeyError: 'x'",
    "Wie spät ist es in Tokio, wenn es in Berlin Mittag ist?",
    "Tell me a short story about a brave mouse.",
    "SELECT name FROM users WHERE age > 30;",
]


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 4),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
    }


def classification_latency(rounds: int = 200) -> dict[str, dict[str, float]]:
    """p50/p99 per signal over the sample prompts."""
    from expertmesh.config import DomainRules

    rules = RulesSignal({"code": DomainRules(keywords=["python", "rust", "function", "compile", "bug"])})
    code = CodeSignal("code")
    language = LanguageSignal("multilingual")
    language.warm()
    embeddings = EmbeddingSignal({"code": ["write a function"], "general": ["tell me a story"]})
    embeddings.warm()
    results = {}
    for name, signal_ in (
        ("rules", rules),
        ("code", code),
        ("language", language),
        ("embeddings", embeddings),
    ):
        samples = []
        for i in range(rounds if name != "embeddings" else rounds // 4):
            text = PROMPTS[i % len(PROMPTS)]
            start = time.perf_counter()
            signal_.vote(text)
            samples.append(time.perf_counter() - start)
        results[name] = _percentiles(samples)
    fast = []
    for i in range(rounds):
        text = PROMPTS[i % len(PROMPTS)]
        start = time.perf_counter()
        for s in (rules, code, language):
            s.vote(text)
        fast.append(time.perf_counter() - start)
    results["rules+code+language"] = _percentiles(fast)
    return results


async def failover_detection(workdir: Path) -> float:
    """Seconds from kill -9 of the code expert to the first request served by its fallback."""
    ensure_demo_models(log=False)
    experts = []
    for expert_id, domain, model in (
        ("general_tiny", "general", "demo-general"),
        ("code_tiny", "code", "demo-code"),
    ):
        experts.append(demo_expert(expert_id, domain, model, free_port()))
    path = workdir / "mesh.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "gateway": {"host": "127.0.0.1", "port": free_port()},
                "max_restarts": 0,
                "routing": {"fallbacks": {"code": ["general"]}},
                "experts": experts,
            }
        )
    )
    config: MeshConfig = load_config(path)
    sup = Supervisor(config, path, workdir / "logs", report=lambda line: None)
    await sup.start()
    try:
        if not await sup.wait_ready(timeout=600):
            raise RuntimeError(f"mesh did not start; see {workdir / 'logs'}")
        code = next(c for c in sup.experts if c.name == "code_tiny")
        assert code.proc is not None
        expert_pid = code.proc.pid
        async with MeshClient(sup.gateway.address, timeout=30) as client:
            assert (await client.complete("x", domain="code", max_tokens=1)).expert_id == "code_tiny"
            os.kill(expert_pid, signal.SIGKILL)
            killed = time.monotonic()
            while (await client.complete("x", domain="code", max_tokens=1)).expert_id != "general_tiny":
                pass
            return time.monotonic() - killed
    finally:
        await sup.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the routing benchmarks and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--no-failover", action="store_true", help="skip the kill -9 measurement (no engines)"
    )
    parser.add_argument("--out", help="folder for routing.json")
    args = parser.parse_args(argv)
    results: dict[str, object] = {"classification": classification_latency()}
    for name, figures in results["classification"].items():  # type: ignore[attr-defined]
        print(f"classification {name:>22}: p50 {figures['p50_ms']:.3f} ms  p99 {figures['p99_ms']:.3f} ms")
    if not args.no_failover:
        with tempfile.TemporaryDirectory(prefix="expertmesh-bench-") as tmp:
            seconds = asyncio.run(failover_detection(Path(tmp)))
        results["failover_detection_s"] = round(seconds, 3)
        print(f"kill -9 -> first request served by the fallback: {seconds * 1000:.0f} ms")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "routing.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
