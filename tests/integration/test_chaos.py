"""The chaos suite, quick size, as CI runs it: a real mesh, kill -9 and a refused port under load.

Asserts what must hold whatever the gateway's hardening: the harness ran both scenarios on a
mesh that became whole after each, every request ended with a status (none past its deadline),
and callers were served again after each fault. The goals of issue 15 (nothing lost, recovery
times) are figures the suite reports, not assertions here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from expertmesh.bench.chaos_load import DEADLINE_SLACK_S

pytestmark = pytest.mark.engine

#: Two engine starts, two scenarios and the restarts they cause, on a shared two-core host.
SUITE_TIMEOUT_S = 900


def run_quick(out: Path) -> subprocess.CompletedProcess[str]:
    """Run the quick suite; on timeout, SIGTERM it so that it still stops its mesh."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "expertmesh.bench.chaos", "--quick", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=SUITE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        pytest.fail(f"chaos suite still running after {SUITE_TIMEOUT_S} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


def test_quick_chaos_suite(tmp_path: Path, demo_models: list[Path]) -> None:
    """kill -9 and a refused port: every request ends with a status, the mesh recovers."""
    run = run_quick(tmp_path)
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-4000:]
    doc = json.loads((tmp_path / "chaos.json").read_text())
    assert doc["error"] == ""
    assert doc["quick"] is True and doc["streams"] == 16
    assert [s["scenario"] for s in doc["scenarios"]] == ["kill9", "refused_port"]
    for s in doc["scenarios"]:
        name = s["scenario"]
        assert s["sent"] >= 16, (name, s)
        # every request ended with a status: OK, or a gRPC code; none abandoned as hung
        assert s["completed"] + sum(s["failed_by_code"].values()) == s["sent"], (name, s)
        assert "HANG" not in s["failed_by_code"] and s["hangs"] == 0, (name, s)
        assert s["max_past_deadline_s"] <= DEADLINE_SLACK_S, (name, s)
        assert s["goals"]["no_hang_past_deadline"], (name, s)
        # the partition of failures adds up
        failed = sum(s["failed_by_code"].values())
        assert s["cut_after_first_token"] + s["lost_without_token"] + s["failed_without_path"] == failed
        # recovered: a request sent after the fault completed, and the mesh was whole again
        assert s["recover_s"] is not None and s["recover_s"] > 0, (name, s)
        assert s["recovered_by"] in ("code_tiny", "general_tiny"), (name, s)
        assert s["whole_after_s"] >= s["recover_s"] - 0.1, (name, s)  # whole is checked after the drain
        assert set(s["goals"]) == {"no_request_lost", "no_hang_past_deadline", "recovery"}
    kill9 = doc["scenarios"][0]
    # the killed expert served before the fault, and its fallback or its restart served after
    assert kill9["served_by"].get("code_tiny", 0) >= 1, kill9
    assert "recover s (goal)" in run.stdout  # the table was printed
    # nothing of the mesh is left running
    leftovers = [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or ())
    ]
    assert leftovers == [], leftovers
