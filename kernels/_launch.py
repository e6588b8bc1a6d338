"""Host-side helpers shared by the Triton launchers in `mlmfast.kernels` (no triton import here)."""
from __future__ import annotations

import torch


class on_device:
    """Make a tensor's CUDA device current while launching (Triton launches on the current device); a no-op
    for CPU tensors (the interpreter)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


_ARCH: dict = {}  # CUDA device index -> 10 * major + minor


def device_arch(device: torch.device) -> int:
    """Compute capability as 10 * major + minor (90 = sm_90), which picks the launch configurations; 90 for a CPU
    tensor (the interpreter uses the sm_90 configurations). Looked up once per device (every launch asks)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        arch = _ARCH.get(index)
        if arch is None:
            major, minor = torch.cuda.get_device_capability(index)
            arch = _ARCH[index] = 10 * major + minor
        return arch
    return 90


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints. triton.cdiv does the same, but as a ConstexprFunction a call costs 1-3 us of
    host time (measured, triton 3.6 / 3.9), and a launch path calls it several times."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1); triton.next_power_of_2 on plain ints, without its call cost."""
    return 1 << (n - 1).bit_length()
