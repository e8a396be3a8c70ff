"""Fixtures: the demo models, built once per machine (~10 s) and shared by every test."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.demo_models import ensure_demo_models


@pytest.fixture(scope="session")
def demo_models() -> list[Path]:
    """The tiny demo model folders (built on first use)."""
    return ensure_demo_models(log=False)
