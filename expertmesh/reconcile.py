"""What a config reload changes for ``expertmesh up``: the experts to start, stop or restart.

An expert is known by its ``expert_id``. One whose entry is equal and whose addresses are the
same is left running (keys only the gateway reads, such as ``replicas``, may differ); one whose
entry differs in any other key (model, engine settings, port) or whose assigned addresses
moved (``expert_base_port``, or experts added before it) is restarted with the new settings,
since an engine's settings are fixed at its start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from expertmesh.config import MeshConfig

#: The mesh keys an expert reads at its start (besides its own entry): a change reaches the
#: running experts only when they restart.
EXPERT_MESH_KEYS = ("internal_tls", "limits", "memory_budget_gib", "allow_insecure")

#: Keys of an expert's entry that only the gateway reads (what it dials): a change needs no restart.
GATEWAY_ONLY_KEYS = frozenset({"description", "address", "replicas"})


@dataclass
class Changes:
    """The experts a reload adds, removes and restarts (by expert_id, in config order)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: expert_id -> the keys that changed ("address" when only its assigned address moved)
    changed: dict[str, list[str]] = field(default_factory=dict)
    #: mesh keys of EXPERT_MESH_KEYS that changed
    mesh_keys: list[str] = field(default_factory=list)


def _addresses(config: MeshConfig) -> dict[str, list[str]]:
    return {e.expert_id: config.local_addresses(i) for i, e in enumerate(config.experts)}


def diff(old: MeshConfig, new: MeshConfig) -> Changes:
    """The experts that ``new`` adds, removes and changes against ``old``."""
    before = {e.expert_id: e.model_dump() for e in old.experts}
    after = {e.expert_id: e.model_dump() for e in new.experts}
    old_at, new_at = _addresses(old), _addresses(new)
    changes = Changes(
        added=[i for i in after if i not in before],
        removed=[i for i in before if i not in after],
        mesh_keys=[k for k in EXPERT_MESH_KEYS if getattr(old, k) != getattr(new, k)],
    )
    for expert_id, entry in after.items():
        if expert_id not in before:
            continue
        keys = [k for k in entry if k not in GATEWAY_ONLY_KEYS and entry[k] != before[expert_id].get(k)]
        if not keys and new_at[expert_id] != old_at[expert_id]:
            keys = ["address"]
        if keys:
            changes.changed[expert_id] = keys
    return changes
