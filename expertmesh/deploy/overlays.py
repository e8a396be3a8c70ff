"""The ``cpu`` and ``gpu`` overlays: what an expert's pod needs of its node, as strategic-merge patches.

CPU (x86_64 and arm64 nodes; the CPU image is built for both): a fixed KV cache
(``VLLM_CPU_KVCACHE_SPACE``), OpenMP threads bound by vLLM, memory sized from the preflight's
estimate, requests equal to limits so that the pod gets whole cores (Guaranteed QoS).
GPU: ``nvidia.com/gpu`` per tensor-parallel rank, the GPU taint tolerated, and nodes whose GPUs
have the memory the model needs (the ``nvidia.com/gpu.memory`` label, MiB, of NVIDIA's GPU
feature discovery).
"""

from __future__ import annotations

import math
from typing import Any

from expertmesh.config import ExpertConfig
from expertmesh.deploy.cluster import resource_name
from expertmesh.deploy.manifests import IMAGE
from expertmesh.deploy.sizing import Kind, Need, cpu_expert

Obj = dict[str, Any]
#: Cores each CPU expert pod gets (vLLM keeps one for its engine core and the server).
CPU_CORES = 4
#: /dev/shm (a memory-backed emptyDir) counts against the pod's memory limit.
SHM_GIB = 4
#: A GPU pod's own RAM: the process, tokenizer and the weights' staging while they load.
GPU_HOST_MEMORY = {"requests": "16Gi", "limits": "32Gi"}
TAG = {"cpu": "0.1.0-cpu", "gpu": "0.1.0-cuda"}


def _patch(e: ExpertConfig, pod: Obj, container: Obj) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": resource_name(e.expert_id)},
        "spec": {"template": {"spec": {**pod, "containers": [{"name": "expert", **container}]}}},
    }


def cpu_patch(e: ExpertConfig, need: Need) -> Obj:
    """An expert on a CPU node: vLLM's CPU settings and the preflight's memory as request and limit."""
    kv = cpu_expert(e).kv_cache_space_gib
    memory = f"{need.memory_gib + SHM_GIB}Gi"
    arch = {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}
    pod = {"affinity": _required(arch)}
    container = {
        "env": [
            {"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(kv)},
            # vLLM binds its OpenMP threads to the pod's cores and keeps one for the engine core
            {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "auto"},
            {"name": "VLLM_CPU_NUM_OF_RESERVED_CPU", "value": "1"},
        ],
        "resources": {
            "requests": {"cpu": str(CPU_CORES), "memory": memory},
            "limits": {"cpu": str(CPU_CORES), "memory": memory},
        },
    }
    return _patch(e, pod, container)


def gpu_patch(e: ExpertConfig, need: Need) -> Obj:
    """An expert on GPU nodes: its GPUs, and only nodes whose GPUs hold its share of the model."""
    gpus = e.tensor_parallel_size
    per_gpu_mib = math.ceil(need.memory_gib * 1024 / gpus)
    memory = {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": [str(per_gpu_mib - 1)]}
    pod = {
        "affinity": _required(memory),
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    container = {
        "resources": {
            "requests": {"cpu": "4", "memory": GPU_HOST_MEMORY["requests"], "nvidia.com/gpu": gpus},
            "limits": {"memory": GPU_HOST_MEMORY["limits"], "nvidia.com/gpu": gpus},
        }
    }
    return _patch(e, pod, container)


def _required(expression: Obj) -> Obj:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [expression]}]
            }
        }
    }


def patch(kind: Kind, e: ExpertConfig, need: Need) -> Obj:
    """The overlay patch of one expert's Deployment."""
    return cpu_patch(e, need) if kind == "cpu" else gpu_patch(e, need)


def kustomization(kind: Kind, patch_files: list[str]) -> Obj:
    """The overlay's kustomization: the base, the patches, the image built for this kind of node."""
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base"],
        "patches": [{"path": f} for f in patch_files],
        "images": [{"name": IMAGE, "newName": IMAGE, "newTag": TAG[kind]}],
    }
