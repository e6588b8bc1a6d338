"""Shared benchmark plumbing: the environment record, timing, percentiles, device peaks and peak memory.

Used by the suite (`python -m benchmarks`, `mlmfast bench`) and by the single-op scripts
(`bench_masking.py`, `bench_attention.py`). Importing this module is cheap: torch is imported inside the functions
that need it.

Timing: on CUDA every timed call sits between two CUDA events recorded on the current stream, and the host
synchronises once, after the last call (the events tile the GPU timeline, so a host that cannot keep the GPU
busy shows up as a longer step); on CPU, `time.perf_counter` around each call. Warm-up calls are not timed.
Percentiles are nearest-rank over the timed calls.

Peak memory (`PeakMemory`): what a measured region adds on top of what was live when it started.
  CUDA  torch.cuda.max_memory_allocated() - memory_allocated() at the start (peak stats reset at the start):
        tensors only, not the caching allocator's reserve or the CUDA context.
  CPU   the process's peak resident set (VmHWM in /proc/self/status, reset at the start by writing 5 to
        /proc/self/clear_refs) - its resident set at the start, measured after gc.collect() and glibc
        malloc_trim(0) so memory freed by an earlier region is given back first. Without /proc/self/clear_refs
        (not Linux) the peak cannot be reset in-process and is reported as None.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (fp32 accumulate, no structured sparsity) from the vendors' datasheets, TFLOP/s.
# Matched in order against torch.cuda.get_device_name(): the first entry whose every word occurs in the name wins,
# so the specific names come before the general ones. Leads, not measurements: `--peak-tflops` overrides.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM (HBM3): "NVIDIA H100 80GB HBM3"
    ("H800 PCIe", 756.0),
    ("H800", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 125.0),  # NVIDIA publishes no A10G sheet; the A10's figure. Override if you know better.
    ("A10", 125.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 6000 Ada", 364.2),
    ("A6000", 154.8),
    ("RTX 4090", 165.2),  # bf16 with fp32 accumulate (330 with fp16 accumulate)
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 (no bf16 on Volta)
    ("T4", 65.0),  # fp16
]


def peak_tflops(device_name: str) -> tuple[Optional[float], str]:
    """(dense bf16 peak TFLOP/s, where it came from) for a CUDA device name; (None, why) when unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if all(word in device_name for word in key.split()):
            return value, f"datasheet dense bf16 for {key}"
    return None, f"no peak known for {device_name!r}: pass --peak-tflops"


# ---- environment -----------------------------------------------------------------------------------------------
def git_commit() -> str:
    """Short commit of the checkout, with "+dirty" when tracked files differ; "unknown" outside a git checkout."""
    env = os.environ.get("MLMFAST_GIT_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}"


def environment(device) -> dict[str, Any]:
    """Device, library versions, git commit, date and machine load: stored with every result."""
    import importlib

    import torch

    device = torch.device(device)
    env: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device_type": device.type,
        "device": device_name(device),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        env["load_avg_1m"] = None
    for mod in ("mlmfast", "torch", "triton", "transformers", "numpy"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except Exception as exc:  # report, never fail
            env[mod] = f"not available ({type(exc).__name__})"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["capability"] = f"sm_{major}{minor}"
        env["torch_cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def short_device(env: dict[str, Any]) -> str:
    """A file-name-safe device tag: "cpu-<model>" or the GPU name ("h100-80gb-hbm3")."""
    if env["device_type"] == "cpu":
        words = [w for w in env["cpu"].replace("(R)", "").replace("(TM)", "").split()
                 if w.lower() not in ("cpu", "processor", "@", "intel", "amd", "core", "with")]
        name = "cpu-" + "-".join(words[:3])
    else:
        name = env["device"].replace("NVIDIA", "").strip()
    safe = "".join(c if c.isalnum() else "-" for c in name.lower())
    while "--" in safe:
        safe = safe.replace("--", "-")
    return safe.strip("-")[:48] or "device"


# ---- timing ----------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[int], Any], n_warmup: int, n_timed: int, device) -> tuple[list[float], list[float]]:
    """Call fn(i) for i = 0 .. n_warmup + n_timed - 1; return (warm-up seconds, timed seconds) per call.

    Warm-up calls are timed with the host clock after a device sync (their times, e.g. the compile step, are
    reported but not part of the statistics)."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    warm = []
    for i in range(n_warmup):
        t0 = time.perf_counter()
        fn(i)
        if cuda:
            torch.cuda.synchronize(device)
        warm.append(time.perf_counter() - t0)
    if not cuda:
        timed = []
        for i in range(n_warmup, n_warmup + n_timed):
            t0 = time.perf_counter()
            fn(i)
            timed.append(time.perf_counter() - t0)
        return warm, timed
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_timed)]
    for j, (start, end) in enumerate(events):
        start.record()
        fn(n_warmup + j)
        end.record()
    torch.cuda.synchronize(device)
    return warm, [start.elapsed_time(end) / 1e3 for start, end in events]


class DeviceLost(RuntimeError):
    """A CUDA error (e.g. an illegal memory access, a device-side assert) left the context unusable: every later
    CUDA call would fail with it, so the suite stops and reports the rest as not run."""


def device_lost(device) -> Optional[str]:
    """After a failed measurement: None if the device still works, else why not (one line)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        return None
    except Exception as exc:  # the sticky error of an earlier launch surfaces here
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0][:160] if first else ''}"


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def spread(seconds: Sequence[float]) -> dict[str, float]:
    """median / p20 / p80 in milliseconds."""
    return {"ms": statistics.median(seconds) * 1e3, "p20_ms": percentile(seconds, 0.2) * 1e3,
            "p80_ms": percentile(seconds, 0.8) * 1e3}


def median_rate(amounts: Sequence[float], seconds: Sequence[float]) -> float:
    """Median over calls of amount_i / seconds_i (amounts cycle when shorter than seconds)."""
    n = len(amounts)
    return statistics.median(amounts[i % n] / s for i, s in enumerate(seconds))


# ---- peak memory -----------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory a region adds (see the module docstring). `start()`, run the region, then `peak_bytes()`."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.base = 0
        self.ok = True

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated - allocated at start"
        if self.ok:
            return "peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS at start"
        return "n/a: /proc/self/clear_refs not writable"

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        self.ok = _reset_hwm()
        self.base = (_proc_status_kib("VmRSS") or 0) * 1024

    def reset_peak(self) -> None:
        """Start a new peak without moving the base (memory live since `start()` stays counted)."""
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _malloc_trim()
        self.ok = self.ok and _reset_hwm()

    def peak_bytes(self) -> Optional[int]:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        hwm = _proc_status_kib("VmHWM")
        if not self.ok or hwm is None:
            return None
        return max(0, hwm * 1024 - self.base)
