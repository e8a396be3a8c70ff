#!/usr/bin/env bash
# The main job: set up .venv, build the demo models if missing, start the mesh on
# configs/demo.yaml, stream one answer per domain through the gateway, then stop.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/ensure-venv.sh"
exec "$ROOT/.venv/bin/expertmesh" demo "$@"
