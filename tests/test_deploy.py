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
    "NetworkPolicy": "networking.k8s.io/v1",
}
#: Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
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
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "PodDisruptionBudget", "NetworkPolicy"} <= set(
        kinds
    )


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
    _container(typo)["livenessProbe"]["tcpSocket"]["prot"] = 8080
    with pytest.raises(kubernetes_validate.ValidationError, match="'prot' was unexpected"):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(gateway)
    _container(wrong_type)["readinessProbe"]["periodSeconds"] = "5"  # a number, not a string
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
    # ... and in the Secrets it reads certificates and tokens from (see test_pods_read_their_secrets)
    security = {"experts", "internal_tls", "auth", "gateway"}
    assert mesh.model_dump(exclude=security) == prod.model_dump(exclude=security)
    assert mesh.gateway.model_dump(exclude={"tls"}) == prod.gateway.model_dump(exclude={"tls"})
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


def _health_probe(container: dict[str, Any], probe: str) -> dict[str, str]:
    """An exec probe running ``expertmesh health ADDRESS --flag value ...``, as flag -> value."""
    command = container[probe]["exec"]["command"]
    assert command[:5] == ["python", "-m", "expertmesh.cli", "health", command[4]], command
    flags = command[5:]
    assert len(flags) % 2 == 0 and all(f.startswith("--") for f in flags[::2]), command
    assert "--service" not in flags  # the overall status ""
    return {"address": command[4], **dict(zip(flags[::2], flags[1::2], strict=True))}


def test_expert_probes_check_grpc_health_over_mtls_on_the_listen_port(
    mesh: MeshConfig, experts: dict[str, dict[str, Any]]
) -> None:
    """The kubelet's gRPC probe speaks no TLS: `expertmesh health` with the expert's own certificate."""
    assert mesh.internal_tls is not None
    for expert_id, dep in experts.items():
        container = _container(dep)
        listen = int(_arg(container, "--port"))
        address = mesh.expert(expert_id).address or ""
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            flags = _health_probe(container, probe)
            assert flags == {
                "address": f"127.0.0.1:{listen}",
                "--server-name": address.rsplit(":", 1)[0],  # the name the gateway checks too
                "--cacert": mesh.internal_tls.ca_file,
                "--cert": mesh.internal_tls.cert_file,
                "--key": mesh.internal_tls.key_file,
            }, f"{dep['metadata']['name']} {probe}"
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
    assert mesh.gateway.tls is not None
    assert _health_probe(container, "readinessProbe") == {
        "address": f"127.0.0.1:{port}",
        "--server-name": "gateway.expertmesh.svc.cluster.local",
        "--cacert": mesh.gateway.tls.ca_file,
    }
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


def _pods() -> list[tuple[str, dict[str, Any]]]:
    return [(name, dep["spec"]["template"]["spec"]) for name, dep in _of_kind("Deployment").items()]


def test_pods_pass_pod_security_restricted() -> None:
    """runAsNonRoot, seccomp RuntimeDefault, no privilege escalation, every capability dropped."""
    (namespace,) = _of_kind("Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in _pods():
        pod_context = pod["securityContext"]
        assert pod_context["runAsNonRoot"] is True, name
        assert pod_context.get("runAsUser", 1) != 0, name
        assert pod_context["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for volume in pod["volumes"]:
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{name}: volume {volume['name']} is {kinds}"
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert not context["capabilities"].get("add"), name
            assert not context.get("privileged"), name
            assert context.get("runAsNonRoot", True) is True, name
            assert context.get("seccompProfile", {"type": "RuntimeDefault"})["type"] in (
                "RuntimeDefault",
                "Localhost",
            )


def _mount_of(name: str, pod: dict[str, Any], path: str) -> dict[str, Any]:
    """The Secret volume mounted at the folder of ``path``."""
    container = pod["containers"][0]
    folder = str(PurePosixPath(path).parent)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    assert mount.get("readOnly") is True, f"{name}: {folder}"
    assert "subPath" not in mount  # a subPath mount would not see a rotated Secret
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return dict(volume["secret"])


def test_pods_read_their_secrets(mesh: MeshConfig, gateway: dict[str, Any]) -> None:
    """Certificates and tokens come from Secrets, mounted where the config reads them."""
    internal, tls, auth = mesh.internal_tls, mesh.gateway.tls, mesh.auth
    assert internal is not None and tls is not None and auth is not None and auth.tokens_file
    for name, pod in _pods():
        is_gateway = name == gateway["metadata"]["name"]
        mesh_secret = {"expertmesh-mesh-gateway" if is_gateway else "expertmesh-mesh-expert"}
        for path in (internal.ca_file, internal.cert_file, internal.key_file):
            assert {_mount_of(name, pod, path)["secretName"]} == mesh_secret
    gateway_pod = gateway["spec"]["template"]["spec"]
    for path in (tls.cert_file, tls.key_file, tls.ca_file or ""):
        assert _mount_of("gateway", gateway_pod, path)["secretName"] == "expertmesh-gateway-tls"
    assert _mount_of("gateway", gateway_pod, auth.tokens_file)["secretName"] == "expertmesh-tokens"
    # every expert listens on 0.0.0.0: only with internal_tls may it (see expertmesh.tls)
    assert all(e.host == "0.0.0.0" and not e.allow_insecure for e in mesh.experts)
    assert not mesh.allow_insecure


def _allows(policy: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(pod_labels.get(k) == v for k, v in selector.items())


def test_network_policies_let_only_the_gateway_reach_experts(
    experts: dict[str, dict[str, Any]], gateway: dict[str, Any]
) -> None:
    policies = _of_kind("NetworkPolicy")
    (deny,) = [p for p in policies.values() if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny["spec"]["policyTypes"] == ["Ingress"]  # default: nothing gets in
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    for dep in experts.values():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        listen = int(_arg(_container(dep), "--port"))
        rules = [r for p in policies.values() if _allows(p, labels) for r in p["spec"].get("ingress", [])]
        assert rules, dep["metadata"]["name"]
        for rule in rules:  # every way in names the gateway's pods, and only the expert port
            peers = rule["from"]
            assert peers and all(set(peer) == {"podSelector"} for peer in peers)
            assert all(
                all(gateway_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
                for peer in peers
            )
            assert [p["port"] for p in rule["ports"]] == [listen]
    (gateway_policy,) = [
        p for p in policies.values() if _allows(p, gateway_labels) and p["spec"].get("ingress")
    ]
    assert [p["port"] for r in gateway_policy["spec"]["ingress"] for p in r["ports"]] == [8080]
