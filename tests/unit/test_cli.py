"""The command line without engines: --version, `experts` without a gateway, output that is not a
terminal, and the install's choice of where the CPU build of torch comes from."""

from __future__ import annotations

import io
import os
import subprocess
from importlib.metadata import version
from pathlib import Path

from rich.table import Table

from expertmesh.console import console

from ..support import REPO, VENV_BIN, free_port

EXPERTMESH = str(VENV_BIN / "expertmesh")
TORCH_INDEX = str(REPO / "scripts" / "torch-index.sh")
PIP = str(VENV_BIN / "pip")


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def test_version() -> None:
    out = run(EXPERTMESH, "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"expertmesh {version('expertmesh')}"


def test_experts_exits_1_when_the_gateway_does_not_answer() -> None:
    target = f"127.0.0.1:{free_port()}"  # nobody listens there
    for extra in ([], ["--json"]):
        out = run(EXPERTMESH, "experts", "--gateway", target, *extra)
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert out.stdout == ""
        expected = f"error: the gateway at {target} did not answer: UNAVAILABLE: "
        assert out.stderr.startswith(expected), out.stderr


def test_tables_are_not_wrapped_when_the_output_is_not_a_terminal() -> None:
    key = "unknown key 'experts.0.max_model_length' (did you mean 'max_model_len'?)"
    path = "/srv/models/a-model-folder-with-a-rather-long-name/and/a/sub/folder/config.json"
    table = Table("expert_id", "finding", "where")
    table.add_row("general", key, path)
    out = io.StringIO()  # not a terminal, as a log file or CI is
    console(out).print(table)
    rows = out.getvalue().splitlines()
    assert any(key in row and path in row for row in rows), out.getvalue()
    assert "\x1b[" not in out.getvalue()  # no colour codes in a log


def _isolated_pip_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """pip with no configured sources but an empty local index: as on a machine whose pip
    knows only PyPI (which has no +cpu torch), without needing the network."""
    index = tmp_path / "empty-index"
    index.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index.as_uri(), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


def test_torch_index_is_not_added_when_pip_already_finds_the_cpu_torch() -> None:
    # This machine's pip has the +cpu torch in a local wheel folder: the install keeps to it.
    out = run(TORCH_INDEX, PIP)
    assert (out.returncode, out.stdout) == (0, ""), out.stderr


def test_torch_index_adds_pytorchs_cpu_index_when_pip_cannot_find_the_cpu_torch(tmp_path: Path) -> None:
    out = run(TORCH_INDEX, PIP, env=_isolated_pip_env(tmp_path))
    assert (out.returncode, out.stdout) == (0, "--extra-index-url https://download.pytorch.org/whl/cpu\n")


def test_torch_index_can_be_a_mirror_or_none(tmp_path: Path) -> None:
    mirror = "https://mirror.example/pytorch/whl/cpu"
    out = run(TORCH_INDEX, PIP, env=_isolated_pip_env(tmp_path, EXPERTMESH_TORCH_INDEX=mirror))
    assert (out.returncode, out.stdout) == (0, f"--extra-index-url {mirror}\n")
    out = run(TORCH_INDEX, PIP, env=_isolated_pip_env(tmp_path, EXPERTMESH_TORCH_INDEX="none"))
    assert (out.returncode, out.stdout) == (0, "")
