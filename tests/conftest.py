"""Fixtures: the demo models, built once per machine (~10 s) and shared by every test."""

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
