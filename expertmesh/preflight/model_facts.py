"""The model's shape as vLLM reads it: layers, KV heads, head size, windows, dtype, quantization, length.

vLLM's own config reader (``get_config``) and its architecture convertor are used, so the numbers
are the ones the engine would use, without building an engine or touching the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmesh.config import ExpertConfig
from expertmesh.preflight.findings import Finding, error

log = logging.getLogger(__name__)


@dataclass
class ModelFacts:
    """What the checks need to know about one model, read from its config files."""

    architectures: list[str]
    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_size: int
    #: Per layer: None for full attention, else the number of tokens it attends to (sliding window).
    layer_windows: list[int | None]
    is_mla: bool
    config_dtype: str  # dtype the checkpoint is stored in, e.g. "bfloat16"
    quant_config: dict[str, Any] | None
    #: vLLM's maximum context for this model (max_position_embeddings and friends, RoPE scaling).
    derived_max_len: int | None
    #: The max_model_len vLLM would use when the config gives none.
    default_max_len: int | None
    hf_config: Any = field(repr=False, default=None)
    hf_text_config: Any = field(repr=False, default=None)
    model_arch_config: Any = field(repr=False, default=None)

    @property
    def quant_method(self) -> str | None:
        """The checkpoint's own quantization method (``quant_method`` of its quantization_config)."""
        if not self.quant_config:
            return None
        return str(self.quant_config.get("quant_method", "")).lower() or None


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_windows(text_config: Any, num_layers: int, disable_sliding_window: bool) -> list[int | None]:
    """Per-layer attention span, from ``layer_types`` when the config has them (Gemma 3, Qwen 2, ...)."""
    window = getattr(text_config, "sliding_window", None)
    if disable_sliding_window or not isinstance(window, int) or window <= 0:
        return [None] * num_layers
    layer_types = getattr(text_config, "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(layer_types) == num_layers:
        return [window if t in ("sliding_attention", "sliding_window") else None for t in layer_types]
    # Configs without layer_types (Mistral v0.1, Phi-3): the window applies to every layer unless
    # the model says it does not use one (Qwen2's use_sliding_window: false).
    if getattr(text_config, "use_sliding_window", True) is False:
        return [None] * num_layers
    return [window] * num_layers


def _max_len(configs: tuple[Any, Any], max_model_len: int | None, disable_sliding_window: bool) -> int:
    """vLLM's own resolution of max_model_len; raises ValueError when the model cannot take it.

    Called as ModelConfig.get_and_verify_max_len calls it for a generating model: with the text
    config and without the tokenizer's model_max_length (vLLM reads that for pooling models only).
    """
    from vllm.config.model import _get_and_verify_max_len

    text_config, arch = configs
    sliding = getattr(text_config, "sliding_window", None)
    return int(
        _get_and_verify_max_len(
            text_config,
            arch,
            None,
            max_model_len,
            disable_sliding_window=disable_sliding_window,
            sliding_window=sliding if isinstance(sliding, int) else None,
        )
    )


def largest_accepted_max_len(facts: ModelFacts, upper: int, disable_sliding_window: bool = False) -> int:
    """The largest max_model_len (<= ``upper``) vLLM accepts for this model: binary search over its check."""
    configs = (facts.hf_text_config, facts.model_arch_config)
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            _max_len(configs, mid, disable_sliding_window)
            lo = mid
        except ValueError:
            hi = mid - 1
    return lo


def read_model_facts(model_dir: Path, cfg: ExpertConfig) -> tuple[ModelFacts | None, list[Finding]]:
    """Read the model's config through vLLM; a config vLLM cannot read is an error with its message."""
    import vllm.config  # noqa: F401  (vllm.transformers_utils needs vllm.config imported first)
    from vllm.transformers_utils.config import get_config, get_hf_text_config
    from vllm.transformers_utils.model_arch_config_convertor import (
        MODEL_ARCH_CONFIG_CONVERTORS,
        ModelArchConfigConvertorBase,
    )

    try:
        hf_config = get_config(str(model_dir), cfg.trust_remote_code)
        text_config = get_hf_text_config(hf_config)
        convertor_cls = MODEL_ARCH_CONFIG_CONVERTORS.get(hf_config.model_type, ModelArchConfigConvertorBase)
        convertor = convertor_cls(hf_config, text_config)
        arch = convertor.convert()
        config_dtype = convertor.get_torch_dtype(hf_config, str(model_dir), revision=None, config_format="hf")
    except Exception as e:  # transformers and vLLM raise many types here; the message is what matters
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e) and not cfg.trust_remote_code:
            fix = "set trust_remote_code: true for this expert if you trust the code in the model folder"
        else:
            fix = (
                "the installed transformers/vLLM cannot read this config.json: check model_type and the "
                "fields it names, or upgrade vLLM"
            )
        return None, [error("config-json-unusable", f"vLLM cannot read the model config: {message}", fix)]

    num_layers = int(arch.total_num_hidden_layers or 0)
    disable_sw = bool(cfg.engine_args.get("disable_sliding_window", False))
    facts = ModelFacts(
        architectures=list(arch.architectures or []),
        model_type=str(hf_config.model_type),
        num_layers=num_layers,
        num_attention_heads=int(arch.total_num_attention_heads or 0),
        num_kv_heads=int(arch.total_num_kv_heads or 0),
        head_size=int(arch.head_size or 0),
        layer_windows=_layer_windows(text_config, num_layers, disable_sw),
        is_mla=bool(arch.is_deepseek_mla),
        config_dtype=_dtype_name(config_dtype),
        quant_config=dict(arch.quantization_config) if arch.quantization_config else None,
        derived_max_len=None,
        default_max_len=None,
        hf_config=hf_config,
        hf_text_config=text_config,
        model_arch_config=arch,
    )
    derived, _key = arch.derived_max_model_len_and_key
    facts.derived_max_len = None if derived == float("inf") else int(derived)
    try:
        facts.default_max_len = _max_len((text_config, arch), None, disable_sw)
    except (ValueError, TypeError, AttributeError) as e:  # private vLLM helper: tolerate a changed shape
        log.debug("vLLM max_model_len resolution failed: %s", e)
        facts.default_max_len = facts.derived_max_len
    return facts, []


def check_max_model_len(cfg: ExpertConfig, facts: ModelFacts) -> list[Finding]:
    """max_model_len beyond what the model supports: vLLM refuses to start."""
    if cfg.max_model_len is None:
        return []
    disable_sw = bool(cfg.engine_args.get("disable_sliding_window", False))
    try:
        _max_len((facts.hf_text_config, facts.model_arch_config), cfg.max_model_len, disable_sw)
    except ValueError as e:
        limit = largest_accepted_max_len(facts, cfg.max_model_len, disable_sw)
        reason = str(e).split(".")[0]
        return [
            error(
                "max-len-model",
                f"max_model_len {cfg.max_model_len} is longer than this model supports ({reason})",
                f"set max_model_len: {limit} or less",
            )
        ]
    except (TypeError, AttributeError) as e:  # private vLLM helper: tolerate a changed signature
        log.debug("vLLM max_model_len check failed: %s", e)
    return []
