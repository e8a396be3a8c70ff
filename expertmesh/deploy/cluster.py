"""The mesh config as the cluster runs it, derived from the one mesh file.

What differs from one host is only how processes are reached and secured: every expert listens
on the pod's interfaces on one port and is dialled at its Service's DNS name, loads eagerly (a
pod holds its node's resources whether loaded or not), serves ``/metrics``, and reads its
certificates and tokens from mounted Secrets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from expertmesh.config import ConfigError, ExpertConfig, MeshConfig
from expertmesh.security_config import AuthConfig, InternalTlsConfig, TlsConfig

#: Every expert listens here inside its pod (``--port``: one port for all, so it is not in the
#: config, whose ports must differ on one host); the gateway on the config's gateway.port.
EXPERT_PORT = 50051
#: Prometheus /metrics inside every pod (the config's own metrics_port wins).
METRICS_PORT = 9090
#: Where the pods mount the config and the Secrets (see deploy/README.md for the Secrets).
CONFIG_DIR = "/etc/expertmesh"
CONFIG_KEY = "mesh.yaml"
CALLERS_TLS_DIR = "/etc/expertmesh-tls/callers"
MESH_TLS_DIR = "/etc/expertmesh-tls/mesh"
TOKENS_DIR = "/etc/expertmesh-tokens"
SECRETS = {
    "callers": "expertmesh-gateway-tls",
    "mesh-gateway": "expertmesh-mesh-gateway",
    "mesh-expert": "expertmesh-mesh-expert",
    "tokens": "expertmesh-tokens",
}
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def resource_name(expert_id: str) -> str:
    """The Kubernetes name of an expert's Deployment and Service: its id with dashes, lower case."""
    name = expert_id.replace("_", "-").replace(".", "-").lower()
    if not _DNS_1035.match(name):
        raise ConfigError(
            f"expert_id {expert_id!r} gives {name!r}, which is not a Kubernetes (DNS-1035) name"
        )
    return name


@dataclass(frozen=True)
class Cluster:
    """Where the mesh runs: its namespace, and whether the mesh is secured with the Secrets."""

    namespace: str = "expertmesh"
    tls: bool = True

    def service_host(self, name: str) -> str:
        """The cluster DNS name of a Service in this namespace."""
        return f"{name}.{self.namespace}.svc.cluster.local"


def cluster_config(source: MeshConfig, cluster: Cluster) -> MeshConfig:
    """``source`` as the pods read it (the ConfigMap's mesh.yaml)."""
    experts = [_cluster_expert(e, cluster) for e in source.experts]
    gateway = source.gateway.model_copy(
        update={
            "host": "0.0.0.0",
            "metrics_port": source.gateway.metrics_port or METRICS_PORT,
            "tls": _callers_tls(source.gateway.tls) if cluster.tls else None,
            "internal_cert": None,
        }
    )
    update: dict[str, object] = {"experts": experts, "gateway": gateway}
    if cluster.tls:
        update["internal_tls"] = InternalTlsConfig(
            ca_file=f"{MESH_TLS_DIR}/ca.crt",
            cert_file=f"{MESH_TLS_DIR}/tls.crt",
            key_file=f"{MESH_TLS_DIR}/tls.key",
        )
        auth = source.auth or AuthConfig()
        update["auth"] = auth.model_copy(update={"tokens_file": f"{TOKENS_DIR}/tokens"})
        update["allow_insecure"] = False
    else:
        # plaintext inside the cluster: the NetworkPolicy still lets only the gateway reach experts
        update.update(internal_tls=None, allow_insecure=True)
    # validated again: the derived config must be one the processes accept
    return MeshConfig.model_validate(source.model_copy(update=update).model_dump())


def _callers_tls(given: TlsConfig | None) -> TlsConfig:
    client_ca = f"{CALLERS_TLS_DIR}/client-ca.crt" if given and given.client_ca_file else None
    return TlsConfig(
        cert_file=f"{CALLERS_TLS_DIR}/tls.crt",
        key_file=f"{CALLERS_TLS_DIR}/tls.key",
        ca_file=f"{CALLERS_TLS_DIR}/ca.crt",
        client_ca_file=client_ca,
    )


def _cluster_expert(e: ExpertConfig, cluster: Cluster) -> ExpertConfig:
    if e.replicas or e.local_replicas != 1:
        raise ConfigError(
            f"expert {e.expert_id}: replicas and local_replicas are for hosts outside a cluster; "
            "in a cluster the Deployment's replica count scales an expert (its Service name resolves "
            "to every pod)"
        )
    return e.model_copy(
        update={
            "host": "0.0.0.0",
            "address": f"{cluster.service_host(resource_name(e.expert_id))}:{EXPERT_PORT}",
            "load": "eager",
            "idle_unload_after_s": None,
            "metrics_port": e.metrics_port or METRICS_PORT,
            "internal_cert": None,
            "allow_insecure": False,
        }
    )
