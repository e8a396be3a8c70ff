"""Model folder checks: the folder itself and config.json; tokenizer and weights in their own modules."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmesh.config import ExpertConfig
from expertmesh.preflight.findings import Finding, error, info, warning
from expertmesh.preflight.jsonfile import read_json
from expertmesh.preflight.tokenizer_files import TokenizerReport, check_tokenizer
from expertmesh.preflight.weight_files import WeightReport, check_weights


@dataclass
class ModelFiles:
    """What the model folder holds, as far as the checks need it."""

    path: Path | None  # the local folder, None when there is none to read
    config: dict[str, Any] | None = None  # config.json, when it parsed
    tokenizer_config: dict[str, Any] | None = None
    weight_bytes: int | None = None  # sum of the tensors the shards declare
    findings: list[Finding] = field(default_factory=list)


def _local_folder(cfg: ExpertConfig) -> tuple[Path | None, list[Finding]]:
    """The folder to check: the given path, or the hub cache's snapshot of a hub id."""
    given = cfg.model_path
    path = Path(given).expanduser()
    if path.is_dir():
        return path, []
    if path.exists():
        return None, [
            error(
                "model-not-dir",
                f"model_path {given} is a file, not a model folder",
                "point model_path at the folder that holds config.json, the tokenizer and the weights",
            )
        ]
    looks_like_hub_id = not path.is_absolute() and given.count("/") == 1 and not given.startswith((".", "~"))
    if looks_like_hub_id:
        snapshot = _hub_snapshot(given)
        if snapshot is not None:
            return snapshot, [info("model-hub-cache", f"{given} is read from the hub cache at {snapshot}")]
        return None, [
            warning(
                "model-not-local",
                f"model_path {given!r} is not a local folder and not in the hub cache: vLLM would download "
                "it at start, so its files cannot be checked now",
                f"download it first (hf download {given} --local-dir DIR) and set model_path: DIR",
            )
        ]
    return None, [
        error(
            "model-missing",
            f"model folder {given} does not exist",
            f"download the model into {given} (e.g. hf download ORG/NAME --local-dir {given}) "
            "or correct model_path",
        )
    ]


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id=repo_id, filename="config.json")
    return Path(found).parent if isinstance(found, str) else None


def inspect_model_files(cfg: ExpertConfig) -> ModelFiles:
    """Check the expert's model folder without loading anything; collect every problem found."""
    folder, findings = _local_folder(cfg)
    result = ModelFiles(folder, findings=findings)
    if folder is None:
        return result
    config_path = folder / "config.json"
    if not config_path.is_file():
        result.findings.append(
            error(
                "config-json-missing",
                f"{folder} has no config.json",
                "copy config.json from the model's repository into the model folder",
            )
        )
    else:
        data, problem = read_json(
            config_path, "model config", "config-json-invalid", "repair config.json or download it again"
        )
        if problem:
            result.findings.append(problem)
        elif not isinstance(data, dict):
            result.findings.append(
                error(
                    "config-json-invalid",
                    f"{config_path} is not a JSON object",
                    "repair config.json or download it again",
                )
            )
        else:
            result.config = data
    if os.access(folder, os.R_OK | os.X_OK):
        tokenizer = TokenizerReport()
        check_tokenizer(cfg, folder, tokenizer)
        weights = WeightReport()
        check_weights(cfg, folder, weights)
        result.findings += tokenizer.findings + weights.findings
        result.tokenizer_config = tokenizer.tokenizer_config
        result.weight_bytes = weights.weight_bytes
    else:
        result.findings.append(
            error("model-unreadable", f"{folder} cannot be read by this user", "fix the folder's permissions")
        )
    return result
