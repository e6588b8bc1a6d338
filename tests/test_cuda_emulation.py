"""The CUDA kernels' bodies (csrc/mask_select_kernel.cuh, csrc/gather_kernel.cuh) compiled with g++ and run on
the CPU by a thread-per-CUDA-thread shim (tests/cuda_emulation/cuda_shim.h: barriers for __syncthreads, lockstep
warp ballots and shuffles), against the C++ twin (mask-select: bit for bit) and plain loops (gather / scatter:
exact). So CI checks the kernels' parallel logic (block scans, radix select, warp ownership of duplicate rows,
vector and scalar paths) without a GPU; `pytest -m gpu` checks the real kernels on the device. What this cannot
see: device-only intrinsics (they sit in csrc/mask_select.h behind __CUDA_ARCH__ and are reviewed by hand),
memory-model effects, and half / bfloat16 (the emulation runs float32).

The mutation tests plant a bug in a copy of each kernel and require the harness to report it: a harness that
cannot fail proves nothing."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"
CSRC = ROOT / "csrc"


def _cxx() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must run the CUDA host emulation but no C++ compiler (g++ / c++) was found")
        pytest.skip("no C++ compiler")
    return cxx


def _build(tmp: Path, driver: str, extra_include: Path | None = None) -> Path:
    exe = tmp / (driver + (f"-{extra_include.name}" if extra_include else ""))
    includes = ([f"-I{extra_include}"] if extra_include else []) + [f"-I{CSRC}", f"-I{EMU}"]
    sources = [str(EMU / f"{driver}.cpp")] + ([str(CSRC / "mask_select_cpu.cpp")] if driver == "mask_select_emu" else [])
    cmd = [_cxx(), "-std=c++17", "-O1", "-pthread", "-ffp-contract=off", *includes, *sources, "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr[-3000:]
    return exe


def _run(exe: Path, seed: int, cases: int) -> tuple[int, str]:
    proc = subprocess.run([str(exe), str(seed), str(cases)], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout


def _summary(out: str) -> dict[str, int]:
    last = out.strip().splitlines()[-1]
    return {k: int(v) for k, v in re.findall(r"(\w+) (-?\d+)", last)}


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_emulation")


@pytest.mark.parametrize("seed", [1, 2])
def test_mask_select_kernel_equals_the_cpp_twin(build_dir, seed):
    exe = build_dir / "mask_select_emu"
    if not exe.exists():
        exe = _build(build_dir, "mask_select_emu")
    rc, out = _run(exe, seed, 60)
    s = _summary(out)
    assert rc == 0 and s["mismatches"] == 0, out[-3000:]
    assert s["cases"] == 60 and s["selected"] > 0 and s["dropped"] > 0  # selection and capacity overflow ran


def test_gather_and_scatter_kernels_equal_loops(build_dir):
    rc, out = _run(_build(build_dir, "gather_emu"), 3, 40)
    s = _summary(out)
    assert rc == 0 and s["mismatches"] == 0 and s["cases"] == 40, out[-3000:]


@pytest.mark.parametrize("header,old,new,driver", [
    # exact mode: positions whose key equals the threshold are all taken, not just enough of them
    ("mask_select_kernel.cuh", "take_equal = (less == 0);", "take_equal = true;", "mask_select_emu"),
    # scatter: every slot writes its partial sum, not only the first slot pointing at a row
    ("gather_kernel.cuh", "if (m & below) return;", "(void)below;", "gather_emu"),
])
def test_the_emulation_catches_a_planted_bug(build_dir, tmp_path, header, old, new, driver):
    text = (CSRC / header).read_text()
    assert text.count(old) == 1, f"{header} changed: update the planted bug"
    mutant = tmp_path / "mutant"
    mutant.mkdir()
    (mutant / header).write_text(text.replace(old, new))
    rc, out = _run(_build(build_dir, driver, extra_include=mutant), 1, 40)
    assert rc == 1 and _summary(out)["mismatches"] > 0, out[-2000:]
