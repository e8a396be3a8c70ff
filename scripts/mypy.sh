#!/usr/bin/env bash
# mypy over the packages as Python imports them. gateway/, services/ and bench/ are
# expertmesh.gateway, .services and .bench (package-dir in pyproject.toml); checked as folders of
# their own, every import across them is a module mypy cannot find, typed Any without a word.
# A tree of links in .typecheck/ gives mypy the installed layout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TREE="$ROOT/.typecheck/expertmesh"
rm -rf "$ROOT/.typecheck"
mkdir -p "$TREE"
for entry in "$ROOT"/expertmesh/*; do
  ln -s "../../expertmesh/$(basename "$entry")" "$TREE/"
done
for folder in gateway services bench; do
  ln -s "../../$folder" "$TREE/$folder"
done
cd "$ROOT"
exec .venv/bin/mypy --config-file pyproject.toml --cache-dir .mypy_cache/tree "$@" .typecheck/expertmesh
