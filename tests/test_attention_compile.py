"""CI: the attention kernels compile for sm_90 and sm_80 without a GPU, with no register spill.

Runs `python -m mlmfast.kernels.compile_check` in a subprocess without TRITON_INTERPRET (conftest.py sets it for
this process, and interpreted kernels cannot be compiled). A representative subset keeps it near a minute on
2 cores; the full sweep (all head dims and dtypes, both variants) is
`python -m mlmfast.kernels.compile_check --arch 90 80`.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SUBSET = ["--arch", "90", "80", "--head-dims", "64", "128", "--dtypes", "bfloat16", "float32"]


def test_kernels_compile_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; the default it keeps
    proc = subprocess.run([sys.executable, "-m", "mlmfast.kernels.compile_check", *SUBSET], env=env,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "| fwd | 64 | bf16 | 90 |" in proc.stdout
