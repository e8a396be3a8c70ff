"""Fixtures: the demo models, built once per machine (~10 s) and shared by every test; each test
marked by its folder (``unit``: no engine; ``integration``: real processes, most with engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.demo_models import ensure_demo_models, ensure_real_model


@pytest.fixture(scope="session")
def demo_models() -> list[Path]:
    """The tiny demo model folders (built on first use)."""
    return ensure_demo_models(log=False)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The real small instruct model (SmolLM2-135M-Instruct) folder, built from its wheel on first use."""
    return ensure_real_model(log=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test ``unit`` or ``integration`` by its folder; an engine test in unit/ is an error."""
    for item in items:
        kind = item.path.parent.name
        if kind not in ("unit", "integration"):
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit or tests/integration")
        if kind == "unit" and item.get_closest_marker("engine"):
            raise pytest.UsageError(f"{item.nodeid} starts engines: it belongs in tests/integration")
        item.add_marker(kind)
