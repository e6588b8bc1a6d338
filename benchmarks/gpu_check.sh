#!/usr/bin/env bash
# The GPU check in one call, for an H100 machine with no network: offline install, GPU tests, op and train-step
# benchmarks at BERT-base, L = 512 (the targets' length: first, so that a spent budget cuts L = 128's compiles)
# and 128; a short table printed last. Under 9 minutes in all: every stage runs
# under `timeout`, and the benchmark starts nothing new once its time budget is spent (the rest becomes skipped
# rows) and, if stopped, still writes what it measured.
#
#   benchmarks/gpu_check.sh [OUT_DIR]                       # OUT_DIR: default $OUT, else results_gpu
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh /tmp/gc     # on a CPU: checks the script itself (no install,
#                                                           # GPU tests collected only, a tiny CPU benchmark)
# Files in OUT_DIR (flat, 8): install.log (nvidia-smi first) pytest_gpu.log bench.log results.json results.md
# results.png attention.json (benchmarks/bench_attention.py at issue 4's target shape, D = 64, L = 512, no / half
# padding, dropout 0 / 0.1, mlmfast vs SDPA, timed launched from Python and as CUDA-graph replays; 75 s) profile.md
# (benchmarks/profile_step.py: device-busy share, kernel launches and top ops by device time of hf-sdpa and
# mlmfast-fast steps at L = 512, full rows: where the targets are missed; 45 s)
# Environment: GPU_CHECK_SECONDS (total budget, default 540: call it with a 590 s limit), PYTHON (default python3), MLMFAST_GIT_COMMIT (the
# commit to record where the copy has no .git), GPU_CHECK_TESTS=0 (skip the GPU tests), GPU_CHECK_BENCH_ARGS
# (extra arguments for the benchmark, after the defaults, so they win; e.g. "--suite train --seq-lens 512"),
# GPU_CHECK_TEST_WORKERS (pytest-xdist processes for the GPU tests when xdist is installed; default 8, 0 = one).
# Needs on the machine: torch, triton, transformers, numpy, pybind11, setuptools, pytest, matplotlib; nvcc to build
# the CUDA part of mlmfast._C (without it the benchmark runs mask_select's PyTorch twin and says so).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-${OUT:-results_gpu}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
TOTAL=${GPU_CHECK_SECONDS:-540}
START=$(date +%s)
export PYTHONUNBUFFERED=1
left() { echo $((TOTAL - ($(date +%s) - START))); }
# the status of an optional stage (attention bench, step profile) from its exit code: stage_status RC [LOG]
stage_status() {
  case $1 in
    0) echo "ok" ;;
    124 | 137) echo "stopped at the time limit" ;;
    *) echo "FAILED (exit $1${2:+; see $2})" ;;
  esac
}
note() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
[ -n "${MLMFAST_GIT_COMMIT:-}" ] || MLMFAST_GIT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export MLMFAST_GIT_COMMIT

note "out=$OUT budget=${TOTAL}s dry_run=$DRY commit=$MLMFAST_GIT_COMMIT"

# 1. The device (at the top of install.log: the device tool brings back 8 files at most).
{ echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi not found"; echo; echo "== install"; } >"$OUT/install.log"
nvidia-smi -L 2>/dev/null || true

# 2. Offline install (builds mlmfast._C, with the CUDA part when nvcc is there), then what is installed.
if [ "$DRY" = 1 ]; then
  echo "dry run: skipped: $PY -m pip install --no-build-isolation --no-deps -e ." >>"$OUT/install.log"
  install="dry run (skipped)"
elif PIP_DISABLE_PIP_VERSION_CHECK=1 timeout -k 10 240 "$PY" -m pip install --no-index --no-build-isolation \
    --no-deps -e . >>"$OUT/install.log" 2>&1; then
  install="ok"
  # without the CUDA part the GPU tests of mask_select / gather fail and the benchmark runs their twins: say so now
  cuda_part=$("$PY" -c "from mlmfast import ops; e = ops.extension()
print('on' if e is not None and e.WITH_CUDA else 'OFF: ' + ops._cuda_part_reason())" 2>&1 | tail -n 1 || true)
  [ "$cuda_part" = on ] || install="ok, but the CUDA part of mlmfast._C is $cuda_part"
else
  install="FAILED (exit $?; see install.log)"
fi
{ echo "== versions"; "$PY" -m mlmfast info 2>&1 || true; } >>"$OUT/install.log"
note "install: $install"

# 3. GPU tests (failures are recorded, not fatal). At most 150 s, and 240 s stay for the benchmark.
t_tests=$(($(left) - 240))
[ "$t_tests" -le 150 ] || t_tests=150
if [ "${GPU_CHECK_TESTS:-1}" = 0 ]; then
  echo "not run: GPU_CHECK_TESTS=0" >"$OUT/pytest_gpu.log"
  tests="skipped (GPU_CHECK_TESTS=0)"
elif [ "$t_tests" -lt 20 ]; then
  echo "not run: no time left" >"$OUT/pytest_gpu.log"
  tests="not run (no time left)"
else
  if [ "$DRY" = 1 ]; then args=(-m gpu --collect-only -q); else args=(-m gpu -q -rfEs --durations=15); fi
  # Most of the GPU tests' time is Triton / inductor compilation, one CPU core each: spread the tests over
  # worker processes (pytest-xdist, in the GPU image) sharing the GPU. GPU_CHECK_TEST_WORKERS=0: one process.
  workers=${GPU_CHECK_TEST_WORKERS:-8}
  if [ "$DRY" != 1 ] && [ "$workers" -gt 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    args+=(-n "$workers" --dist worksteal)  # a slow test does not hold back the ones queued behind it
  fi
  set +e
  timeout -k 10 "$t_tests" "$PY" -m pytest "${args[@]}" -p no:cacheprovider >"$OUT/pytest_gpu.log" 2>&1
  rc=$?
  set -e
  last=$(grep -E "(passed|failed|error|selected|collected|no tests ran)" "$OUT/pytest_gpu.log" | tail -n 1 || true)
  case $rc in
    0) tests="ok: $last" ;;
    124 | 137) tests="TIMEOUT after ${t_tests}s: $last" ;;
    *) tests="FAILED (exit $rc): $last" ;;
  esac
fi
note "tests: $tests"

# 4. Benchmarks: ops + train steps. Hard stop 135 s before the end (75 s for the attention bench, 45 s for the
# step profile, 15 s spare); no new path in the last 75 s before that (a torch.compile build takes up to a minute).
t_bench=$(($(left) - 135))
budget=$((t_bench - 75))
if [ "$DRY" = 1 ]; then
  bargs=(--device cpu --smoke)
else
  bargs=(--device cuda --models bert-base --seq-lens 512,128 --tokens-per-batch 16384 --steps 10 --warmup 2
         --compile-warmup 3)
fi
# shellcheck disable=SC2206
bargs+=(${GPU_CHECK_BENCH_ARGS:-})
if [ "$budget" -lt 30 ]; then
  echo "not run: no time left" >"$OUT/bench.log"
  bench="not run (no time left)"
else
  set +e
  timeout -k 15 "$t_bench" "$PY" -m benchmarks --suite ops,train "${bargs[@]}" --time-budget "$budget" \
    --out "$OUT" --name results >"$OUT/bench.log" 2>&1
  rc=$?
  set -e
  case $rc in
    0) bench="ok" ;;
    124 | 130 | 137) bench="STOPPED at the time limit (exit $rc): partial results" ;;
    *) bench="FAILED (exit $rc; see bench.log)" ;;
  esac
fi
note "benchmarks: $bench"

# 4b. Attention at issue 4's target shape: events (as an eager step launches it) and CUDA-graph replay (the kernels'
# own time), mlmfast and SDPA alike. Its table goes to bench.log.
t_attn=$(($(left) - 60))
[ "$t_attn" -le 75 ] || t_attn=75
if [ "$DRY" = 1 ]; then
  aargs=(--cpu-reference --L 17 --D 32 --tokens 64 --hidden 64)
else
  aargs=(--L 512 --D 64 --padding none half --dropout 0 0.1 --providers mlmfast sdpa --timing events graph)
fi
if [ "$t_attn" -lt 20 ]; then
  attn="not run (no time left)"
else
  set +e
  { echo; echo "== bench_attention ${aargs[*]}"; } >>"$OUT/bench.log"
  timeout -k 5 "$t_attn" "$PY" benchmarks/bench_attention.py "${aargs[@]}" --out "$OUT/attention.json" \
    >>"$OUT/bench.log" 2>&1
  attn=$(stage_status $? bench.log)
  set -e
fi
note "attention bench: $attn"

# 5. Step profile (is the step bound by the GPU or by the host's launches?), in what time is left.
t_prof=$(($(left) - 10))
if [ "$DRY" = 1 ]; then
  pargs=(--device cpu --model bert-tiny --seq-len 32 --tokens-per-batch 256 --steps 2 --warmup 1 --profile-steps 1)
else
  pargs=(--device cuda --model bert-base --seq-len 512 --dist full --tokens-per-batch 16384)
fi
if [ "$t_prof" -lt 30 ]; then
  echo "not run: no time left" >"$OUT/profile.md"
  prof="not run (no time left)"
else
  set +e
  timeout -k 5 "$t_prof" "$PY" -m benchmarks.profile_step "${pargs[@]}" --out "$OUT/profile.md" >/dev/null 2>&1
  prof=$(stage_status $?)
  set -e
fi
note "step profile: $prof"
rm -f "$OUT"/.*.tmp "$OUT"/*.tmp-*.png  # what mlmfast/_io.py's atomic writes leave if killed mid-write

# 6. Summary, and the short tables last.
echo
echo "== gpu_check: $(($(date +%s) - START))s; install: $install; tests: $tests; benchmarks: $bench; attention: $attn; profile: $prof"
echo "== files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ "$prof" = ok ]; then awk '/^\| path \|/ {on = 1} on && /^$/ {exit} on' "$OUT/profile.md"; echo; fi
if [ -f "$OUT/attention.json" ]; then
  "$PY" -c "import json, sys; sys.path.insert(0, '.'); from benchmarks.bench_attention import _targets
print(_targets(json.load(open(sys.argv[1]))) or '(attention: no target-shape rows)')" "$OUT/attention.json" || true
  echo
fi
if [ -f "$OUT/results.json" ]; then
  "$PY" -m benchmarks.report "$OUT/results.json" --short || true
else
  tail -n 20 "$OUT/bench.log" || true
fi
case "$install/$tests/$bench" in
  *FAILED* | *TIMEOUT* | *STOPPED* | *"not run"* | *"CUDA part of mlmfast._C is OFF"*) exit 1 ;;
esac
exit 0
