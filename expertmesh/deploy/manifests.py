"""The kustomize base: every object that does not depend on the kind of node (CPU or GPU).

Security is that of the hand-written manifests before them: the namespace enforces the
"restricted" Pod Security Standard, NetworkPolicies let only the gateway reach experts, and
with TLS the probes run ``expertmesh health`` inside the pod (the kubelet's own gRPC probe
speaks no TLS); without TLS they are the kubelet's native ``grpc.health.v1`` probes.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from expertmesh.config import ExpertConfig, MeshConfig
from expertmesh.deploy.cluster import (
    CALLERS_TLS_DIR,
    CONFIG_DIR,
    CONFIG_KEY,
    EXPERT_PORT,
    MESH_TLS_DIR,
    SECRETS,
    TOKENS_DIR,
    Cluster,
    resource_name,
)

Obj = dict[str, Any]
APP = "expertmesh"
IMAGE = "expertmesh"
CONFIGMAP = "expertmesh-config"
MODELS_PVC = "expertmesh-models"
UID = 10001
#: The startup probe allows 5 minutes plus this much per GiB of the expert's memory need (reading
#: weights from a network volume, compiling, capturing CUDA graphs), and never less than 15 minutes.
LOAD_S_PER_GIB = 20
MIN_STARTUP_S = 15 * 60
PROBE_PERIOD_S = 10


def labels(component: str, instance: str | None = None) -> dict[str, str]:
    """The labels that select one component (and one instance of it)."""
    found = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}
    if instance:
        found["app.kubernetes.io/instance"] = instance
    return found


def _meta(name: str, component: str | None = None, instance: str | None = None) -> Obj:
    return {
        "name": name,
        "labels": labels(component, instance) if component else {"app.kubernetes.io/name": APP},
    }


def namespace(cluster: Cluster) -> Obj:
    """The namespace; every pod in it must pass the restricted Pod Security Standard."""
    meta = _meta(cluster.namespace)
    meta["labels"].update(
        {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }
    )
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def configmap(mesh: MeshConfig) -> Obj:
    """The mesh config every pod reads (EXPERTMESH_CONFIG); only what differs from the defaults."""
    text = yaml.safe_dump(mesh.model_dump(mode="json", exclude_defaults=True), sort_keys=False, width=110)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(CONFIGMAP), "data": {CONFIG_KEY: text}}


def models_pvc(storage_gib: int) -> Obj:
    """The shared, read-only model volume (ReadWriteMany: experts run on several nodes)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(MODELS_PVC),
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": f"{storage_gib}Gi"}},
        },
    }


def network_policies(mesh: MeshConfig, monitoring_namespace: str) -> list[Obj]:
    """Default deny; callers reach the gateway's ports, only the gateway the experts' gRPC port,
    and only the monitoring namespace the metrics ports."""

    def policy(name: str, component: str | None, ingress: list[Obj] | None) -> Obj:
        spec: Obj = {
            "podSelector": {"matchLabels": labels(component)} if component else {},
            "policyTypes": ["Ingress"],
        }
        if ingress is not None:
            spec["ingress"] = ingress
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(name, component),
            "spec": spec,
        }

    gateway_ports = [mesh.gateway.port, *([mesh.gateway.http_port] if mesh.gateway.http_port else [])]
    metrics_ports = sorted(
        {p for p in [mesh.gateway.metrics_port, *(e.metrics_port for e in mesh.experts)] if p}
    )
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitoring_namespace}}}
    return [
        policy("default-deny-ingress", None, None),
        policy("gateway-from-callers", "gateway", [{"ports": [_tcp(p) for p in gateway_ports]}]),
        policy(
            "experts-from-gateway",
            "expert",
            [{"from": [{"podSelector": {"matchLabels": labels("gateway")}}], "ports": [_tcp(EXPERT_PORT)]}],
        ),
        policy(
            "metrics-from-monitoring",
            None,
            [{"from": [monitoring], "ports": [_tcp(p) for p in metrics_ports]}],
        ),
    ]


def _tcp(port: int) -> Obj:
    return {"port": port, "protocol": "TCP"}


def _pod_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> Obj:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _secret_volume(name: str, secret: str) -> Obj:
    return {"name": name, "secret": {"secretName": secret}}


def _mount(name: str, path: str, read_only: bool = True) -> Obj:
    return (
        {"name": name, "mountPath": path, "readOnly": True}
        if read_only
        else {"name": name, "mountPath": path}
    )


def _health_exec(
    port: int, server_name: str, cacert: str, cert: str | None = None, key: str | None = None
) -> Obj:
    command = ["python", "-m", "expertmesh.cli", "health", f"127.0.0.1:{port}", "--server-name", server_name]
    command += ["--cacert", cacert]
    if cert and key:
        command += ["--cert", cert, "--key", key]
    return {"exec": {"command": command}}


def _probe(check: Obj, period: int, timeout: int, failures: int) -> Obj:
    return {**check, "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": failures}


def startup_failures(memory_gib: int) -> int:
    """Startup probe failures allowed (every PROBE_PERIOD_S) for a model of this memory need to load."""
    return math.ceil(max(MIN_STARTUP_S, 300 + LOAD_S_PER_GIB * memory_gib) / PROBE_PERIOD_S)


def expert(mesh: MeshConfig, e: ExpertConfig, cluster: Cluster, memory_gib: int) -> list[Obj]:
    """One expert: its Deployment, its headless Service, its PodDisruptionBudget."""
    name = resource_name(e.expert_id)
    sel = labels("expert", name)
    host = cluster.service_host(name)
    if cluster.tls:
        check = _health_exec(
            EXPERT_PORT, host, f"{MESH_TLS_DIR}/ca.crt", f"{MESH_TLS_DIR}/tls.crt", f"{MESH_TLS_DIR}/tls.key"
        )
    else:
        check = {"grpc": {"port": EXPERT_PORT}}
    mounts = [_mount("config", CONFIG_DIR), _mount("models", "/models"), _mount("dshm", "/dev/shm", False)]
    volumes: list[Obj] = [
        {"name": "config", "configMap": {"name": CONFIGMAP}},
        {"name": "models", "persistentVolumeClaim": {"claimName": MODELS_PVC, "readOnly": True}},
        # vLLM's processes exchange tensors through shared memory; the runtime's default is 64 MiB
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}},
    ]
    if cluster.tls:
        mounts.append(_mount("mesh-tls", MESH_TLS_DIR))
        volumes.append(_secret_volume("mesh-tls", SECRETS["mesh-expert"]))
    container: Obj = {
        "name": "expert",
        "image": f"{IMAGE}:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "expertmesh.services.expert"],
        "args": ["--expert-id", e.expert_id, "--port", str(EXPERT_PORT)],
        "env": [
            {"name": "EXPERTMESH_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
            # weights come from /models; never try a model hub from inside the cluster
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        ],
        "ports": [
            {"name": "grpc", "containerPort": EXPERT_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": e.metrics_port, "protocol": "TCP"},
        ],
        # SERVING only once the engine can generate; liveness and readiness start after startup passes
        "startupProbe": _probe(check, PROBE_PERIOD_S, 5, startup_failures(memory_gib)),
        "readinessProbe": _probe(check, 10, 5, 2),
        # the expert exits by itself when its engine dies; this catches a wedged process
        "livenessProbe": _probe(check, 15, 10, 4),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, "expert", name),
        "spec": {
            "replicas": 1,
            # a surge pod would need a spare node (GPU) and sit Pending; fallbacks cover the restart
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": sel},
            "template": {
                "metadata": {"labels": {**sel, "expertmesh/expert-id": e.expert_id}},
                "spec": {
                    # > grace_period_s (in-flight streams drain) + the engine's own shutdown
                    "terminationGracePeriodSeconds": math.ceil(mesh.grace_period_s) + 30,
                    "securityContext": _pod_security(),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, "expert", name),
        "spec": {
            # headless: the name resolves to every pod, so the gateway sees each replica
            "clusterIP": "None",
            # the gateway watches each pod's health itself: NOT_SERVING while loading, not "refused"
            "publishNotReadyAddresses": True,
            "selector": sel,
            "ports": [{"name": "grpc", "port": EXPERT_PORT, "targetPort": "grpc", "protocol": "TCP"}],
        },
    }
    # drains take one pod of an expert at a time; the gateway fails over meanwhile
    pdb = _pdb(name, "expert", sel, {"maxUnavailable": 1}, name)
    return [deployment, service, pdb]


def _pdb(name: str, component: str, sel: dict[str, str], budget: Obj, instance: str | None = None) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, component, instance),
        "spec": {**budget, "selector": {"matchLabels": sel}},
    }


def gateway(mesh: MeshConfig, cluster: Cluster) -> list[Obj]:
    """The gateway: Deployment (two replicas or more, spread over nodes), Service, PDB, autoscaler."""
    gw = mesh.gateway
    sel = labels("gateway")
    host = cluster.service_host("gateway")
    ports = [{"name": "grpc", "containerPort": gw.port, "protocol": "TCP"}]
    if gw.http_port:
        ports.append({"name": "http", "containerPort": gw.http_port, "protocol": "TCP"})
    ports.append({"name": "metrics", "containerPort": gw.metrics_port, "protocol": "TCP"})
    mounts = [_mount("config", CONFIG_DIR)]
    volumes: list[Obj] = [{"name": "config", "configMap": {"name": CONFIGMAP}}]
    if cluster.tls:
        ready = _health_exec(gw.port, host, f"{CALLERS_TLS_DIR}/ca.crt")
        for vol, path, secret in (
            ("callers-tls", CALLERS_TLS_DIR, "callers"),
            ("mesh-tls", MESH_TLS_DIR, "mesh-gateway"),
            ("tokens", TOKENS_DIR, "tokens"),
        ):
            mounts.append(_mount(vol, path))
            volumes.append(_secret_volume(vol, SECRETS[secret]))
    else:
        ready = {"grpc": {"port": gw.port}}
    pre_stop_s = 5
    container: Obj = {
        "name": "gateway",
        "image": f"{IMAGE}:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "expertmesh.gateway"],
        "env": [{"name": "EXPERTMESH_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"}],
        "ports": ports,
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        # SERVING while at least one expert is: the Service sends callers only where they can be routed
        "readinessProbe": _probe(ready, 5, 5, 2),
        # not the gRPC health (NOT_SERVING whenever every expert is down; a restart would not help)
        "livenessProbe": {"tcpSocket": {"port": gw.port}, "initialDelaySeconds": 10, **_probe({}, 15, 5, 4)},
        # time for the Service to drop this pod before the gateway stops taking streams on SIGTERM
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(pre_stop_s)]}}},
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    spread = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": sel},
                    },
                }
            ]
        }
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta("gateway", "gateway"),
        # no replicas: the HorizontalPodAutoscaler owns the count (an apply would reset it)
        "spec": {
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "selector": {"matchLabels": sel},
            "template": {
                "metadata": {"labels": sel},
                "spec": {
                    "terminationGracePeriodSeconds": pre_stop_s + math.ceil(mesh.grace_period_s) + 10,
                    "securityContext": _pod_security(),
                    "affinity": spread,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    service_ports = [
        {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"], "protocol": "TCP"}
        for p in ports
        if p["name"] != "metrics"
    ]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta("gateway", "gateway"),
        "spec": {"type": "ClusterIP", "selector": sel, "ports": service_ports},
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta("gateway", "gateway"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"},
            "minReplicas": 2,
            "maxReplicas": 10,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
        },
    }
    return [deployment, service, _pdb("gateway", "gateway", sel, {"minAvailable": 1}), hpa]
