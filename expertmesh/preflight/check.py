"""Run every preflight check for one expert or a whole mesh, and the ``expertmesh check`` command."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from expertmesh.config import ExpertConfig, MeshConfig
from expertmesh.console import console
from expertmesh.preflight.architecture import check_architecture
from expertmesh.preflight.config_checks import load_for_check
from expertmesh.preflight.cpu_backend import check_cpu_backend
from expertmesh.preflight.device import DeviceFacts, detect_device
from expertmesh.preflight.findings import (
    CONFIG_KEY,
    MESH_KEY,
    Finding,
    error,
    has_errors,
    sort_findings,
    warning,
)
from expertmesh.preflight.memory import MemoryPlan, check_memory, check_mesh_memory
from expertmesh.preflight.model_facts import check_max_model_len, read_model_facts
from expertmesh.preflight.model_files import inspect_model_files
from expertmesh.preflight.quantization import check_dtype_and_quantization
from expertmesh.preflight.report import render_findings, results_to_json
from expertmesh.preflight.security import check_expert_security, check_mesh_security

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ExpertCheck:
    """Findings for one expert, and its memory plan for the mesh-wide check."""

    findings: list[Finding] = field(default_factory=list)
    plan: MemoryPlan | None = None


def _guarded(stage: str, findings: list[Finding], fn: Callable[[], T]) -> T | None:
    """Run one check; a crash in it is reported as a warning so the other checks still run."""
    try:
        return fn()
    except Exception as e:  # a check must never take `up` down: report and go on
        log.debug("preflight %s check failed", stage, exc_info=True)
        findings.append(
            warning(
                "check-failed",
                f"the {stage} check could not finish: {type(e).__name__}: {e}",
                "this is a preflight limitation, not a verdict on the expert; the engine's own log will tell",
            )
        )
        return None


def inspect_expert(cfg: ExpertConfig, device: DeviceFacts) -> ExpertCheck:
    """Every check for one expert on the given device; nothing is loaded."""
    files = inspect_model_files(cfg)
    result = ExpertCheck(list(files.findings))
    findings = result.findings
    path = files.path
    if path is None or files.config is None:
        result.findings = sort_findings(findings)
        return result
    read = _guarded("model config", findings, lambda: read_model_facts(path, cfg))
    facts, problems = read if read is not None else (None, [])
    findings.extend(problems)
    if facts is None:
        result.findings = sort_findings(findings)
        return result
    names = {p.name for p in path.iterdir()}
    findings.extend(_guarded("architecture", findings, lambda: check_architecture(facts, files.config)) or [])
    findings.extend(_guarded("max_model_len", findings, lambda: check_max_model_len(cfg, facts)) or [])
    decided = _guarded(
        "dtype/quantization", findings, lambda: check_dtype_and_quantization(cfg, facts, device, names)
    )
    if decided is not None:
        decision, problems = decided
        findings.extend(problems)
        memory = _guarded(
            "memory", findings, lambda: check_memory(cfg, facts, decision.dtype, files.weight_bytes, device)
        )
        if memory is not None:
            result.plan, problems = memory
            findings.extend(problems)
        if device.is_cpu:
            findings.extend(
                _guarded("CPU backend", findings, lambda: check_cpu_backend(cfg, facts, decision.dtype)) or []
            )
    result.findings = sort_findings(findings)
    return result


def _vllm_missing(e: ImportError) -> Finding:
    return error(
        "vllm-missing",
        f"vLLM cannot be imported ({e}), so nothing can be checked against it",
        "install the project with its cpu or gpu extra (pip install -e '.[cpu]' or '.[gpu]')",
    )


def check_expert(
    cfg: ExpertConfig, mesh: MeshConfig | None = None, *, device: DeviceFacts | None = None
) -> list[Finding]:
    """Every problem with one expert's config and model folder, errors first; no weights are loaded.

    ``mesh`` is accepted for context (mesh-wide checks, e.g. the eager experts' memory together,
    are made by :func:`check_mesh`). ``device`` defaults to this machine.
    """
    del mesh  # the per-expert checks do not depend on the other experts
    try:
        device = device or detect_device()
    except ImportError as e:
        return [_vllm_missing(e)]
    return inspect_expert(cfg, device).findings


def check_mesh(config: MeshConfig, *, device: DeviceFacts | None = None) -> dict[str, list[Finding]]:
    """Findings per expert id, plus ``"(mesh)"`` for the mesh as a whole (always present, maybe empty)."""
    try:
        device = device or detect_device()
    except ImportError as e:
        return {**{x.expert_id: [_vllm_missing(e)] for x in config.experts}, MESH_KEY: []}
    results: dict[str, list[Finding]] = {}
    plans: list[MemoryPlan] = []
    for expert in config.experts:
        checked = inspect_expert(expert, device)
        security = check_expert_security(config, expert.expert_id)
        results[expert.expert_id] = sort_findings([*security, *checked.findings])
        if checked.plan is not None:
            plans.append(checked.plan)
    results[MESH_KEY] = sort_findings([*check_mesh_security(config), *check_mesh_memory(plans, device)])
    return results


def main_check(config: str | None, *, as_json: bool = False, device: DeviceFacts | None = None) -> int:
    """``expertmesh check``: report every problem of the config and its experts; 0 only without errors.

    ``--json`` prints ``{"config": {path, reason}, "device": {...}, "results": {key: [finding...]},
    "errors": n, "warnings": n, "ok": bool}``; keys are expert ids plus ``(config)`` and ``(mesh)``.
    """
    # vLLM logs its start-up chatter (Triton, platform) at import; a report has no use for it.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("vllm").setLevel(logging.ERROR)  # messages logged before vLLM configures its own
    config_model, source, config_findings = load_for_check(config)
    results: dict[str, list[Finding]] = {CONFIG_KEY: config_findings}
    extra: dict[str, Any] = {"config": {"path": str(source.path), "reason": source.reason}, "device": None}
    labels: dict[str, str] = {}
    if config_model is not None:
        try:
            device = device or detect_device()
        except ImportError as e:
            results[CONFIG_KEY].append(_vllm_missing(e))
        else:
            extra["device"] = asdict(device)
            mesh_results = check_mesh(config_model, device=device)
            mesh_findings = mesh_results.pop(MESH_KEY)
            results.update(mesh_results)
            results[MESH_KEY] = [Finding("info", "device", device.describe()), *mesh_findings]
            labels = {e.expert_id: f"{e.model_path} ({e.load})" for e in config_model.experts}
    if as_json:
        print(json.dumps(results_to_json(results, extra=extra), indent=2))
    else:
        render_findings(results, console(), labels=labels)
    failed = any(has_errors(fs) for fs in results.values())
    if failed and not as_json:
        print("preflight found errors: experts with errors would not start", file=sys.stderr)
    return 1 if failed else 0
