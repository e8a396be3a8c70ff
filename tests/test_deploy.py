"""Offline checks of the Kubernetes deployment in deploy/.

Every manifest is validated against the Kubernetes API schemas, and the mesh config the
ConfigMap carries is parsed with the project's own config model; the Deployments, Services and
probes must agree with it (ids, DNS addresses, ports, grace periods).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from expertmesh.config import MeshConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
#: The newest Kubernetes API version whose schemas kubernetes-validate ships.
K8S_VERSION = "1.37.0"
MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
DOCS: list[tuple[str, dict[str, Any]]] = [
    (path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc
]
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "PersistentVolumeClaim": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
}


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def _component(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def _arg(container: dict[str, Any], flag: str) -> str:
    args = container["args"]
    assert args.count(flag) == 1, f"{container['name']}: {flag} must be given once in {args}"
    return str(args[args.index(flag) + 1])


def _container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container port it reaches."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]]
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(match)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _selects(service_or_pdb_selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service_or_pdb_selector.items())


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUBE / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def configmap() -> dict[str, Any]:
    (cm,) = _of_kind("ConfigMap").values()
    return cm


@pytest.fixture(scope="module")
def mesh(configmap: dict[str, Any]) -> MeshConfig:
    (key,) = configmap["data"]
    return parse_config(configmap["data"][key], Path(key))


@pytest.fixture(scope="module")
def experts() -> dict[str, dict[str, Any]]:
    """Expert Deployments by the expert id they serve."""
    found: dict[str, dict[str, Any]] = {}
    for dep in _of_kind("Deployment").values():
        if _component(dep) == "expert":
            expert_id = _arg(_container(dep), "--expert-id")
            assert expert_id not in found, f"two Deployments serve {expert_id}"
            found[expert_id] = dep
    return found


@pytest.fixture(scope="module")
def gateway() -> dict[str, Any]:
    (dep,) = [d for d in _of_kind("Deployment").values() if _component(d) == "gateway"]
    return dep


def test_manifests_found() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds.count("Deployment") == 6  # five experts and the gateway
    assert kinds.count("Service") == 6
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "PodDisruptionBudget"} <= set(kinds)


@pytest.mark.parametrize(
    "doc", [doc for _, doc in DOCS], ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS]
)
def test_manifest_validates_against_kubernetes_schema(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == API_VERSIONS[doc["kind"]]
    # strict: unknown fields (typos) are errors too
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.37"


def test_schema_validation_catches_mistakes(gateway: dict[str, Any]) -> None:
    """The validation above is not vacuous: a typo, a wrong type, a retired apiVersion all fail."""
    typo = copy.deepcopy(gateway)
    _container(typo)["readinessProbe"]["grpc"]["prot"] = 8080
    with pytest.raises(kubernetes_validate.ValidationError, match="'prot' was unexpected"):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(gateway)
    _container(wrong_type)["readinessProbe"]["grpc"]["port"] = "grpc"  # grpc probes take a number
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type 'integer'"):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)
    retired = {**gateway, "apiVersion": "extensions/v1beta1"}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(retired, K8S_VERSION, strict=True)


def test_names_are_valid_dns_labels() -> None:
    for file, doc in DOCS:
        name = doc["metadata"]["name"]
        assert DNS_1035_LABEL.match(name), f"{file}: {doc['kind']} name {name!r} is not a DNS-1035 label"


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == [p.name for p in MANIFESTS]
    (namespace,) = _of_kind("Namespace")
    assert kustomization["namespace"] == namespace
    # every image the pods run is one the kustomization lets the operator retarget
    images = {i["name"] for i in kustomization["images"]}
    for dep in _of_kind("Deployment").values():
        assert _container(dep)["image"].split(":")[0] in images


def test_configmap_holds_the_production_experts(mesh: MeshConfig) -> None:
    production = json.loads((ROOT / "configs" / "production.json").read_text())
    prod = MeshConfig.model_validate(production)
    # The cluster config differs only in how experts are reached and that they load eagerly.
    deploy_only = {"host", "address", "port", "replicas", "load"}
    assert [e.model_dump(exclude=deploy_only) for e in mesh.experts] == [
        e.model_dump(exclude=deploy_only) for e in prod.experts
    ]
    assert mesh.model_dump(exclude={"experts"}) == prod.model_dump(exclude={"experts"})
    assert all(e.load == "eager" for e in mesh.experts)
    assert [e.expert_id for e in mesh.experts] == [
        "phi4_fast",
        "mistral_balanced",
        "qwen_coder",
        "gemma3_multimodal",
        "aya_expanse_multilingual",
    ]


def test_config_names_exactly_the_deployed_experts(
    mesh: MeshConfig, experts: dict[str, dict[str, Any]]
) -> None:
    assert sorted(experts) == sorted(e.expert_id for e in mesh.experts)
    for expert_id, dep in experts.items():
        mesh.expert(expert_id)  # KeyError if --expert-id names no expert of the config
        assert dep["metadata"]["name"] == expert_id.replace("_", "-")
        assert dep["spec"]["replicas"] == 1
        assert _container(dep)["command"] == ["python", "-m", "expertmesh.services.expert"]
    assert importlib.util.find_spec("expertmesh.services.expert.__main__") is not None
    assert importlib.util.find_spec("expertmesh.gateway.__main__") is not None


def test_every_pod_reads_the_configmap(configmap: dict[str, Any]) -> None:
    (key,) = configmap["data"]
    for dep in _of_kind("Deployment").values():
        pod = dep["spec"]["template"]["spec"]
        container = _container(dep)
        config_path = PurePosixPath(_env(container)["EXPERTMESH_CONFIG"])
        assert config_path.name == key
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
        assert mount.get("readOnly") is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]


def test_expert_addresses_are_their_services(
    mesh: MeshConfig, experts: dict[str, dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    services = _of_kind("Service")
    for index, expert in enumerate(mesh.experts):
        dep = experts[expert.expert_id]
        container = _container(dep)
        name = dep["metadata"]["name"]
        host, port = expert.address.rsplit(":", 1) if expert.address else ("", "")
        assert host == f"{name}.{kustomization['namespace']}.svc.cluster.local"
        assert mesh.expert_address(index) == expert.address
        assert expert.host == "0.0.0.0"  # reachable from other pods, not only on loopback
        service = services[name]
        assert _selects(service["spec"]["selector"], dep)
        assert [s for s in services.values() if _selects(s["spec"]["selector"], dep)] == [service]
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == int(port)
        # the process listens where the Service sends the gateway
        listen = int(_arg(container, "--port"))
        assert _container_port(container, service_port["targetPort"]) == listen


def test_expert_probes_use_grpc_health_on_the_listen_port(experts: dict[str, dict[str, Any]]) -> None:
    for dep in experts.values():
        container = _container(dep)
        listen = int(_arg(container, "--port"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == listen, f"{dep['metadata']['name']} {probe}"
            assert "service" not in container[probe]["grpc"]  # the overall status ""
        startup = container["startupProbe"]
        # loading a large model (gemma-3-27b) takes minutes: allow at least 15
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 15 * 60
        liveness = container["livenessProbe"]
        assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 30


def test_expert_pods_get_gpus_models_and_shared_memory(
    mesh: MeshConfig, experts: dict[str, dict[str, Any]]
) -> None:
    (pvc,) = _of_kind("PersistentVolumeClaim")
    for expert_id, dep in experts.items():
        expert = mesh.expert(expert_id)
        pod = dep["spec"]["template"]["spec"]
        container = _container(dep)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

        gpus = expert.tensor_parallel_size
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus

        models = mounts["/models"]
        assert models["readOnly"] is True
        assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == pvc
        assert PurePosixPath(expert.model_path).is_relative_to("/models"), expert.model_path

        shm = volumes[mounts["/dev/shm"]["name"]]
        assert shm["emptyDir"]["medium"] == "Memory"

        assert pod["terminationGracePeriodSeconds"] > mesh.grace_period_s
        assert _env(container).get("HF_HUB_OFFLINE") == "1"


def test_gateway(mesh: MeshConfig, gateway: dict[str, Any]) -> None:
    container = _container(gateway)
    assert container["command"] == ["python", "-m", "expertmesh.gateway"]
    assert gateway["spec"]["replicas"] == 2
    assert mesh.gateway.host == "0.0.0.0"
    port = mesh.gateway.port
    assert container["readinessProbe"]["grpc"]["port"] == port
    # liveness must not follow the experts' health: restarting the gateway cannot fix them
    assert "grpc" not in container["livenessProbe"]
    assert container["livenessProbe"]["tcpSocket"]["port"] == port
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})

    (service,) = [s for s in _of_kind("Service").values() if _selects(s["spec"]["selector"], gateway)]
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port
    assert _container_port(container, service_port["targetPort"]) == port

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + mesh.grace_period_s


def test_gateway_disruption_budget(gateway: dict[str, Any]) -> None:
    (pdb,) = _of_kind("PodDisruptionBudget").values()
    assert _selects(pdb["spec"]["selector"]["matchLabels"], gateway)
    assert 1 <= pdb["spec"]["minAvailable"] < gateway["spec"]["replicas"]
    for dep in _of_kind("Deployment").values():
        if dep is not gateway:
            assert not _selects(pdb["spec"]["selector"]["matchLabels"], dep)


def test_deployment_selectors_match_their_pods() -> None:
    deployments = _of_kind("Deployment")
    for name, dep in deployments.items():
        assert _selects(dep["spec"]["selector"]["matchLabels"], dep), name
        others = [d for d in deployments.values() if d is not dep]
        assert not any(_selects(dep["spec"]["selector"]["matchLabels"], o) for o in others), name


def test_dockerfile_installs_existing_extras() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and base.group(1).startswith("nvidia/cuda:")
    variant = re.search(r"^ARG VARIANT=(\S+)$", dockerfile, re.M)
    assert variant and variant.group(1) == "gpu"
    assert {"gpu", "cpu"} <= set(extras)
    assert '"/tmp/src[cpu]"' in dockerfile and '"/tmp/src[$VARIANT]"' in dockerfile
    assert 'CMD ["python", "-m", "expertmesh.gateway"]' in dockerfile
