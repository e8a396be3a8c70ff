"""The import rules of docs/architecture.md ("The house"), enforced: each part imports only
what it may. Imports are read with ``ast`` from the source (nothing is imported)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import REPO

#: Source folder -> the package it is (pyproject.toml's package-dir).
FOLDERS = {"expertmesh": "expertmesh", "gateway": "expertmesh.gateway", "services": "expertmesh.services"}
#: The parts that run the others: entry points, the supervisor, the preflight, the benchmark.
TOP = ("expertmesh.cli", "expertmesh.supervisor", "expertmesh.child", "expertmesh.probe", "expertmesh.bench")
SERVERS = ("expertmesh.gateway", "expertmesh.services")
#: The one exception: the preflight checks the gateway's tokens file with the gateway's own
#: parser, so that the check and the gateway cannot disagree on a line.
ALLOWED = {("expertmesh.preflight.security", "expertmesh.gateway.auth")}
#: The gateway's policy modules: decisions from state, no I/O.
POLICY = (
    "expertmesh.gateway.plan",
    "expertmesh.gateway.replica",
    "expertmesh.gateway.ejection",
    "expertmesh.gateway.router",
)
#: What the policy modules may not import: grpc and the gateway's I/O modules.
POLICY_MAY_NOT = (
    "grpc",
    "expertmesh.gateway.link",
    "expertmesh.gateway.watch",
    "expertmesh.gateway.pool",
    "expertmesh.gateway.forward",
    "expertmesh.gateway.servicer",
    "expertmesh.gateway.server",
)


def _modules() -> Iterator[tuple[str, Path]]:
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if "v1" in parts[:1]:
                continue  # generated protobuf code
            name = ".".join([package, *parts])
            yield name.removesuffix(".__init__"), path


def imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` (module ``name``) imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _under(module: str, parts: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in parts)


MODULES = dict(_modules())


def test_the_rules_see_every_part() -> None:
    assert "expertmesh.gateway.plan" in MODULES and "expertmesh.services.expert.server" in MODULES
    assert "expertmesh.gateway.forward" in imports(
        "expertmesh.gateway.servicer", MODULES["expertmesh.gateway.servicer"]
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_part_imports_only_what_it_may(name: str) -> None:
    found = imports(name, MODULES[name])
    if _under(name, TOP):
        return  # the top runs everything
    broken = {m for m in found if _under(m, TOP)}
    if name.startswith("expertmesh.gateway"):
        broken |= {m for m in found if _under(m, ("expertmesh.services",))}
    elif name.startswith("expertmesh.services"):
        broken |= {m for m in found if _under(m, ("expertmesh.gateway",))}
    else:  # the shared core serves both servers and imports neither
        broken |= {m for m in found if _under(m, SERVERS)}
    broken = {m for m in broken if not any(name == a and _under(m, (b,)) for a, b in ALLOWED)}
    if name in POLICY:
        broken |= {m for m in found if _under(m, POLICY_MAY_NOT)}
    assert not broken, f"{name} imports {sorted(broken)}"
