"""Limits of vLLM's CPU attention backend, read from the backend class itself.

The CPU backend compiles its attention kernels for a fixed set of head sizes and dtypes and
refuses anything else at the first forward pass ("Unsupported CPU attention configuration"),
after the weights have loaded; here it is found before.
"""

from __future__ import annotations

from expertmesh.config import ExpertConfig
from expertmesh.preflight.findings import Finding, error, warning
from expertmesh.preflight.model_facts import ModelFacts


def _cpu_attention_backend() -> type | None:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return None
    return CPUAttentionBackend


def _x86_fp8_capable() -> bool:
    import torch

    # vLLM's _get_attn_isa: an FP8 KV cache on CPU needs AVX-512 or AMX.
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


def check_cpu_backend(cfg: ExpertConfig, facts: ModelFacts, dtype: str) -> list[Finding]:
    """Head size, dtype, KV cache dtype and block size against vLLM's CPU attention backend."""
    backend = _cpu_attention_backend()
    if backend is None or facts.is_mla:  # MLA models use the separate CPU MLA backend
        return []
    findings: list[Finding] = []
    sizes = list(backend.get_supported_head_sizes())  # type: ignore[attr-defined]
    if facts.head_size not in sizes:
        findings.append(
            error(
                "cpu-head-size",
                f"head size {facts.head_size} is not one vLLM's CPU attention kernels support "
                f"({', '.join(map(str, sizes))}); the engine would fail at its first forward pass",
                "run this expert on a GPU host, or use a model whose head_dim (hidden_size / "
                "num_attention_heads, or head_dim in config.json) is one of those",
            )
        )
    dtypes = [str(d).removeprefix("torch.") for d in backend.supported_dtypes]  # type: ignore[attr-defined]
    if dtype not in dtypes:
        findings.append(
            error(
                "cpu-dtype",
                f"vLLM's CPU attention does not run in {dtype} (it runs {', '.join(dtypes)})",
                f"set dtype: {dtypes[0] if 'bfloat16' not in dtypes else 'bfloat16'} for this expert",
            )
        )
    kv_dtype = str(cfg.engine_args.get("kv_cache_dtype", "auto"))
    if kv_dtype.startswith("fp8"):
        if facts.head_size % 32:
            findings.append(
                error(
                    "cpu-fp8-kv",
                    "an FP8 KV cache on CPU needs a head size divisible by 32; "
                    f"this model's is {facts.head_size}",
                    "remove engine_args.kv_cache_dtype (use the model dtype for the KV cache)",
                )
            )
        elif not _x86_fp8_capable():
            findings.append(
                error(
                    "cpu-fp8-kv",
                    "an FP8 KV cache on CPU needs AVX-512 or AMX, which this CPU lacks",
                    "remove engine_args.kv_cache_dtype (use the model dtype for the KV cache)",
                )
            )
    block = cfg.engine_args.get("block_size")
    if block and int(block) % 32:
        findings.append(
            warning(
                "cpu-block-size",
                f"block_size {block} is not a multiple of 32, which vLLM's CPU kernels expect (slow path)",
                "remove engine_args.block_size (the CPU default is 128) or use a multiple of 32",
            )
        )
    return findings
