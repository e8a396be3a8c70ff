"""The mesh config's ``experts`` entries: one expert each (part of the one config model,
:mod:`expertmesh.config`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from expertmesh.security_config import CertPair
from expertmesh.security_config import Strict as _Strict


class ExpertConfig(_Strict):
    """One expert: one process, one vLLM engine, one model."""

    expert_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Unique id, used to pin requests.")
    model_path: str = Field(description="Model directory (or hub id on a host that can reach a hub).")
    domain: str = Field(description="Requests for this domain are routed here.")
    description: str = ""
    quantization: str | None = Field(default=None, description="vLLM quantization method, e.g. awq.")
    dtype: str = Field(default="auto", description="auto, float32, float16 or bfloat16.")
    max_model_len: int | None = Field(default=None, gt=0, description="Context length; None = model's own.")
    tokenizer: str | None = None
    trust_remote_code: bool = False
    max_num_seqs: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_space_gib: int | None = Field(
        default=None, gt=0, description="CPU hosts: KV cache size (sets VLLM_CPU_KVCACHE_SPACE)."
    )
    tensor_parallel_size: int = Field(default=1, gt=0)
    enforce_eager: bool | None = None
    seed: int = 0
    chat_template: str | None = Field(default=None, description="Jinja template for models without one.")
    system_prompt: str | None = Field(
        default=None, description="System turn put first in chat requests (messages) that have none."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Further vllm AsyncEngineArgs fields, passed as given."
    )
    host: str = Field(default="127.0.0.1", description="Interface the expert listens on.")
    port: int | None = Field(default=None, ge=0, le=65535, description="Listen port; None = assigned.")
    address: str | None = Field(default=None, description="host:port the gateway dials; default host:port.")
    replicas: list[str] = Field(
        default_factory=list,
        description="host:port of further replicas run elsewhere; the gateway balances over all of them.",
    )
    local_replicas: int = Field(
        default=1, ge=1, le=64, description="up runs this many processes of it here, on consecutive ports."
    )
    load: Literal["eager", "lazy"] = Field(
        default="eager", description="eager: load at start; lazy: load on the first request."
    )
    idle_unload_after_s: float | None = Field(
        default=None, gt=0, description="Release the engine after this long without requests (back to COLD)."
    )
    max_queue: int | None = Field(
        default=None,
        gt=0,
        description="Requests the engine may hold (running + waiting); more get RESOURCE_EXHAUSTED.",
    )
    memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Memory a load adds, for memory_budget_gib; default: measured, else estimated. "
        "`deploy k8s` sizes pods with it where the model folder is not readable.",
    )
    metrics_port: int | None = Field(
        default=None, gt=0, le=65535, description="Prometheus /metrics port on host; None = off."
    )
    stream_interval: Literal["auto"] | int = Field(
        default="auto",
        description="Tokens per streamed message: a number, or auto (1, up to 16 as streams grow).",
    )
    reserved_cores: bool = Field(
        default=True,
        description="Run the server and vLLM's engine core on the cores vLLM's CPU workers leave free.",
    )
    stall_timeout_s: float | None = Field(
        default=60.0,
        gt=0,
        description="Engine watchdog: requests waiting and no engine output for this long -> the expert "
        "reports NOT_SERVING, ends them UNAVAILABLE and exits to be restarted; None = off.",
    )
    max_streams_per_link: int = Field(
        default=2048, gt=0, description="Streams one gateway may open at once on one multiplexed call."
    )
    internal_cert: CertPair | None = Field(
        default=None, description="This expert's own certificate pair; default: internal_tls's."
    )
    allow_insecure: bool = Field(
        default=False, description="Listen on a non-loopback host without internal_tls (plaintext)."
    )

    @field_validator("stream_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"stream_interval must be 'auto' or a whole number of tokens >= 1, got {value!r}")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        allowed = {"auto", "float32", "float16", "bfloat16", "half", "float"}
        if value not in allowed:
            raise ValueError(f"dtype {value!r} is not one of {sorted(allowed)}")
        return value
