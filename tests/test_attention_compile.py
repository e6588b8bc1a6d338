"""CI: the Triton kernels compile for sm_90 and sm_80 without a GPU, with no register spill.

Runs `python -m mlmfast.kernels.compile_check` in a subprocess without TRITON_INTERPRET (conftest.py sets it for
this process, and interpreted kernels cannot be compiled). By default every kernel for every head dim x
fp16/bf16/fp32 x sm_90/sm_80, in the plain and the mask+dropout variants, plus the linear-CE kernels (286
kernels: 4 min on 2 idle cores with a cold Triton cache, 2026-11-28). MLMFAST_FULL_COMPILE_CHECK=1 adds the
mask-only and dropout-only variants (502 kernels, ~8 min on 2 cores).
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

DEFAULT = ["--arch", "90", "80"]  # every head dim and dtype (compile_check's defaults)
FULL = ["--arch", "90", "80", "--all-variants"]


def _compile_env() -> dict:
    """This environment without TRITON_INTERPRET (the subprocess must compile, not interpret)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; the default it keeps
    return env


def test_kernels_compile_without_spills():
    env = _compile_env()
    args = FULL if os.environ.get("MLMFAST_FULL_COMPILE_CHECK") == "1" else DEFAULT
    proc = subprocess.run([sys.executable, "-m", "mlmfast.kernels.compile_check", *args, "--jobs", "2"], env=env,
                          capture_output=True, text=True, timeout=3600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    from mlmfast.kernels.attention import SUPPORTED_HEAD_DIMS

    for d in SUPPORTED_HEAD_DIMS:  # every head dim x dtype x arch was compiled
        for dt in ("fp16", "bf16", "fp32"):
            for arch in (90, 80):
                for kind in ("fwd", "dkdv", "dq"):
                    assert f"| {kind} | {d} | {dt} | {arch} |" in proc.stdout, (kind, d, dt, arch)


def test_dropout_draws_stay_in_their_threads(tmp_path):
    """sm_90 SASS of the fwd and dQ kernels (D=64, bf16): the dropout variant's inner loop has exactly the plain
    loop's shared/global memory instructions. The draw layout (kernels/attention.py, _dropout_keep) gives each
    thread the draws of its own accumulator elements; a layout that does not would add a shared-memory round trip
    of the keep mask to every iteration (the previous one did: 58 vs 18 memory instructions in the fwd loop)."""
    import json

    env = _compile_env()
    out = tmp_path / "mix.json"
    proc = subprocess.run([sys.executable, "-m", "mlmfast.kernels.sass", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(r["kernel"], "drop" in r["variant"]): r for r in json.loads(out.read_text())["rows"]}
    for kind in ("fwd", "dq"):
        plain, drop = rows[kind, False], rows[kind, True]
        assert drop["classes"]["mem"] == plain["classes"]["mem"], (kind, plain, drop)
        assert drop["classes"]["mma"] == plain["classes"]["mma"], (kind, plain, drop)
    # and every dropout variant really draws: more integer work per element than its plain twin
    def int_per_element(r):
        return r["classes"]["int"] * r["warps"] / r["tile"]

    for kind in ("fwd", "dq", "dkdv"):
        assert int_per_element(rows[kind, True]) > int_per_element(rows[kind, False]), kind


def test_sass_tool_rejects_a_bad_config():
    """`--config KIND=BM,BN,W,S`: one clear error naming the argument, before anything compiles."""
    env = _compile_env()
    for bad in ("dkdv=64,120,8,3", "attn=64,128,8,3", "dq=64,64,4"):
        proc = subprocess.run([sys.executable, "-m", "mlmfast.kernels.sass", "--config", bad], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"--config '{bad}': expected KIND=BM,BN,W,S" in proc.stderr, proc.stderr


def test_wgmma_rule_exempts_only_tiles_too_short_for_it():
    """A 16-bit sm_90 kernel compiled to the sm_80 `mma` fails the check unless its products' M dimension is
    below wgmma's 64 rows (dK/dV: BLOCK_N keys; fwd, dQ: BLOCK_M query rows), where Hopper has no wgmma for it."""
    from mlmfast.kernels.compile_check import Result

    def result(kernel, mma, rows, dtype="bf16", arch=90):
        return Result(kernel, 128, dtype, arch, "-,-", "-", regs=177, spill_bytes=0, smem=53248, mma=mma,
                      mma_rows=rows)

    assert result("dkdv", "mma", 32).ok()  # a 32-key tile: no wgmma shape exists
    assert not result("dkdv", "mma", 64).ok()  # wgmma was possible: a silent fallback fails
    assert not result("fwd", "mma", 128).ok()
    assert result("fwd", "wgmma", 128).ok()
    assert result("dq", "mma", 64, dtype="fp32").ok()  # fp32 (TF32) and sm_80 are not held to it
    assert result("dq", "mma", 64, arch=80).ok()
