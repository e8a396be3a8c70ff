"""Model folders for the preflight tests: real config.json, tokenizer and safetensors files, tiny or cut.

Large real models are imitated with sparse files: a safetensors header that declares the real
tensor sizes followed by a hole, so a "55 GB" Gemma 3 shard takes a few KB of disk.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from expertmesh.preflight.device import DeviceFacts, GiB

TOKENIZER_JSON = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def cpu_host(total_gib: float = 24, available_gib: float | None = None) -> DeviceFacts:
    """A CPU host like the one CI runs on (vLLM's CPU backend)."""
    available = total_gib if available_gib is None else available_gib
    return DeviceFacts("cpu", "cpu", int(total_gib * GiB), int(available * GiB))


def gpu_host(total_gib: float = 80, capability: int = 90, available_gib: float | None = None) -> DeviceFacts:
    """A GPU host (an H100 80GB by default)."""
    available = total_gib if available_gib is None else available_gib
    return DeviceFacts("gpu", "NVIDIA H100 80GB HBM3", int(total_gib * GiB), int(available * GiB), capability)


def llama_config(**overrides: Any) -> dict[str, Any]:
    """A tiny Llama config.json (2 layers, head_dim 64), like the demo model's."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_hidden_layers": 2,
        "max_position_embeddings": 2048,
        "vocab_size": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    config.update(overrides)
    return config


def write_tokenizer(folder: Path, *, chat_template: bool = True) -> None:
    """tokenizer.json and tokenizer_config.json (with a chat template unless told otherwise)."""
    (folder / "tokenizer.json").write_text(json.dumps(TOKENIZER_JSON))
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 60}
    if chat_template:
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))


def tiny_tensors(prefix: str = "model", layers: int = 2) -> dict[str, np.ndarray]:
    """A handful of small tensors with Llama-like names."""
    tensors = {f"{prefix}.embed_tokens.weight": np.zeros((64, 16), dtype=np.float16)}
    for i in range(layers):
        tensors[f"{prefix}.layers.{i}.self_attn.q_proj.weight"] = np.ones((16, 16), dtype=np.float16)
    return tensors


def write_model(
    folder: Path,
    config: dict[str, Any] | None = None,
    *,
    tokenizer: bool = True,
    chat_template: bool = True,
    weights: bool = True,
) -> Path:
    """A complete tiny model folder: config.json, tokenizer files and one real safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or llama_config(), indent=2))
    if tokenizer:
        write_tokenizer(folder, chat_template=chat_template)
    if weights:
        save_file(tiny_tensors(), str(folder / "model.safetensors"))
    return folder


def write_sharded(folder: Path, shards: dict[str, dict[str, np.ndarray]], index: dict[str, str]) -> None:
    """Real safetensors shards plus a model.safetensors.index.json with the given weight_map."""
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    total = sum(t.nbytes for tensors in shards.values() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )


def write_sparse_weights(folder: Path, total_bytes: int, shards: int = 1) -> None:
    """Shards whose headers declare ``total_bytes`` of bfloat16 tensors, written as sparse files."""
    per_shard = total_bytes // shards // 2 * 2
    names = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    )
    weight_map = {}
    for i, name in enumerate(names):
        tensor = f"model.layers.{i}.packed.weight"
        header = {tensor: {"dtype": "BF16", "shape": [per_shard // 2], "data_offsets": [0, per_shard]}}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (folder / name).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(8 + len(raw) + per_shard)  # a hole: no disk used
        weight_map[tensor] = name
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": per_shard * shards}, "weight_map": weight_map})
        )


# --- The original system's five models, as their published config.json files describe them ---------------

PHI4_MINI = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 199999,
    "embd_pdrop": 0.0,
    "eos_token_id": 199999,
    "full_attn_mod": 1,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "interpolate_factor": 1,
    "lm_head_bias": False,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "phi3",
    "num_attention_heads": 24,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 199999,
    "partial_rotary_factor": 0.75,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "long_factor": [1.0 + i / 16 for i in range(48)],
        "short_factor": [1.0] * 48,
        "type": "longrope",
    },
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0",
    "use_cache": True,
    "vocab_size": 200064,
}

MISTRAL_7B_AWQ = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "quantization_config": {
        "bits": 4,
        "group_size": 128,
        "modules_to_not_convert": None,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    },
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.2",
    "use_cache": True,
    "vocab_size": 32000,
}

QWEN25_CODER_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

GEMMA3_27B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "model_type": "gemma3_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}

AYA_EXPANSE_8B = {
    "architectures": ["CohereForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 5,
    "eos_token_id": 255001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "layer_norm_eps": 1e-05,
    "logit_scale": 0.125,
    "max_position_embeddings": 8192,
    "model_type": "cohere",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "rope_theta": 10000,
    "torch_dtype": "float16",
    "transformers_version": "4.44.0",
    "use_cache": True,
    "use_qk_norm": False,
    "vocab_size": 256000,
}

#: model_path in configs/production.json -> (config.json, bytes of weights on the hub, shards)
PRODUCTION_MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "/models/microsoft/Phi-4-mini-instruct": (PHI4_MINI, 7_672_000_000, 2),
    "/models/TheBloke/Mistral-7B-Instruct-v0.2-AWQ": (MISTRAL_7B_AWQ, 4_150_000_000, 1),
    "/models/Qwen/Qwen2.5-Coder-1.5B-Instruct": (QWEN25_CODER_1_5B, 3_087_000_000, 1),
    "/models/google/gemma-3-27b-it": (GEMMA3_27B_IT, 54_875_000_000, 12),
    "/models/CohereForAI/aya-expanse-8b": (AYA_EXPANSE_8B, 16_056_000_000, 4),
}


def write_production_models(root: Path) -> dict[str, Path]:
    """The five production models as fixture folders under ``root``; original path -> folder."""
    folders = {}
    for original, (config, weight_bytes, shards) in PRODUCTION_MODELS.items():
        folder = root / original.strip("/").replace("/", "__")
        write_model(folder, config, weights=False)
        write_sparse_weights(folder, weight_bytes, shards)
        if config["model_type"] == "mistral":  # AutoAWQ checkpoints ship this beside config.json
            (folder / "quant_config.json").write_text(
                json.dumps({"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"})
            )
        folders[original] = folder
    return folders
