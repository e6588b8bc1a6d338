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


def device_arch(device: torch.device) -> int:
    """Compute capability as 10 * major + minor (90 = sm_90), which picks the launch configurations; 90 for a CPU
    tensor (the interpreter uses the sm_90 configurations)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90
