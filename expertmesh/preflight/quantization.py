"""dtype x quantization x device: the combinations vLLM refuses, found before it gets the chance.

The facts come from the installed vLLM: its list of quantization methods, each method's
supported activation dtypes, minimum GPU capability and config files, and the model types for
which it forbids float16. Only what vLLM does not expose is kept here, with its source.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from expertmesh.config import ExpertConfig
from expertmesh.preflight.device import DeviceFacts
from expertmesh.preflight.findings import Finding, error, info
from expertmesh.preflight.model_facts import ModelFacts

DTYPE_ALIASES = {"half": "float16", "float": "float32"}

#: Quantization methods vLLM's CPU backend runs. vLLM has no API for this (the CPU platform's
#: ``supported_quantization`` is empty, meaning "not declared"); the list is the x86/Arm CPU
#: columns of vLLM's "Supported Hardware" table (docs/features/quantization): AWQ, GPTQ and
#: llm-compressor INT8 (compressed-tensors), run by its CPU WNA16 / W8A8 kernels.
CPU_QUANTIZATION = frozenset({"awq", "auto_awq", "gptq", "auto_gptq", "compressed-tensors"})

#: Names vLLM accepts for a checkpoint of the given ``quant_method``: its AWQ and GPTQ configs map
#: these onto the checkpoint's method (``override_quantization_method``).
QUANT_FAMILIES = {
    "awq": frozenset({"awq", "auto_awq", "awq_marlin"}),
    "gptq": frozenset({"gptq", "auto_gptq", "gptq_marlin"}),
}


@dataclass(frozen=True)
class DtypeDecision:
    """The dtype the engine would compute in and the quantization method it would use."""

    dtype: str
    quantization: str | None


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _model_allows(model_type: str, dtype: str) -> tuple[bool, str]:
    """vLLM's per-model dtype rule (e.g. Gemma 2/3 refuse float16); (allowed, vLLM's reason)."""
    from vllm.config import model as vllm_model

    try:
        vllm_model._check_valid_dtype(model_type, _torch_dtype(dtype))
    except ValueError as e:
        return False, str(e)
    return True, ""


def _resolve_auto(facts: ModelFacts, device: DeviceFacts) -> str:
    """What ``dtype: auto`` becomes: vLLM's _resolve_auto_dtype, for the given device's dtypes."""
    supported = [d for d in device.supported_dtypes if _model_allows(facts.model_type, d)[0]]
    preferred = supported[0] if supported else "float32"
    stored = facts.config_dtype
    if stored == "float32":  # vLLM downcasts float32 checkpoints to the device's preferred dtype
        return preferred
    return stored if stored in supported else preferred


def _quant_class(method: str) -> type | None:
    from vllm.model_executor.layers.quantization import get_quantization_config

    try:
        return get_quantization_config(method)
    except (ValueError, ImportError, KeyError):
        return None


def _act_dtypes(cls: type) -> list[str] | None:
    try:
        return [_name(d) for d in cls.get_supported_act_dtypes()]  # type: ignore[attr-defined]
    except TypeError:  # some configs declare it as an instance method: no class-level fact
        return None


def _min_capability(cls: type) -> int | None:
    try:
        return int(cls.get_min_capability())  # type: ignore[attr-defined]
    except (TypeError, NotImplementedError):
        return None


def _check_method(
    cfg: ExpertConfig, facts: ModelFacts, model_files: set[str], findings: list[Finding]
) -> str | None:
    """The effective quantization method; problems with the declared one go to ``findings``."""
    from vllm.model_executor.layers.quantization import (
        DEPRECATED_QUANTIZATION_METHODS,
        QUANTIZATION_METHODS,
    )

    declared = cfg.quantization.lower() if cfg.quantization else None
    ckpt = facts.quant_method
    if declared is None:
        if ckpt:
            findings.append(
                info("quant-from-checkpoint", f"the checkpoint is {ckpt}-quantized; vLLM uses it")
            )
        return ckpt
    if declared not in QUANTIZATION_METHODS:
        close = difflib.get_close_matches(declared, QUANTIZATION_METHODS, n=1)
        fix = f"set quantization: {close[0]}" if close else "remove quantization: or use a method vLLM knows"
        findings.append(
            error("quant-unknown", f"quantization {declared!r} is not a method the installed vLLM knows", fix)
        )
        return None
    if ckpt and declared != ckpt and declared not in QUANT_FAMILIES.get(ckpt, ()):
        findings.append(
            error(
                "quant-mismatch",
                f"quantization: {declared} is declared, but the checkpoint's quantization_config says {ckpt}",
                f"set quantization: {ckpt} for this expert (or remove it: vLLM reads the checkpoint's "
                "method)",
            )
        )
        return ckpt
    if not ckpt:
        cls = _quant_class(declared)
        files = list(cls.get_config_filenames()) if cls is not None else []  # type: ignore[attr-defined]
        if files and not model_files & set(files):
            findings.append(
                error(
                    "quant-not-in-model",
                    f"quantization: {declared} is declared, but the model has no quantization_config in "
                    f"config.json and none of {', '.join(files)}: these are not {declared} weights",
                    f"remove quantization: for this expert, or point model_path at the {declared} checkpoint",
                )
            )
    if declared in DEPRECATED_QUANTIZATION_METHODS and not cfg.engine_args.get(
        "allow_deprecated_quantization"
    ):
        findings.append(
            error(
                "quant-deprecated",
                f"quantization {declared} is deprecated; the installed vLLM refuses it by default",
                "use a current method, or set engine_args: {allow_deprecated_quantization: true}",
            )
        )
    return declared


def _check_device(method: str, cls: type | None, device: DeviceFacts) -> list[Finding]:
    if device.is_cpu:
        if method in CPU_QUANTIZATION:
            return []
        return [
            error(
                "quant-device",
                f"{method} quantization has no kernels in vLLM's CPU backend (CPU runs "
                f"{', '.join(sorted(CPU_QUANTIZATION))})",
                "run this expert on a GPU host, or use an AWQ/GPTQ/compressed-tensors INT8 checkpoint on CPU",
            )
        ]
    need = _min_capability(cls) if cls is not None else None
    if need is not None and device.capability is not None and device.capability < need:
        return [
            error(
                "quant-capability",
                f"{method} needs GPU compute capability {need / 10:.1f} or newer; this GPU has "
                f"{device.capability / 10:.1f}",
                "run this expert on a newer GPU, or use a checkpoint in a format this GPU supports "
                "(e.g. GPTQ from capability 6.0)",
            )
        ]
    return []


def _dtype_source(cfg: ExpertConfig, facts: ModelFacts) -> str:
    if cfg.dtype == "auto":
        return f"dtype: auto takes the checkpoint's {facts.config_dtype}"
    return f"dtype: {cfg.dtype} is set for this expert"


def check_dtype_and_quantization(
    cfg: ExpertConfig, facts: ModelFacts, device: DeviceFacts, model_files: set[str]
) -> tuple[DtypeDecision, list[Finding]]:
    """Find dtype/quantization/device conflicts; returns the dtype the engine would use."""
    findings: list[Finding] = []
    requested = DTYPE_ALIASES.get(cfg.dtype, cfg.dtype)
    dtype = _resolve_auto(facts, device) if requested == "auto" else requested
    method = _check_method(cfg, facts, model_files, findings)
    cls = _quant_class(method) if method else None
    act = _act_dtypes(cls) if cls is not None else None

    def fits(d: str) -> bool:
        return (
            d in device.supported_dtypes
            and _model_allows(facts.model_type, d)[0]
            and (act is None or d in act)
        )

    # The checkpoint's own dtype first: it needs no cast (AWQ checkpoints are stored in float16).
    order = dict.fromkeys([facts.config_dtype, "bfloat16", "float16", "float32"])
    candidates = [d for d in order if fits(d)]
    suggestion = f"set dtype: {candidates[0]} for this expert" if candidates else ""

    if dtype not in device.supported_dtypes:
        findings.append(
            error(
                "dtype-device",
                f"{_dtype_source(cfg, facts)}, which this {device.kind.upper()} does not support "
                f"(supported: {', '.join(device.supported_dtypes)})",
                suggestion or "run this expert on a device that supports its dtype",
            )
        )
    allowed, reason = _model_allows(facts.model_type, dtype)
    if not allowed:
        findings.append(
            error(
                "dtype-model",
                f"{_dtype_source(cfg, facts)}; vLLM refuses it: {reason}",
                suggestion or f"use a dtype {facts.model_type} supports",
            )
        )
    if method and act is not None and dtype not in act:
        if candidates:
            fix = f"{suggestion} ({method} kernels run in {', '.join(act)})"
        else:
            fix = (
                f"no dtype satisfies both: {facts.model_type} cannot run in "
                f"{', '.join(d for d in act if not _model_allows(facts.model_type, d)[0]) or dtype} and "
                f"{method} kernels run only in {', '.join(act)}; use a checkpoint of this model that is not "
                f"{method}-quantized (e.g. its {facts.config_dtype} weights)"
            )
        findings.append(
            error(
                "quant-dtype",
                f"{_dtype_source(cfg, facts)}, but the installed vLLM runs {method} only in {', '.join(act)}",
                fix,
            )
        )
    if method:
        findings.extend(_check_device(method, cls, device))
    half = {"float16", "bfloat16"}
    if requested != "auto" and dtype in half and facts.config_dtype in half and dtype != facts.config_dtype:
        findings.append(
            info(
                "dtype-cast",
                f"weights stored in {facts.config_dtype} run as {dtype} (vLLM casts them at load)",
            )
        )
    return DtypeDecision(dtype, method), findings
