"""Which implementation of each op is active, and why a fast one is not.

Each fast op registers a probe: a function that returns None when the fast implementation can run here, or
a one-line reason when it cannot. Probes never raise and never import heavy modules at `import mlmfast`
time; `mlmfast info` prints `status()`. Ops pick their implementation through `fast_available(name)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

Probe = Callable[[], Optional[str]]


@dataclass(frozen=True)
class OpStatus:
    name: str  # op name, e.g. "mask_select"
    fast: str  # what the fast implementation is, e.g. "CUDA kernel (mlmfast._C)"
    reference: str  # the plain-PyTorch fallback
    reason: Optional[str]  # None when the fast implementation is available, else why not

    @property
    def available(self) -> bool:
        return self.reason is None


_REGISTRY: dict[str, tuple[str, str, Probe]] = {}


def register(name: str, fast: str, reference: str, probe: Probe) -> None:
    """Record an op's fast implementation and the probe that says whether it can run."""
    _REGISTRY[name] = (fast, reference, probe)


def status(name: str) -> OpStatus:
    fast, reference, probe = _REGISTRY[name]
    try:
        reason = probe()
    except Exception as exc:  # a probe that breaks means "not available", with the error as the reason
        reason = f"probe failed: {type(exc).__name__}: {exc}"
    return OpStatus(name, fast, reference, reason)


def fast_available(name: str) -> bool:
    return status(name).available


def all_status() -> list[OpStatus]:
    _load_registrations()
    return [status(n) for n in sorted(_REGISTRY)]


# Modules that register ops; importing them must be cheap and must not fail when an optional piece is missing.
_REGISTERING_MODULES: list[str] = ["mlmfast.attention", "mlmfast.ops", "mlmfast.linear_ce"]


def _load_registrations() -> None:
    import importlib

    for mod in _REGISTERING_MODULES:
        importlib.import_module(mod)
