"""The machine the experts would run on: CPU or GPU, its memory, and what vLLM says it supports."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

import psutil

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceFacts:
    """Facts about the device the checks are made for.

    Built by :func:`detect_device` for this machine; tests and ``check`` for another host
    (e.g. a GPU host checked from a laptop) build one by hand.
    """

    kind: str  # "cpu" or "gpu"
    name: str
    total_memory: int  # bytes: RAM on CPU, memory of one GPU on GPU
    available_memory: int  # bytes free now
    capability: int | None = None  # GPU compute capability as vLLM writes it (80 = 8.0); None on CPU
    supported_dtypes: tuple[str, ...] = field(default=("bfloat16", "float16", "float32"))

    @property
    def is_cpu(self) -> bool:
        """True on a CPU host (vLLM's CPU backend)."""
        return self.kind == "cpu"

    def describe(self) -> str:
        """One line for the report header."""
        cap = f", compute capability {self.capability / 10:.1f}" if self.capability else ""
        return (
            f"device: {self.kind.upper()} ({self.name}{cap}), {self.total_memory / GiB:.1f} GiB total, "
            f"{self.available_memory / GiB:.1f} GiB available"
        )


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def detect_device() -> DeviceFacts:
    """This machine, as vLLM's ``current_platform`` sees it (imports vLLM)."""
    from vllm.platforms import current_platform

    dtypes = tuple(_dtype_name(d) for d in current_platform.supported_dtypes)
    if current_platform.is_cpu():
        mem = psutil.virtual_memory()
        name = f"{platform.machine()}, {psutil.cpu_count()} cores"
        return DeviceFacts("cpu", name, mem.total, mem.available, None, dtypes)
    import torch

    free, total = torch.cuda.mem_get_info()
    cap = current_platform.get_device_capability()
    return DeviceFacts(
        "gpu",
        current_platform.get_device_name(),
        total,
        free,
        cap.to_int() if cap is not None else None,
        dtypes,
    )
