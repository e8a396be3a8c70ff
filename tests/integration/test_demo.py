"""`expertmesh demo` end to end: the shipped demo config on the real model, real answers, exit 0.

It starts the whole mesh (gateway and two experts on SmolLM2-135M-Instruct), so it is the
slowest single test; the config is the shipped one on free ports, so that it can run beside
another mesh on the same host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from expertmesh.cli import DEMO_QUESTIONS
from expertmesh.config import DEFAULT_CONFIG

from ..support import VENV_BIN, free_port

pytestmark = pytest.mark.engine


def test_demo_prints_each_domains_question_and_a_real_answer(tmp_path: Path, real_model: Path) -> None:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["gateway"]["port"] = free_port()
    for expert in data["experts"]:
        expert["port"] = free_port()
        expert["model_path"] = str((DEFAULT_CONFIG.parent / expert["model_path"]).resolve())
    assert {e["model_path"] for e in data["experts"]} == {str(real_model)}
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    run = subprocess.run(
        [str(VENV_BIN / "expertmesh"), "demo", "--config", str(config), "--log-dir", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    general, code = run.stdout.split(f"--- domain=code: {DEMO_QUESTIONS['code']}")
    assert f"--- domain=general: {DEMO_QUESTIONS['general']}" in general
    assert "--- served by general_smol: finish_reason=stop" in general
    assert "--- served by code_smol: finish_reason=stop" in code
    answer = code.split("--- served by")[0]
    assert "def " in answer and "return" in answer, answer
    assert "all experts SERVING after" in run.stderr
