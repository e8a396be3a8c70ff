"""`expertmesh up` with one expert whose model folder is broken and one that loads.

The broken expert's cause is printed as soon as it is known, the other expert serves, and the
scripts' view (`experts`, `experts --json`, `up --exit-on-failure`) says the same with an exit
code. Real processes: `up`, the gateway, one expert on a tiny engine, one FAILED expert.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from expertmesh import procs
from expertmesh.client import MeshClient
from expertmesh.config import load_config
from expertmesh.v1 import expertmesh_pb2 as pb

from ..expert_support import stop_group, wait_state
from ..support import EXPERTMESH, Up, demo_expert, wait_serving, write_config

pytestmark = pytest.mark.engine
CAUSE = "config.json is not valid JSON"


def _mesh(tmp: Path) -> Path:
    broken = tmp / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ')
    return write_config(
        tmp / "mesh.yaml",
        [
            {**demo_expert("broken", "code"), "model_path": str(broken)},
            demo_expert("good", "general"),
        ],
        default_domain="general",
        max_restarts=0,
    )


def _start(tmp: Path, *flags: str) -> Up:
    path = _mesh(tmp)
    output = tmp / "up.out"
    with output.open("wb") as out:  # a file, not a terminal: what a log or CI gets
        proc = procs.spawn(
            [EXPERTMESH, "up", "--config", str(path), "--log-dir", str(tmp / "logs"), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Up(proc, load_config(path), output)


@pytest.fixture
def up(tmp_path: Path, demo_models: list[Path]) -> Iterator[Up]:
    running = _start(tmp_path)
    yield running
    stop_group(running.proc, timeout=60)


async def test_up_prints_the_cause_and_the_other_expert_serves(up: Up) -> None:
    broken, good = up.config.expert_address(0), up.config.expert_address(1)
    info = await wait_state(broken, pb.EXPERT_STATE_FAILED, timeout=120)
    assert CAUSE in info.last_error, info.last_error
    # The cause is printed once known, while the other expert is still loading or serving.
    failed = await up.wait_for_line("broken: FAILED: ")
    assert CAUSE in failed, failed
    await wait_serving(good)
    line = await up.wait_for_line("mesh up with failures")
    assert "1 of 2 experts SERVING, FAILED: broken" in line, line

    gateway = f"127.0.0.1:{up.config.gateway.port}"
    async with MeshClient(gateway, timeout=60) as mesh:
        answer = await mesh.complete("Hello", domain="general", max_tokens=4)
        assert (answer.expert_id, answer.completion_tokens) == ("good", 4)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.complete("def f():", domain="code", max_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = err.value.details() or ""
        # The broken expert's own cause (its tokenizer cannot load from the same broken folder).
        assert "broken@" in details and "config.json" in details and "not a valid JSON" in details, details

    table = subprocess.run(
        [EXPERTMESH, "experts", "--gateway", gateway], capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0, table.stderr
    rows = [row for row in table.stdout.splitlines() if "broken" in row]
    assert len(rows) == 1 and "FAILED" in rows[0] and CAUSE in rows[0], table.stdout  # one unwrapped line
    listed = subprocess.run(
        [EXPERTMESH, "experts", "--gateway", gateway, "--json"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    experts = {e["expert_id"]: e for e in json.loads(listed.stdout)["experts"]}
    assert experts["broken"]["state"] == "EXPERT_STATE_FAILED"
    assert CAUSE in experts["broken"]["last_error"]
    assert experts["good"]["state"] == "EXPERT_STATE_READY"

    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, up.text()  # without the option a failed expert is not an exit


async def test_exit_on_failure_exits_1_once_every_expert_has_loaded_or_failed(
    tmp_path: Path, demo_models: list[Path]
) -> None:
    run = _start(tmp_path, "--exit-on-failure")
    try:
        code = await asyncio.to_thread(run.proc.wait, 300)
    finally:
        stop_group(run.proc, timeout=60)
    out = run.text()
    assert code == 1, out
    failed = await run.wait_for_line("broken: FAILED: ")
    assert CAUSE in failed, failed
    served = out.index("good: SERVING at")
    settled = out.index("mesh up with failures: 1 of 2 experts SERVING, FAILED: broken")
    stopping = out.index("stopping: some experts failed (--exit-on-failure)")
    assert served < settled < stopping, out
    assert "good: stopped (exit code 0)" in out, out
