"""The model's own sampling defaults (its ``generation_config.json``), for fields a request leaves unset.

A model's authors tune temperature, top_p, top_k, repetition penalties and the like for it;
vLLM's neutral defaults (temperature 1, no top_p/top_k) make many instruct models ramble. vLLM
reads them with ``ModelConfig.get_diff_sampling_param()`` (what its OpenAI server applies);
the expert applies the same ones, under whatever the request sets itself. They are read
once per loaded engine, not per request: reading them opens the model's files.
"""

from __future__ import annotations

from typing import Any

from .request import DEFAULT_MAX_TOKENS


class SamplingDefaults:
    """The defaults of the engine last asked about (one engine per expert at a time)."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._defaults: dict[str, Any] = {}

    def of(self, engine: Any) -> dict[str, Any]:
        """The model's non-neutral sampling fields (``max_tokens`` included when the model sets
        ``max_new_tokens``), as vLLM SamplingParams keyword arguments."""
        if engine is not self._engine:
            self._defaults = dict(engine.model_config.get_diff_sampling_param())
            self._engine = engine
        return self._defaults


def with_defaults(kwargs: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` (the request's own fields) over the model's defaults; max_tokens is not one."""
    return {**{k: v for k, v in defaults.items() if k != "max_tokens"}, **kwargs}


def default_max_tokens(defaults: dict[str, Any]) -> int:
    """max_tokens for a request that sets none: the model's ``max_new_tokens``, else ours."""
    value = defaults.get("max_tokens")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_TOKENS
