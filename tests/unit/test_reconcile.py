"""What a config reload changes for `expertmesh up` (expertmesh.reconcile), and an invalid
config refused with the field named and nothing changed (no process is started here; the
reload with real processes is tests/integration/test_up_reload.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertmesh.config import load_config
from expertmesh.reconcile import diff
from expertmesh.supervisor import Supervisor

from ..support import write_config


def expert(expert_id: str, domain: str, **extra: Any) -> dict[str, Any]:
    return {"expert_id": expert_id, "domain": domain, "model_path": f"/m/{expert_id}", **extra}


def test_diff_names_added_removed_and_changed_experts(tmp_path: Path) -> None:
    old = load_config(write_config(tmp_path / "a.yaml", [expert("g", "general", port=7001)]))
    new = load_config(
        write_config(
            tmp_path / "b.yaml",
            [expert("g", "general", port=7001), expert("c", "code", port=7002)],
            memory_budget_gib=8,
        )
    )
    changes = diff(old, new)
    assert (changes.added, changes.removed, changes.changed) == (["c"], [], {})
    assert changes.mesh_keys == ["memory_budget_gib"]
    back = diff(new, old)
    assert (back.added, back.removed, back.changed) == ([], ["c"], {})
    same = diff(old, old)
    assert (same.added, same.removed, same.changed, same.mesh_keys) == ([], [], {}, [])


def test_diff_restarts_an_expert_whose_settings_or_assigned_address_changed(tmp_path: Path) -> None:
    old = load_config(write_config(tmp_path / "a.yaml", [expert("g", "general"), expert("c", "code")]))
    tuned = load_config(
        write_config(tmp_path / "b.yaml", [expert("g", "general", max_model_len=512), expert("c", "code")])
    )
    assert diff(old, tuned).changed == {"g": ["max_model_len"]}
    # a replica elsewhere is the gateway's business: g's own process goes on
    wider = load_config(
        write_config(
            tmp_path / "w.yaml", [expert("g", "general", replicas=["10.0.0.9:50051"]), expert("c", "code")]
        )
    )
    elsewhere = diff(old, wider)
    assert (elsewhere.added, elsewhere.removed, elsewhere.changed) == ([], [], {})
    # c's port is assigned by its position: removing g moves it
    moved = load_config(write_config(tmp_path / "c.yaml", [expert("c", "code")]))
    changes = diff(old, moved)
    assert changes.removed == ["g"] and changes.changed == {"c": ["address"]}


async def test_an_invalid_reload_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    path = write_config(tmp_path / "mesh.yaml", [expert("g", "general")])
    config = load_config(path)
    said: list[str] = []
    sup = Supervisor(config, path, tmp_path / "logs", said.append)
    write_config(path, [expert("g", "general"), expert("c", "code", max_modle_len=512)])
    assert await sup.apply_reload() is False
    (line,) = said
    assert line.startswith("config reload rejected, nothing changed") and "max_modle_len" in line, line
    assert sup.config is config and [c.name for c in sup.experts] == ["g"]


async def test_leaving_experts_stop_together_before_any_expert_starts(tmp_path: Path) -> None:
    # n takes the port a held: it must not start while a's process may still hold it
    path = write_config(
        tmp_path / "mesh.yaml", [expert("a", "general"), expert("b", "code"), expert("c", "math")]
    )
    sup = Supervisor(load_config(path), path, tmp_path / "logs", lambda line: None)
    steps: list[tuple[str, list[str]]] = []

    async def terminate(children: list[Any], deadline: float) -> None:
        steps.append(("terminate", [c.name for c in children]))

    async def reap(child: Any) -> None:
        steps.append(("reap", [child.name]))

    async def launch(child: Any) -> None:
        steps.append(("launch", [child.name]))

    sup._terminate, sup._reap, sup._launch = terminate, reap, launch  # type: ignore[method-assign]
    write_config(path, [expert("n", "general"), expert("c", "math", max_model_len=512)])
    assert await sup.apply_reload() is True
    assert steps == [
        ("terminate", ["a", "b", "c"]),  # one SIGTERM round, one grace period for all
        ("reap", ["a"]),
        ("reap", ["b"]),
        ("reap", ["c"]),
        ("launch", ["n"]),
        ("launch", ["c"]),
    ]
    assert [c.name for c in sup.experts] == ["n", "c"]
