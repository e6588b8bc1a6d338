#!/usr/bin/env bash
# mlmfast quick start.
#   ./run.sh [TRAIN FLAGS]   set up .venv if needed, install, train on the built-in corpus, print the result
#   ./run.sh test [PYTEST ARGS]   the test suite (exactly what CI runs)
# Environment: PYTHON (default python3), MLMFAST_VENV (default .venv), TORCH_SPEC (default torch==2.13.0),
# MLMFAST_CUDA=0/1 (skip/force the CUDA part of the extension build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=${MLMFAST_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating $VENV with $($PY --version 2>&1)"
    "$PY" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  # Re-install only when the packaging or the C++/CUDA sources changed.
  local want have stamp="$VENV/.mlmfast-install-stamp"
  want=$(cat setup.py pyproject.toml $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -d' ' -f1)
  have=$(cat "$stamp" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    echo "[run.sh] installing mlmfast and its dependencies into $VENV (first run: a few minutes)"
    python -m pip install -q --upgrade pip
    # Install torch first and pinned: an open range can pull a multi-GB build that the machine does not need.
    python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

setup
if [ "${1:-}" = "test" ]; then
  shift
  exec python -m pytest -q "$@"
fi
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  exec mlmfast train --help
fi
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
exec mlmfast train --out "$out" "$@"
