"""``expertmesh deploy k8s``: render the kustomize base and the cpu/gpu overlays from the mesh config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from expertmesh.config import MeshConfig, load_resolved
from expertmesh.deploy import manifests, overlays
from expertmesh.deploy.cluster import Cluster, cluster_config, resource_name
from expertmesh.deploy.sizing import Kind, Need, memory_need

KINDS: tuple[Kind, ...] = ("cpu", "gpu")
#: The models volume when the call names no size: room for the production models and one more.
MODELS_STORAGE_GIB = 200
MONITORING_NAMESPACE = "monitoring"


class _Dumper(yaml.SafeDumper):
    """Block lists indented under their key, as kubectl writes them."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None  # the ConfigMap's mesh.yaml stays readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]], header: str) -> str:
    """YAML documents (``---`` between them) under a comment header."""
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines()) + body


def render(
    source: MeshConfig,
    config_label: str,
    cluster: Cluster | None = None,
    models_storage_gib: int = MODELS_STORAGE_GIB,
) -> dict[str, str]:
    """Relative path -> file text of the whole kustomize tree (base/, overlays/cpu, overlays/gpu)."""
    cluster = cluster or Cluster()
    mesh = cluster_config(source, cluster)
    header = (
        f"Rendered by `expertmesh deploy k8s --config {config_label}`: change the config and render "
        "again;\nedits here are overwritten (and the tests fail while the two differ)."
    )
    needs: dict[Kind, dict[str, Need]] = {
        k: {e.expert_id: memory_need(e, k) for e in mesh.experts} for k in KINDS
    }
    files: dict[str, str] = {}
    base = {
        "namespace.yaml": [manifests.namespace(cluster)],
        "configmap.yaml": [manifests.configmap(mesh)],
        "models-pvc.yaml": [manifests.models_pvc(models_storage_gib)],
        "networkpolicy.yaml": manifests.network_policies(mesh, MONITORING_NAMESPACE),
        "gateway.yaml": manifests.gateway(mesh, cluster),
    }
    for e in mesh.experts:
        # the startup probe waits for the larger of the two loads
        load_gib = max(needs[k][e.expert_id].memory_gib for k in KINDS)
        base[f"expert-{resource_name(e.expert_id)}.yaml"] = manifests.expert(mesh, e, cluster, load_gib)
    for name, docs in base.items():
        files[f"base/{name}"] = dump(docs, header)
    files["base/kustomization.yaml"] = dump(
        [
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": cluster.namespace,
                "resources": list(base),
                "images": [{"name": manifests.IMAGE, "newName": manifests.IMAGE, "newTag": "0.1.0"}],
            }
        ],
        header,
    )
    for kind in KINDS:
        patches = []
        for e in mesh.experts:
            need = needs[kind][e.expert_id]
            name = f"expert-{resource_name(e.expert_id)}.yaml"
            note = f"{header}\n{e.expert_id}: {need.memory_gib} GiB ({need.source})"
            files[f"overlays/{kind}/{name}"] = dump([overlays.patch(kind, e, need)], note)
            patches.append(name)
        files[f"overlays/{kind}/kustomization.yaml"] = dump([overlays.kustomization(kind, patches)], header)
    return files


def write(out: Path, files: dict[str, str]) -> None:
    """Write the tree under ``out``; rendered files of an earlier run that are gone now are removed."""
    for stale in [*out.glob("base/*.yaml"), *out.glob("overlays/*/*.yaml")]:
        if stale.relative_to(out).as_posix() not in files:
            stale.unlink()
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def main_deploy_k8s(config: str | None, out: Path, namespace: str, tls: bool) -> int:
    """Render and write; the config is found as every command finds it (--config, env, default)."""
    mesh, source = load_resolved(config)
    label = config or str(source.path)
    files = render(mesh, label, Cluster(namespace=namespace, tls=tls))
    write(out, files)
    print(
        f"wrote {len(files)} files under {out}: apply with `kubectl apply -k {out}/overlays/cpu` (or gpu)",
        file=sys.stderr,
    )
    return 0
