"""The expert's tokenizer, loaded on its own (without the engine)."""

from __future__ import annotations

from typing import Any

from expertmesh.config import ExpertConfig


def load_tokenizer(cfg: ExpertConfig) -> Any:
    """The tokenizer the engine uses, loaded on its own so that a cold expert can tokenize."""
    from vllm.tokenizers import get_tokenizer

    kwargs = {k: cfg.engine_args[k] for k in ("tokenizer_mode", "revision") if k in cfg.engine_args}
    return get_tokenizer(cfg.tokenizer or cfg.model_path, trust_remote_code=cfg.trust_remote_code, **kwargs)
