"""The mesh's scheduling group: a positive nice for up's session, never lowered, off without autogroup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh import autogroup


def _files(tmp_path: Path, nice: int, enabled: str = "1") -> tuple[Path, Path]:
    group, on = tmp_path / "autogroup", tmp_path / "enabled"
    group.write_text(f"/autogroup-7 nice {nice}\n")
    on.write_text(f"{enabled}\n")
    return group, on


def test_raises_the_nice_of_the_session_group(tmp_path: Path) -> None:
    group, on = _files(tmp_path, 0)
    said = autogroup.lower_session_weight(10, group, on)
    assert group.read_text() == "10"
    assert "nice 0 -> 10" in said


def test_keeps_a_group_that_is_nicer_already(tmp_path: Path) -> None:
    group, on = _files(tmp_path, 15)
    said = autogroup.lower_session_weight(10, group, on)
    assert autogroup.current_nice(group) == 15
    assert "keeps nice 15" in said


@pytest.mark.parametrize("nice, enabled", [(None, "1"), (10, "0")])
def test_leaves_it_alone_when_off(tmp_path: Path, nice: int | None, enabled: str) -> None:
    group, on = _files(tmp_path, 0, enabled)
    autogroup.lower_session_weight(nice, group, on)
    assert autogroup.current_nice(group) == 0


def test_no_autogroup_file_changes_nothing(tmp_path: Path) -> None:
    said = autogroup.lower_session_weight(10, tmp_path / "missing", tmp_path / "missing-too")
    assert "nothing to do" in said


@pytest.mark.skipif(autogroup.current_nice() is None, reason="this kernel has no autogroup scheduling")
def test_sets_the_real_group_of_a_new_session() -> None:
    # A child in a session of its own (as `up` started from a terminal) sets its group; the
    # kernel then reports the new nice for that session only, not for ours.
    ours = autogroup.current_nice()
    code = (
        "from expertmesh import autogroup; autogroup.lower_session_weight(12); "
        "print(autogroup.current_nice())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, start_new_session=True
    )
    assert out.returncode == 0, out.stderr
    if autogroup.ENABLED.read_text().strip() == "1":
        assert out.stdout.split()[-1] == "12"
    assert autogroup.current_nice() == ours
