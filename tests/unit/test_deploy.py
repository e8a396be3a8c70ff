"""Offline checks of the Kubernetes deployment in deploy/kubernetes/.

The tree is rendered from configs/production.json by ``expertmesh deploy k8s``; the committed
files must be that rendering. Each overlay (cpu, gpu) is built with ``kubectl kustomize`` and
every object it yields is validated strictly against the Kubernetes API schemas; the mesh
config the ConfigMap carries is parsed with the project's own config model, and the
Deployments, Services, probes, Secrets and NetworkPolicies must agree with it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from expertmesh.config import MeshConfig, load_config, parse_config
from expertmesh.deploy import overlays
from expertmesh.deploy.cluster import Cluster, resource_name
from expertmesh.deploy.render import render, write
from expertmesh.deploy.sizing import cpu_expert
from expertmesh.preflight.check import inspect_expert
from expertmesh.preflight.device import DeviceFacts, GiB

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
PRODUCTION = "configs/production.json"
KUBECTL = str(Path(sys.executable).parent / "kubectl")
#: The newest Kubernetes API version whose schemas kubernetes-validate ships.
K8S_VERSION = "1.37.0"
KINDS = ("cpu", "gpu")
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "PersistentVolumeClaim": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
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

Obj = dict[str, Any]


def kustomize(folder: Path) -> list[Obj]:
    """What ``kubectl kustomize`` makes of an overlay (the real kustomize, built into kubectl)."""
    out = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=KINDS)
def built(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, kustomize(KUBE / "overlays" / request.param)


def _of_kind(docs: list[Obj], kind: str) -> dict[str, Obj]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _component(doc: Obj) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def _container(deployment: Obj) -> Obj:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _arg(container: Obj, flag: str) -> str:
    args = container["args"]
    assert args.count(flag) == 1, f"{container['name']}: {flag} must be given once in {args}"
    return str(args[args.index(flag) + 1])


def _env(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _selects(selector: dict[str, str], deployment: Obj) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def _mesh(docs: list[Obj]) -> MeshConfig:
    (cm,) = _of_kind(docs, "ConfigMap").values()
    (key,) = cm["data"]
    return parse_config(cm["data"][key], Path(key))


def _experts(docs: list[Obj]) -> dict[str, Obj]:
    """Expert Deployments by the expert id they serve."""
    found: dict[str, Obj] = {}
    for dep in _of_kind(docs, "Deployment").values():
        if _component(dep) == "expert":
            expert_id = _arg(_container(dep), "--expert-id")
            assert expert_id not in found, f"two Deployments serve {expert_id}"
            found[expert_id] = dep
    return found


def _gateway(docs: list[Obj]) -> Obj:
    (dep,) = [d for d in _of_kind(docs, "Deployment").values() if _component(d) == "gateway"]
    return dep


def _committed() -> dict[str, str]:
    return {p.relative_to(KUBE).as_posix(): p.read_text() for p in KUBE.rglob("*.yaml")}


def test_committed_tree_is_the_rendering_of_the_production_config() -> None:
    """deploy/kubernetes/ == `expertmesh deploy k8s --config configs/production.json`; else render again."""
    rendered = render(load_config(ROOT / PRODUCTION), PRODUCTION)
    committed = _committed()
    assert sorted(committed) == sorted(rendered)
    for rel, text in rendered.items():
        assert committed[rel] == text, f"deploy/kubernetes/{rel} differs from its rendering"


def test_drift_is_caught(tmp_path: Path) -> None:
    """A changed config renders differently (the comparison above is not vacuous)."""
    changed = json.loads((ROOT / PRODUCTION).read_text())
    changed["experts"][2]["max_model_len"] = 4096
    path = tmp_path / "production.json"
    path.write_text(json.dumps(changed))
    rendered = render(load_config(path), PRODUCTION)
    assert rendered["base/configmap.yaml"] != _committed()["base/configmap.yaml"]


def test_cli_writes_the_same_tree(tmp_path: Path) -> None:
    """The command an operator runs writes exactly what the renderer returns, and removes stale files."""
    out = tmp_path / "k8s"
    (out / "base").mkdir(parents=True)
    (out / "base" / "expert-gone.yaml").write_text("kind: Deployment\n")
    proc = subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", "deploy", "k8s", "--config", PRODUCTION, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    written = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.yaml")}
    assert written == _committed()


def test_every_object_validates_strictly(built: tuple[str, list[Obj]]) -> None:
    kind, docs = built
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 6, kind  # five experts and the gateway
    assert kinds.count("Service") == 6
    assert kinds.count("PodDisruptionBudget") == 6
    assert set(API_VERSIONS) == set(kinds)
    for doc in docs:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]]
        assert doc["metadata"].get("namespace", "expertmesh") == "expertmesh"
        # strict: unknown fields (typos) are errors too
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.37"


def test_schema_validation_catches_mistakes(built: tuple[str, list[Obj]]) -> None:
    """The validation above is not vacuous: a typo, a wrong type, a retired apiVersion all fail."""
    gateway = _gateway(built[1])
    typo = copy.deepcopy(gateway)
    _container(typo)["livenessProbe"]["tcpSocket"]["prot"] = 8080
    with pytest.raises(kubernetes_validate.ValidationError, match="'prot' was unexpected"):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(gateway)
    _container(wrong_type)["readinessProbe"]["periodSeconds"] = "5"
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type 'integer'"):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(
            {**gateway, "apiVersion": "extensions/v1beta1"}, K8S_VERSION, strict=True
        )


def test_configmap_holds_the_production_experts(built: tuple[str, list[Obj]]) -> None:
    mesh = _mesh(built[1])
    prod = MeshConfig.model_validate(json.loads((ROOT / PRODUCTION).read_text()))
    # The cluster config differs only in how experts are reached, secured and observed.
    deploy_only = {"host", "address", "port", "replicas", "load", "idle_unload_after_s", "metrics_port"}
    assert [e.model_dump(exclude=deploy_only) for e in mesh.experts] == [
        e.model_dump(exclude=deploy_only) for e in prod.experts
    ]
    security = {"experts", "internal_tls", "auth", "gateway"}
    assert mesh.model_dump(exclude=security) == prod.model_dump(exclude=security)
    assert mesh.gateway.model_dump(exclude={"tls", "metrics_port"}) == prod.gateway.model_dump(
        exclude={"tls", "metrics_port"}
    )
    assert all(e.load == "eager" and e.metrics_port for e in mesh.experts)
    assert mesh.gateway.metrics_port


def test_config_names_exactly_the_deployed_experts(built: tuple[str, list[Obj]]) -> None:
    docs = built[1]
    mesh, experts = _mesh(docs), _experts(docs)
    assert sorted(experts) == sorted(e.expert_id for e in mesh.experts)
    services = _of_kind(docs, "Service")
    pdbs = _of_kind(docs, "PodDisruptionBudget")
    for index, expert in enumerate(mesh.experts):
        dep = experts[expert.expert_id]
        container = _container(dep)
        name = dep["metadata"]["name"]
        assert name == resource_name(expert.expert_id)
        assert container["command"] == ["python", "-m", "expertmesh.services.expert"]
        host, port = (expert.address or "").rsplit(":", 1)
        assert host == f"{name}.expertmesh.svc.cluster.local"
        assert mesh.expert_address(index) == expert.address
        assert expert.host == "0.0.0.0"
        service = services[name]
        assert service["spec"]["clusterIP"] == "None"  # headless: the name resolves to every pod
        assert [s for s in services.values() if _selects(s["spec"]["selector"], dep)] == [service]
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == int(port) == int(_arg(container, "--port"))
        (grpc_port,) = [p for p in container["ports"] if p["name"] == service_port["targetPort"]]
        assert grpc_port["containerPort"] == int(port)
        (metrics,) = [p for p in container["ports"] if p["name"] == "metrics"]
        assert metrics["containerPort"] == expert.metrics_port
        assert _selects(pdbs[name]["spec"]["selector"]["matchLabels"], dep)
        assert pdbs[name]["spec"]["maxUnavailable"] == 1
    assert importlib.util.find_spec("expertmesh.services.expert.__main__") is not None
    assert importlib.util.find_spec("expertmesh.gateway.__main__") is not None


def test_every_pod_reads_the_configmap(built: tuple[str, list[Obj]]) -> None:
    docs = built[1]
    (cm,) = _of_kind(docs, "ConfigMap").values()
    (key,) = cm["data"]
    for dep in _of_kind(docs, "Deployment").values():
        container = _container(dep)
        config_path = PurePosixPath(_env(container)["EXPERTMESH_CONFIG"])
        assert config_path.name == key
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
        assert mount.get("readOnly") is True
        (volume,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == cm["metadata"]["name"]


def _health_probe(container: Obj, probe: str) -> dict[str, str]:
    """An exec probe running ``expertmesh health ADDRESS --flag value ...``, as flag -> value."""
    command = container[probe]["exec"]["command"]
    assert command[:5] == ["python", "-m", "expertmesh.cli", "health", command[4]], command
    flags = command[5:]
    assert len(flags) % 2 == 0 and all(f.startswith("--") for f in flags[::2]), command
    return {"address": command[4], **dict(zip(flags[::2], flags[1::2], strict=True))}


def test_expert_probes_check_grpc_health_over_mtls(built: tuple[str, list[Obj]]) -> None:
    """The kubelet's gRPC probe speaks no TLS: `expertmesh health` with the expert's own certificate."""
    docs = built[1]
    mesh = _mesh(docs)
    assert mesh.internal_tls is not None
    for expert_id, dep in _experts(docs).items():
        container = _container(dep)
        address = mesh.expert(expert_id).address or ""
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert _health_probe(container, probe) == {
                "address": f"127.0.0.1:{_arg(container, '--port')}",
                "--server-name": address.rsplit(":", 1)[0],
                "--cacert": mesh.internal_tls.ca_file,
                "--cert": mesh.internal_tls.cert_file,
                "--key": mesh.internal_tls.key_file,
            }
        startup = container["startupProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 15 * 60
    # the largest model (64 GiB) gets longer to load than the smallest (6 GiB)
    experts = _experts(docs)
    assert (
        _container(experts["gemma3_multimodal"])["startupProbe"]["failureThreshold"]
        > _container(experts["qwen_coder"])["startupProbe"]["failureThreshold"]
    )


def test_plaintext_rendering_uses_native_grpc_probes(tmp_path: Path) -> None:
    write(tmp_path, render(load_config(ROOT / PRODUCTION), PRODUCTION, Cluster(tls=False)))
    docs = kustomize(tmp_path / "overlays" / "cpu")
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.37"
    mesh = _mesh(docs)
    assert mesh.internal_tls is None and mesh.gateway.tls is None and mesh.allow_insecure
    for dep in _experts(docs).values():
        container = _container(dep)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": int(_arg(container, "--port"))}
        assert not any("secret" in v for v in dep["spec"]["template"]["spec"]["volumes"])
    assert _container(_gateway(docs))["readinessProbe"]["grpc"] == {"port": mesh.gateway.port}


def test_cpu_overlay_sizes_pods_from_the_preflight_estimate(tmp_path: Path, real_model: Path) -> None:
    """With the model folder readable (the demo model, built if missing), memory comes from
    `expertmesh check`'s plan."""
    source = load_config(ROOT / "configs" / "demo.yaml")
    write(tmp_path, render(source, "configs/demo.yaml"))
    docs = kustomize(tmp_path / "overlays" / "cpu")
    experts = _experts(docs)
    cpu = DeviceFacts("cpu", "node", 256 * GiB, 256 * GiB)
    for e in source.experts:
        plan = inspect_expert(cpu_expert(e), cpu).plan
        assert plan is not None
        container = _container(experts[e.expert_id])
        want = f"{math.ceil(plan.footprint / GiB) + overlays.SHM_GIB}Gi"
        assert (
            container["resources"]["requests"]["memory"] == want == container["resources"]["limits"]["memory"]
        )
        assert _env(container)["VLLM_CPU_KVCACHE_SPACE"] == str(e.kv_cache_space_gib)
        assert container["image"].endswith("-cpu")
    # a larger KV cache asks for that much more memory
    bigger = source.model_copy(
        update={"experts": [e.model_copy(update={"kv_cache_space_gib": 9}) for e in source.experts]}
    )
    write(tmp_path, render(bigger, "configs/demo.yaml"))
    grown = _experts(kustomize(tmp_path / "overlays" / "cpu"))
    for e in source.experts:
        before = int(_container(experts[e.expert_id])["resources"]["requests"]["memory"].removesuffix("Gi"))
        after = int(_container(grown[e.expert_id])["resources"]["requests"]["memory"].removesuffix("Gi"))
        assert after - before == 9 - (e.kv_cache_space_gib or 0)


def test_cpu_overlay_runs_on_x86_and_arm_without_gpus() -> None:
    docs = kustomize(KUBE / "overlays" / "cpu")
    for dep in _experts(docs).values():
        pod = dep["spec"]["template"]["spec"]
        container = _container(dep)
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        assert term["matchExpressions"] == [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}
        ]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert "tolerations" not in pod
        # whole cores: requests == limits (Guaranteed QoS), which vLLM's thread binding wants
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert _env(container)["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


def test_gpu_overlay_requests_gpus_on_nodes_with_enough_memory() -> None:
    docs = kustomize(KUBE / "overlays" / "gpu")
    mesh = _mesh(docs)
    for expert_id, dep in _experts(docs).items():
        expert = mesh.expert(expert_id)
        pod = dep["spec"]["template"]["spec"]
        container = _container(dep)
        gpus = expert.tensor_parallel_size
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        (memory,) = term["matchExpressions"]
        assert memory["key"] == "nvidia.com/gpu.memory" and memory["operator"] == "Gt"
        assert int(memory["values"][0]) + 1 == math.ceil((expert.memory_gib or 0) * 1024 / gpus)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert container["image"].endswith("-cuda")
    # gemma-3-27b needs an 80 GiB GPU: no 40 or 48 GiB card qualifies
    gemma = _experts(docs)["gemma3_multimodal"]["spec"]["template"]["spec"]["affinity"]
    (term,) = gemma["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert int(term["matchExpressions"][0]["values"][0]) >= 48 * 1024


def test_expert_pods_get_models_and_shared_memory(built: tuple[str, list[Obj]]) -> None:
    docs = built[1]
    mesh = _mesh(docs)
    (pvc,) = _of_kind(docs, "PersistentVolumeClaim")
    for expert_id, dep in _experts(docs).items():
        pod = dep["spec"]["template"]["spec"]
        container = _container(dep)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        models = mounts["/models"]
        assert models["readOnly"] is True
        assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == pvc
        assert PurePosixPath(mesh.expert(expert_id).model_path).is_relative_to("/models")
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        assert pod["terminationGracePeriodSeconds"] > mesh.grace_period_s
        assert _env(container).get("HF_HUB_OFFLINE") == "1"


def test_gateway_deployment_service_budget_and_autoscaler(built: tuple[str, list[Obj]]) -> None:
    docs = built[1]
    mesh, gateway = _mesh(docs), _gateway(docs)
    container = _container(gateway)
    assert container["command"] == ["python", "-m", "expertmesh.gateway"]
    assert mesh.gateway.tls is not None
    port = mesh.gateway.port
    assert _health_probe(container, "readinessProbe") == {
        "address": f"127.0.0.1:{port}",
        "--server-name": "gateway.expertmesh.svc.cluster.local",
        "--cacert": mesh.gateway.tls.ca_file or "",
    }
    # liveness must not follow the experts' health: restarting the gateway cannot fix them
    assert container["livenessProbe"]["tcpSocket"]["port"] == port
    (metrics,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == mesh.gateway.metrics_port
    (service,) = [s for s in _of_kind(docs, "Service").values() if _selects(s["spec"]["selector"], gateway)]
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop[0] == "sleep" and grace > int(pre_stop[1]) + mesh.grace_period_s
    pdb = _of_kind(docs, "PodDisruptionBudget")["gateway"]
    (hpa,) = _of_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in gateway["spec"]  # the autoscaler owns the count
    assert container["resources"]["requests"]["cpu"]  # utilization is measured against it
    for dep in _of_kind(docs, "Deployment").values():
        if dep is not gateway:
            assert not _selects(pdb["spec"]["selector"]["matchLabels"], dep)


def test_deployment_selectors_match_their_pods(built: tuple[str, list[Obj]]) -> None:
    deployments = _of_kind(built[1], "Deployment")
    for name, dep in deployments.items():
        assert _selects(dep["spec"]["selector"]["matchLabels"], dep), name
        others = [d for d in deployments.values() if d is not dep]
        assert not any(_selects(dep["spec"]["selector"]["matchLabels"], o) for o in others), name


def test_pods_pass_pod_security_restricted(built: tuple[str, list[Obj]]) -> None:
    """runAsNonRoot, seccomp RuntimeDefault, no privilege escalation, every capability dropped."""
    docs = built[1]
    (namespace,) = _of_kind(docs, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, dep in _of_kind(docs, "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"].get("runAsUser", 1) != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for volume in pod["volumes"]:
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{name}: volume {volume['name']}"
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert not context["capabilities"].get("add"), name
            assert not context.get("privileged"), name


def _secret_at(pod: Obj, path: str) -> str:
    """The Secret mounted (read-only, whole: a subPath would not see a rotation) at ``path``'s folder."""
    folder = str(PurePosixPath(path).parent)
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == folder]
    assert mount.get("readOnly") is True and "subPath" not in mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return str(volume["secret"]["secretName"])


def test_pods_read_their_secrets(built: tuple[str, list[Obj]]) -> None:
    docs = built[1]
    mesh, gateway = _mesh(docs), _gateway(docs)
    internal, tls, auth = mesh.internal_tls, mesh.gateway.tls, mesh.auth
    assert internal is not None and tls is not None and auth is not None and auth.tokens_file
    for dep in _of_kind(docs, "Deployment").values():
        want = "expertmesh-mesh-gateway" if dep is gateway else "expertmesh-mesh-expert"
        for path in (internal.ca_file, internal.cert_file, internal.key_file):
            assert _secret_at(dep["spec"]["template"]["spec"], path) == want
    pod = gateway["spec"]["template"]["spec"]
    for path in (tls.cert_file, tls.key_file, tls.ca_file or ""):
        assert _secret_at(pod, path) == "expertmesh-gateway-tls"
    assert _secret_at(pod, auth.tokens_file) == "expertmesh-tokens"
    assert all(e.host == "0.0.0.0" and not e.allow_insecure for e in mesh.experts)
    assert not mesh.allow_insecure


def _allows(policy: Obj, pod_labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(pod_labels.get(k) == v for k, v in selector.items())


def test_network_policies_let_only_the_gateway_reach_experts(built: tuple[str, list[Obj]]) -> None:
    docs = built[1]
    policies = _of_kind(docs, "NetworkPolicy")
    (deny,) = [p for p in policies.values() if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny["spec"]["policyTypes"] == ["Ingress"]
    gateway = _gateway(docs)
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    for dep in _experts(docs).values():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        container = _container(dep)
        listen = int(_arg(container, "--port"))
        (metrics,) = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
        rules = [r for p in policies.values() if _allows(p, labels) for r in p["spec"].get("ingress", [])]
        assert rules
        for rule in rules:
            ports = [p["port"] for p in rule["ports"]]
            if rule["from"] == [monitoring]:  # Prometheus: the metrics port only
                assert listen not in ports and metrics in ports
                continue
            # every other way in names the gateway's pods, and only the expert port
            assert all(set(peer) == {"podSelector"} for peer in rule["from"])
            assert all(
                all(gateway_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
                for peer in rule["from"]
            )
            assert ports == [listen]
    (gateway_policy,) = [
        p for p in policies.values() if _allows(p, gateway_labels) and p["spec"]["podSelector"]
    ]
    assert [p["port"] for r in gateway_policy["spec"]["ingress"] for p in r["ports"]] == [8080]
