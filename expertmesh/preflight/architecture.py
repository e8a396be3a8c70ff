"""Architecture check: is the model's class one the installed vLLM can run? Asked of vLLM's registry."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from expertmesh.preflight.findings import Finding, error, warning
from expertmesh.preflight.model_facts import ModelFacts


def supported_architectures() -> set[str]:
    """Every architecture name the installed vLLM's model registry knows."""
    from vllm.model_executor.models import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def _vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "?"))


def _transformers_has(arch: str) -> bool:
    import transformers

    try:
        return getattr(transformers, arch, None) is not None
    except Exception:  # transformers' lazy module raises on classes whose optional deps are missing
        return False


def check_architecture(facts: ModelFacts, raw_config: Mapping[str, Any] | None = None) -> list[Finding]:
    """The model's ``architectures`` against vLLM's registry (no hand-kept list).

    ``raw_config`` is config.json as written: when it has no ``architectures``, vLLM substitutes
    the base model class of the model type (e.g. LlamaModel), which has no language-model head.
    """
    fix = 'add "architectures": ["<ModelClass>"] to config.json (copy it from the model\'s repository)'
    if raw_config is not None and not raw_config.get("architectures"):
        guessed = f" and vLLM would load {', '.join(facts.architectures)}" if facts.architectures else ""
        return [
            error(
                "architectures-missing",
                "config.json has no 'architectures' list" + guessed + ", the base model class without a "
                "language-model head: it cannot generate text",
                fix,
            )
        ]
    if not facts.architectures:
        return [error("architectures-missing", "config.json has no 'architectures' list", fix)]
    supported = supported_architectures()
    if any(a in supported for a in facts.architectures):
        return []
    names = ", ".join(facts.architectures)
    if any(_transformers_has(a) for a in facts.architectures):
        return [
            warning(
                "arch-transformers-backend",
                f"vLLM {_vllm_version()} has no native implementation of {names}; it will try its "
                "Transformers backend, which is slower and fails for models whose attention it cannot "
                "replace",
                "prefer a model with a natively supported architecture, or upgrade vLLM; "
                "set engine_args: {model_impl: transformers} to make the choice explicit",
            )
        ]
    close = difflib.get_close_matches(facts.architectures[0], sorted(supported), n=3, cutoff=0.7)
    hint = f" (close supported names: {', '.join(close)})" if close else ""
    return [
        error(
            "arch-unsupported",
            f"architecture {names} is not supported by the installed vLLM {_vllm_version()}{hint}",
            "use a model whose architecture vLLM supports (see vLLM's supported-models list), correct the "
            "architectures entry in config.json, or upgrade vLLM",
        )
    ]
