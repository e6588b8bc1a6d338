#!/usr/bin/env bash
# The GPU machine's Python stack, on a CPU machine: catch what would fail there before spending GPU time on it.
# The lent H100/H200 runs Python 3.12 with torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0 (see
# /work/.library/device/KINDS.md), while CI and the dev venv run newer releases. This script builds that stack in
# a venv outside the repo (about 5 GB of downloads: torch's CUDA wheels), installs mlmfast the way
# gpu_check.sh does (offline-style, CUDA part included: nvcc is on the dev machine), then runs
#   1. the compile check under triton 3.6 (its ptxas decides registers and spills on the GPU machine),
#   2. the CPU test suite, minus the Triton-interpreter kernel tests (triton 3.6's interpreter cannot run
#      loops whose bounds are loaded values; the compiled kernels can, and CI interprets with triton 3.9),
#   3. gpu_check.sh in dry-run mode under Python 3.12.
#
#   benchmarks/image_twin.sh [VENV_DIR]        # default /tmp/mlmfast-image-twin; reused when it exists
# Environment: TWIN_PYTHON (a python3.12; default: pyenv's 3.12, else python3.12 on PATH), TWIN_JOBS (compile
# processes, default 2), TWIN_STEPS (which of "compile tests dryrun" to run; default all three).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${1:-/tmp/mlmfast-image-twin}
STEPS=${TWIN_STEPS:-compile tests dryrun}
PY312=${TWIN_PYTHON:-}
if [ -z "$PY312" ]; then
  PY312=$(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python 2>/dev/null | tail -n 1 || true)
  [ -n "$PY312" ] || PY312=$(command -v python3.12 || true)
fi
[ -n "$PY312" ] || { echo "image_twin: no python3.12 found (set TWIN_PYTHON)" >&2; exit 2; }

# The GPU image's versions (KINDS.md, 2026-11); numpy 2.5.2 is the image's too.
PINS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 numpy==2.5.2
      tqdm matplotlib pybind11 pytest hypothesis setuptools wheel)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "${PINS[@]}"
fi
PY="$VENV/bin/python"
# A copy of the working tree, so the editable install (a cp312 extension) stays out of this checkout.
SRC="$VENV/src"
rm -rf "$SRC"
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
(cd "$SRC" && "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
"$PY" -c "import sys, torch, triton, transformers, mlmfast._C as C; print('image twin: python', sys.version.split()[0],
'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
'| mlmfast._C CUDA part:', C.WITH_CUDA, C.CUDA_ARCHS or C.CUDA_SKIP_REASON)"

rc=0
cd "$SRC"
if [[ " $STEPS " == *" compile "* ]]; then
  echo "== compile check (triton 3.6, sm_90 + sm_80, every variant)"
  env -u TRITON_INTERPRET "$PY" -m mlmfast.kernels.compile_check --arch 90 80 --all-variants \
    --jobs "${TWIN_JOBS:-2}" | tail -n 25 || rc=1
fi
if [[ " $STEPS " == *" tests "* ]]; then
  echo "== CPU tests (Triton-interpreter kernel tests left out, see the header)"
  "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" --ignore=tests/test_attention.py \
    --deselect tests/test_linear_ce.py::test_kernel_matches_fp64 \
    --deselect tests/test_linear_ce.py::test_kernel_no_bias_sum_and_backward_chunks \
    --deselect tests/test_linear_ce.py::test_kernel_forward_vocabulary_splits \
    --deselect "tests/test_linear_ce.py::test_all_ignored_gives_zero_loss_and_zero_grads[kernel]" \
    --deselect "tests/test_linear_ce.py::test_num_active_ignores_the_tail[kernel]" \
    --deselect tests/test_fast_path.py::test_bertformlm_fast_kernels_under_interpreter \
    --deselect tests/test_fast_path.py::test_lengths_give_the_kernel_seqlens_and_the_same_step \
    --deselect "tests/test_fast_path.py::test_compiled_step_takes_any_sequence_length[bertformlm-kernel]" \
    --deselect "tests/test_bad_input.py::test_baseline_call_is_valid[attention]" \
    --deselect tests/test_bench.py::test_attention_sweep_compiles_candidates_in_worker_processes || rc=1
fi
if [[ " $STEPS " == *" dryrun "* ]]; then
  echo "== gpu_check.sh dry run"
  PYTHON="$PY" GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh "$VENV/gpu_check_dry" | tail -n 15 || rc=1
fi
exit $rc
