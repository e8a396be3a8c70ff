"""Weight checks: shards present, complete and consistent with their index, read by header only.

A safetensors file starts with an 8-byte header length and a JSON header naming every tensor
and its byte range, so a truncated download or an index from another revision shows without
reading a single weight.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmesh.config import ExpertConfig
from expertmesh.preflight.findings import Finding, error, info, warning
from expertmesh.preflight.jsonfile import read_json

GiB = 1 << 30
#: A safetensors header larger than this is a corrupt length field, not a header (real ones are
#: a few MB even for models with tens of thousands of tensors).
MAX_HEADER_BYTES = 100 * (1 << 20)


@dataclass
class WeightReport:
    """What the weight check found."""

    findings: list[Finding] = field(default_factory=list)
    weight_bytes: int | None = None  # the bytes of tensors the shards declare


def _human(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


@dataclass
class _Shard:
    name: str
    tensors: set[str]
    data_bytes: int


def _read_shard_header(path: Path) -> tuple[_Shard | None, Finding | None]:
    """Header of one safetensors file; an error when it is corrupt or the file is cut short."""
    refetch = f"download {path.name} again and check that its size matches the repository's listing"
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return None, error(
                    "weights-truncated", f"{path.name} is {size} bytes: too short for a header", refetch
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                return None, error(
                    "weights-corrupt", f"{path.name} does not start with a safetensors header", refetch
                )
            if header_len > size - 8:
                return None, error(
                    "weights-truncated",
                    f"{path.name} is {size} bytes but its header alone is {header_len} bytes: "
                    "the file is truncated",
                    refetch,
                )
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, error("weights-corrupt", f"{path.name} has an unreadable safetensors header", refetch)
    except OSError as e:
        return None, error("weights-unreadable", f"{path.name} cannot be read: {e}", refetch)
    if not isinstance(header, dict):
        return None, error("weights-corrupt", f"{path.name} has an unreadable safetensors header", refetch)
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    data_bytes = max((int(v.get("data_offsets", [0, 0])[1]) for v in tensors.values()), default=0)
    shard = _Shard(path.name, set(tensors), data_bytes)
    expected = 8 + header_len + data_bytes
    if size < expected:
        return shard, error(
            "weights-truncated",
            f"{path.name} is {_human(size)} but its header declares {_human(expected)}: the file is "
            "truncated (interrupted download or copy)",
            refetch,
        )
    return shard, None


def _check_index(
    model_dir: Path, index_path: Path, result: WeightReport
) -> tuple[dict[str, str] | None, dict[str, Any]]:
    fix = f"download {index_path.name} again together with its shards (from one revision)"
    data, problem = read_json(index_path, "weight index", "weights-index-invalid", fix)
    if problem:
        result.findings.append(problem)
        return None, {}
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        result.findings.append(error("weights-index-invalid", f"{index_path.name} has no weight_map", fix))
        return None, {}
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    missing = sorted({str(s) for s in weight_map.values() if not (model_dir / str(s)).is_file()})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        result.findings.append(
            error(
                "weights-shard-missing",
                f"{index_path.name} names {len(missing)} shard(s) that are not in {model_dir}: {shown}",
                "download the missing shard(s) into the model folder (the index and the shards must come "
                "from the same revision)",
            )
        )
    return {str(k): str(v) for k, v in weight_map.items()}, metadata


def _check_safetensors(model_dir: Path, files: list[Path], result: WeightReport) -> None:
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    weight_map: dict[str, str] | None = None
    metadata: dict[str, Any] = {}
    if indexes:
        weight_map, metadata = _check_index(model_dir, indexes[0], result)
    referenced = set(weight_map.values()) if weight_map else {p.name for p in files}
    if weight_map:
        # Mistral's repositories ship their own consolidated*.safetensors beside the HF shards on purpose.
        unreferenced = sorted(
            p.name for p in files if p.name not in referenced and not p.name.startswith("consolidated")
        )
        if unreferenced:
            result.findings.append(
                warning(
                    "weights-unreferenced",
                    f"{', '.join(unreferenced)} {'is' if len(unreferenced) == 1 else 'are'} not named in "
                    f"{indexes[0].name}: vLLM ignores {'it' if len(unreferenced) == 1 else 'them'}",
                    "remove stray shards (left from another revision or format), or download the index that "
                    "matches them",
                )
            )
    total = 0
    shards: dict[str, _Shard] = {}
    for path in files:
        if path.name not in referenced:
            continue
        shard, problem = _read_shard_header(path)
        if problem:
            result.findings.append(problem)
        if shard is not None:
            shards[shard.name] = shard
            total += shard.data_bytes
    if weight_map:
        wrong = [(t, s) for t, s in weight_map.items() if s in shards and t not in shards[s].tensors]
        if wrong:
            tensor, shard_name = wrong[0]
            result.findings.append(
                error(
                    "weights-index-mismatch",
                    f"{indexes[0].name} places {len(wrong)} tensor(s) in shards that do not hold them "
                    f"(e.g. {tensor!r} in {shard_name})",
                    "the index and the shards come from different revisions: download both again from "
                    "one revision",
                )
            )
        declared = metadata.get("total_size")
        all_present = all(s in shards for s in referenced)
        if isinstance(declared, int) and all_present and declared != total:
            result.findings.append(
                warning(
                    "weights-size-mismatch",
                    f"{indexes[0].name} says the tensors total {_human(declared)}, the shards declare "
                    f"{_human(total)}",
                    "the index and the shards may come from different revisions: download both again",
                )
            )
    result.weight_bytes = total


def _check_pickle_weights(model_dir: Path, files: list[Path], result: WeightReport) -> None:
    for index_path in sorted(model_dir.glob("*.bin.index.json")):
        _check_index(model_dir, index_path, result)
    empty = [p.name for p in files if p.stat().st_size == 0]
    if empty:
        result.findings.append(
            error(
                "weights-truncated",
                f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty",
                "download the weight files again",
            )
        )
    result.weight_bytes = sum(p.stat().st_size for p in files)
    result.findings.append(
        info(
            "weights-pickle",
            "weights are PyTorch pickle files: only their presence and size can be checked before loading",
            "prefer the safetensors files of the model when the repository has them",
        )
    )


def check_weights(cfg: ExpertConfig, model_dir: Path, result: WeightReport) -> None:
    """The weight files vLLM would load (by its load_format), their index and their headers."""
    load_format = str(cfg.engine_args.get("load_format", "auto"))
    if load_format == "dummy":
        result.weight_bytes = None
        result.findings.append(info("weights-dummy", "load_format: dummy: random weights, no files needed"))
        return
    safetensors = sorted(model_dir.glob("*.safetensors"))
    if safetensors and load_format in ("auto", "safetensors"):
        _check_safetensors(model_dir, safetensors, result)
        return
    pickles = sorted([*model_dir.glob("*.bin"), *model_dir.glob("*.pt")])
    if pickles and load_format in ("auto", "pt"):
        _check_pickle_weights(model_dir, pickles, result)
        return
    indexes = sorted(model_dir.glob("*.index.json"))
    for index_path in indexes:  # an index without its shards says which files are missing
        _check_index(model_dir, index_path, result)
    if not indexes:
        result.findings.append(
            error(
                "weights-missing",
                f"no weight files in {model_dir} (no *.safetensors, *.bin or *.pt)",
                "download the model's *.safetensors files (and model.safetensors.index.json when it has one) "
                "into the model folder",
            )
        )
