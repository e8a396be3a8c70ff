"""deploy/compose/compose.yaml, checked without a Docker engine: it parses, names only files and
images the repository builds, agrees with its mesh config, and starts services in health order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from expertmesh.config import MeshConfig, load_config
from expertmesh.demo_models import DEFAULT_MODELS_DIR, DEMO_MODELS, REAL_MODEL
from expertmesh.deploy.overlays import TAG

from .test_image import DOCKERFILE, stages

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
#: Images pulled rather than built: pinned to a release, never :latest.
EXTERNAL = ("otel/opentelemetry-collector-contrib:", "prom/prometheus:")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text()))


@pytest.fixture(scope="module")
def mesh() -> MeshConfig:
    return load_config(COMPOSE_DIR / "mesh.yaml")


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _bind_sources(service: dict[str, Any]) -> list[tuple[Path, str]]:
    return [((COMPOSE_DIR / v.split(":")[0]).resolve(), v.split(":")[1]) for v in service.get("volumes", [])]


def _by_role(compose: dict[str, Any], module: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _services(compose).items() if module in s.get("command", [])}


def test_images_are_built_here_or_pinned(compose: dict[str, Any]) -> None:
    targets = stages(DOCKERFILE.read_text())
    for name, service in _services(compose).items():
        build = service.get("build")
        if build:
            assert (COMPOSE_DIR / build["context"]).resolve() == ROOT, name
            assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
            assert "target" not in build, f"{name}: the image is the Dockerfile's last stage"
            assert list(targets)[-1] == "runtime"
            extra = build.get("args", {}).get("EXTRA", "cpu")  # the Dockerfile's default
            assert f"base-{extra}" in targets, f"{name}: no base-{extra} stage in the Dockerfile"
            assert service["image"] == f"expertmesh:{TAG['cpu']}" and extra == "cpu"
        else:
            image = service["image"]
            assert image.startswith(EXTERNAL) and not image.endswith(":latest"), f"{name}: {image}"


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        for source, target in _bind_sources(service):
            if source == DEFAULT_MODELS_DIR.resolve():
                continue  # made by `expertmesh build-demo-models` (git-ignored weights)
            assert source.is_file(), f"{name}: {source} (mounted at {target}) does not exist"
    # the models are mounted read-only, never copied into the image
    experts = _by_role(compose, "expertmesh.services.expert")
    for service in experts.values():
        assert any(
            v.endswith(":/models:ro")
            and Path(COMPOSE_DIR / v.split(":")[0]).resolve() == DEFAULT_MODELS_DIR.resolve()
            for v in service["volumes"]
        )


def test_services_match_the_mesh_config(compose: dict[str, Any], mesh: MeshConfig) -> None:
    experts = _by_role(compose, "expertmesh.services.expert")
    ids = {s["command"][s["command"].index("--expert-id") + 1]: n for n, s in experts.items()}
    assert sorted(ids) == sorted(e.expert_id for e in mesh.experts)
    for index, expert in enumerate(mesh.experts):
        host, port = mesh.expert_address(index).rsplit(":", 1)
        assert host == ids[expert.expert_id]  # dialled by its compose service name
        assert int(port) == mesh.expert_port(index)
        assert expert.host == "0.0.0.0"
        service = experts[host]
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        model = Path(expert.model_path)
        # a model `expertmesh build-demo-models` makes, in the mounted folder
        assert model.relative_to("/models").as_posix() in {REAL_MODEL, *DEMO_MODELS}
    (gateway,) = _by_role(compose, "expertmesh.gateway").values()
    assert gateway["healthcheck"]["test"][-1] == f"127.0.0.1:{mesh.gateway.port}"
    published = {int(p.split(":")[1]) for p in gateway["ports"]}
    assert published == {mesh.gateway.port, mesh.gateway.http_port}
    for service in [*experts.values(), gateway]:
        mounts = dict((t, s) for s, t in _bind_sources(service))
        assert mounts["/etc/expertmesh/mesh.yaml"] == COMPOSE_DIR / "mesh.yaml"
        assert service["environment"]["EXPERTMESH_CONFIG"] == "/etc/expertmesh/mesh.yaml"
        endpoint = service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint.split("//")[1].split(":")[0] in _services(compose)


def test_start_order_follows_health(compose: dict[str, Any]) -> None:
    services = _services(compose)
    experts = _by_role(compose, "expertmesh.services.expert")
    (gateway,) = _by_role(compose, "expertmesh.gateway").values()
    # the gateway starts once every expert's model is loaded (grpc.health.v1 SERVING)
    assert gateway["depends_on"] == {name: {"condition": "service_healthy"} for name in experts}
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    for service in experts.values():
        assert service["healthcheck"]["start_period"].endswith("m")  # a model load takes minutes


def test_prometheus_scrapes_every_process_and_loads_the_alerts(
    compose: dict[str, Any], mesh: MeshConfig
) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    experts = _by_role(compose, "expertmesh.services.expert")
    ids = {s["command"][s["command"].index("--expert-id") + 1]: n for n, s in experts.items()}
    (gateway,) = _by_role(compose, "expertmesh.gateway")
    want = {f"{ids[e.expert_id]}:{e.metrics_port}" for e in mesh.experts} | {
        f"{gateway}:{mesh.gateway.metrics_port}"
    }
    assert targets == want
    prometheus = _services(compose)["prometheus"]
    mounts = {t: s for s, t in _bind_sources(prometheus)}
    (rules,) = config["rule_files"]
    assert mounts[rules] == ROOT / "deploy" / "observability" / "alerts.yaml"
