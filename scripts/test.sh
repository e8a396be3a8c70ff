#!/usr/bin/env bash
# The test suite: set up .venv, build the demo models if missing, run lint, types and pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/ensure-venv.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
scripts/mypy.sh
exec .venv/bin/python -m pytest "$@"
