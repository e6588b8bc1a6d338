"""Bidirectional attention with padding and dropout: the public `attention()` and its PyTorch reference.

`attention(q, k, v, ...)` runs the fused Triton kernel (`mlmfast.kernels.attention`) on CUDA tensors when
triton is installed, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1); otherwise it runs
`attention_reference`, the plain-PyTorch twin with the same semantics (the CPU path and the test oracle).
`mlmfast info` says which one is active and why (`mlmfast.dispatch`, op "attention").

Semantics (both paths):
  * q, k, v: [B, H, L, D] (SDPA's layout); fp16, bf16 or fp32 (fp64: reference only). A [B, L, H, D] tensor is
    passed as `x.transpose(1, 2)`: the kernel honours strides, and returns `out` in the same storage layout, so
    `out.transpose(1, 2).reshape(B, L, H * D)` is a view. Returns out [B, H, L, D].
  * Padding: position j of row b is kept iff j < seqlens[b] (when given) and key_padding_mask[b, j] (True =
    keep, when given; any pattern, not only right padding). Padded keys get no attention; padded query rows
    return exactly 0 and pass exactly 0 gradient to q, k and v.
  * Dropout on the attention weights: P -> P * keep / (1 - dropout_p). Pass dropout_p=0 in eval mode. The mask
    is a function of `seed` (int, int64 tensor, or None = drawn from torch's default generator of q's device,
    without a host sync): same seed, same mask; the backward regenerates the forward's mask. The kernel and the
    reference draw different masks from the same seed.
  * softmax_scale defaults to 1 / sqrt(D).
  * Precision (kernel): fp32 accumulation; fp32 inputs use TF32 dots on the GPU (about 1e-3 relative error,
    like torch.backends.cuda.matmul.allow_tf32); under the CPU interpreter everything is fp32.
  * A key_padding_mask that only pads (right or left, no holes inside a row's kept span) runs the same unmasked
    full blocks as `seqlens` (a per-row device flag; no host sync); only rows with holes read the mask in full
    blocks. `seqlens` still saves the mask loads of the partial blocks and gets larger tiles at some head dims.
  * Under torch.compile an int seed is a graph constant (a new value recompiles); pass a seed tensor or None.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
import types
from typing import Optional

import torch

from mlmfast import dispatch
from mlmfast._checks import INT, INT_OR_BOOL, check_tensor, dim_str, shape_str
from mlmfast.errors import UserError

_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_MAX_HEAD_DIM = 128


def padding_keep(batch: int, seq_len: int, seqlens: Optional[torch.Tensor] = None,
                 key_padding_mask: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """[B, L] bool: True where a position is kept (j < seqlens[b] and key_padding_mask[b, j]); None = all kept."""
    keep = None
    if seqlens is not None:
        idx = torch.arange(seq_len, device=device)
        keep = idx[None, :] < seqlens.to(device=device)[:, None]
    if key_padding_mask is not None:
        m = key_padding_mask.to(device=device) != 0
        keep = m if keep is None else keep & m
    return keep


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        seqlens: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                        dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                        dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-PyTorch attention with the semantics of `attention` (see the module docstring).

    Scores and P V are computed in the input dtype; the softmax in fp32 (fp64 for fp64 inputs).
    dropout_mask [B, H, L, L] bool (True = keep) fixes the dropout draw (e.g. the kernel's, from
    `mlmfast.kernels.attention.dropout_mask`); without it a mask is drawn with torch.rand.
    """
    B, H, L, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    keep = padding_keep(B, L, seqlens, key_padding_mask, q.device)  # (B, L) or None
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, L, L), input dtype
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))  # padded keys
        s = s.masked_fill(~keep[:, None, :, None], 0.0)  # padded query rows: finite (zeroed below)
    p = torch.softmax(s, dim=-1)  # (B, H, L, L)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask.to(p.device) / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v)  # (B, H, L, D)
    if keep is not None:
        out = out.masked_fill(~keep[:, None, :, None], 0.0)
    return out


def _check(q, k, v, seqlens, key_padding_mask, dropout_p, softmax_scale) -> None:
    """Shape / dtype / device / range checks (mlmfast._checks); never reads tensor values (no host sync)."""
    op = dict(op="attention")
    check_tensor("q", q, "a float16, bfloat16 or float32 tensor [B, H, L, D] (float64: reference only)",
                 dtypes=_KERNEL_DTYPES + (torch.float64,), shape=(None,) * 4, **op)
    B, H, L, D = q.shape
    like_q = dict(dtypes=(q.dtype,), shape=tuple(q.shape), device=q.device, device_of="q", **op)
    what = f"a {q.dtype} tensor [B, H, L, D] = {shape_str(q.shape)} (q's dtype and shape)"
    check_tensor("k", k, what, **like_q)
    check_tensor("v", v, what, **like_q)
    if L < 1 or D < 1:
        raise UserError(f"attention: q shape: expected L >= 1 and D >= 1, got {shape_str(q.shape)}")
    on_q = dict(device=q.device, device_of="q", optional=True, **op)
    check_tensor("seqlens", seqlens, f"an integer tensor [B] = [{dim_str(B)}] of row lengths", dtypes=INT, shape=(B,),
                 **on_q)
    check_tensor("key_padding_mask", key_padding_mask, f"a bool or integer tensor [B, L] = {shape_str((B, L))}, "
                 "True = keep", dtypes=INT_OR_BOOL, shape=(B, L), **on_q)
    if not isinstance(dropout_p, numbers.Real) or not (0.0 <= dropout_p < 1.0):
        raise UserError(f"attention: dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, numbers.Real) and softmax_scale > 0.0):
        raise UserError(f"attention: softmax_scale: expected a float > 0 (or None: 1 / sqrt(D)), got "
                        f"{softmax_scale!r}")


def _use_kernel(q: torch.Tensor) -> bool:
    if not _TRITON_FOUND or q.dtype not in _KERNEL_DTYPES or q.shape[-1] > _KERNEL_MAX_HEAD_DIM:
        return False
    return q.device.type == "cuda" or (q.device.type == "cpu" and _INTERPRET)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, seqlens: Optional[torch.Tensor] = None,
              key_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              softmax_scale: Optional[float] = None, seed=None) -> torch.Tensor:
    """Bidirectional attention softmax(q k^T * scale) v over kept keys; q, k, v, out [B, H, L, D].

    seqlens [B] int: keys at or past seqlens[b] are masked and those query rows return 0.
    key_padding_mask [B, L] bool (True = keep): any pattern. dropout_p: attention-weight dropout (training only).
    seed: int, int64 tensor or None (see the module docstring). Runs the Triton kernel when it can (see
    `mlmfast.dispatch.status("attention")`), else `attention_reference`; head dims > 128 always use the reference.
    """
    _check(q, k, v, seqlens, key_padding_mask, dropout_p, softmax_scale)
    if _use_kernel(q):
        from mlmfast.kernels.attention import attention_kernel

        return attention_kernel(q, k, v, seqlens=seqlens, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                softmax_scale=softmax_scale, seed=seed)
    mask = None
    if dropout_p > 0.0:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=q.device)
            gen.manual_seed(int(seed) % 2**64)
        B, H, L, _ = q.shape
        mask = torch.rand((B, H, L, L), generator=gen, device=q.device) >= dropout_p
    return attention_reference(q, k, v, seqlens=seqlens, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                               softmax_scale=softmax_scale, dropout_mask=mask)


def _probe() -> Optional[str]:
    if not _TRITON_FOUND:
        return "triton is not installed"
    if _INTERPRET:
        return None  # CPU tensors run under Triton's interpreter (slow; for tests)
    if not torch.cuda.is_available():
        return "no CUDA device (and TRITON_INTERPRET is not 1)"
    return None


dispatch.register("attention", "Triton FlashAttention-2-style kernel (kernels/attention.py)",
                  "PyTorch matmul + softmax (attention_reference; the fast training step on a CPU uses SDPA "
                  "instead)", _probe)


class _CallableModule(types.ModuleType):
    """`import mlmfast.attention` binds the package attribute `mlmfast.attention` to this module, shadowing the
    function of the same name; making the module callable keeps `mlmfast.attention(q, k, v, ...)` working in
    every import order. Inside torch.compile'd code, import the function: `from mlmfast.attention import attention`.
    """

    def __call__(self, *args, **kwargs):
        return attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
