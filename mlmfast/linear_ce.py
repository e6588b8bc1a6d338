"""Linear + cross-entropy without a [rows, vocab] fp32 logits tensor: the MLM decoder and its loss in one op.

    loss = sum_i live_i * CE(x_i W^T + b, y_i) / max(count, 1)     (reduction="mean"; "sum" drops the division)

live_i: label y_i != ignore_index and i < num_active (when given). count = number of live rows, kept on the device
(no .item()). Gradients flow to x, the weight (in the MLM head: the tied word embeddings) and the bias.

Two implementations with one contract, behind the torch custom ops `mlmfast::linear_ce_fwd` / `linear_ce_bwd`
(fake implementations + autograd, so torch.compile(fullgraph=True) traces through them):
  * Triton kernels (`mlmfast.kernels.linear_ce`): logits tile by tile with an online logsumexp; the backward
    recomputes them per row chunk. Used for CUDA tensors when triton is installed (backend "auto" or "kernel"),
    and for CPU tensors only with backend="kernel" under TRITON_INTERPRET=1 (tests).
  * The chunked PyTorch twin (`linear_ce_forward_torch` / `linear_ce_backward_torch`): the same math, rows in
    chunks of `chunk_rows` (at most ~64 MB of fp32 logits at a time), the backward recomputing the chunk's
    logits. Used everywhere else: CPU training, and the oracle beside the plain F.cross_entropy reference.

`num_active` ([1] or [] int64 tensor): rows at or past it are ignored. The sparse MLM head puts the predicted
rows first in a static-capacity buffer and passes their number here, so the kernels skip the empty tail
without a host sync. Labels of live rows must be in [0, V) or ignore_index: checked exactly for CPU tensors
(UserError), and as an asynchronous device assert for CUDA tensors (no host sync). With no live row the loss is
0 with zero gradients.
Mixed dtypes are promoted (under autocast: cast to the autocast dtype), so x, weight and bias share a dtype.
"""
from __future__ import annotations

import importlib.util
import numbers
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import FLOAT, INT, check_range, check_tensor, describe, dim_str
from .errors import UserError

IGNORE_INDEX = -100
BACKENDS = ("auto", "kernel", "torch")
TORCH_CHUNK_BYTES = 64 * 1024 * 1024  # fp32 logits per chunk of the PyTorch twin

_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- the PyTorch twin --------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 for 16-bit / fp32 inputs, fp64 for fp64 (oracle)


def torch_chunk_rows(vocab: int, chunk_rows: Optional[int] = None) -> int:
    if chunk_rows is not None and chunk_rows > 0:
        return int(chunk_rows)
    return max(1, TORCH_CHUNK_BYTES // (4 * max(1, vocab)))


def _live(labels: torch.Tensor, n_act: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    live = labels != ignore_index
    if n_act is not None:
        live = live & (torch.arange(labels.shape[0], device=labels.device) < n_act.reshape(()))
    return live


def linear_ce_forward_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            labels: torch.Tensor, n_act: Optional[torch.Tensor], ignore_index: int, mean: bool,
                            chunk_rows: Optional[int] = None, with_grad: bool = False):
    """Chunked PyTorch forward: (loss [], lse [N] (0 on ignored rows), count [] int64, dx, dW, db).

    Logits of one chunk of rows at a time, computed in the input dtype (as a plain linear under autocast) and
    reduced in fp32 (fp64). with_grad: also the gradients for d out / d loss = 1 (dx [N, H] in x's dtype, dW and
    db in fp32 / fp64), from the chunk's logits while they exist: three matmuls per chunk instead of the four of
    a recomputing backward (the CPU training path). Without with_grad dx, dW, db are None."""
    N, H = x.shape
    V = weight.shape[0]
    acc = _acc_dtype(x.dtype)
    live = _live(labels, n_act, ignore_index)  # [N]
    count = live.sum()
    lse = torch.zeros((N,), dtype=acc, device=x.device)
    total = torch.zeros((), dtype=acc, device=x.device)
    dx = dw = db = None
    if with_grad:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)  # every row is written below
        db = torch.zeros((V,), dtype=acc, device=x.device) if bias is not None else None
        scale = 1.0 / count.clamp(min=1).to(acc) if mean else torch.ones((), dtype=acc, device=x.device)
    C = torch_chunk_rows(V, chunk_rows)
    for r0 in range(0, N, C):
        sl = slice(r0, min(N, r0 + C))
        z = F.linear(x[sl], weight, bias).to(acc)  # (c, V)
        logp = torch.log_softmax(z, dim=1)  # (c, V), one fused pass
        lse_c = z[:, 0] - logp[:, 0]  # (c,) logsumexp
        lab = labels[sl].clamp(0, V - 1)[:, None]  # (c, 1)
        lv = live[sl]
        total = total - torch.where(lv, logp.gather(1, lab)[:, 0], 0.0).sum()
        lse[sl] = torch.where(lv, lse_c, 0.0)
        del z
        if with_grad:  # g = scale * live * (softmax - onehot), in place of log-probabilities
            w_row = lv.to(acc) * scale  # (c,)
            g = logp.exp_()
            g.scatter_add_(1, lab, -torch.ones_like(w_row)[:, None])
            g = g.mul_(w_row[:, None]).to(x.dtype)
            dx[sl] = g @ weight
            part = g.t() @ x[sl]  # (V, H)
            dw = part.to(acc) if dw is None else dw.add_(part.to(acc))
            if db is not None:
                db += g.to(acc).sum(dim=0)
    if with_grad and dw is None:  # no rows at all
        dw = torch.zeros((V, H), dtype=acc, device=x.device)
    loss = total / count.clamp(min=1) if mean else total
    return loss, lse, count, dx, dw, db


def linear_ce_backward_torch(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             labels: torch.Tensor, n_act: Optional[torch.Tensor], lse: torch.Tensor,
                             count: torch.Tensor, ignore_index: int, mean: bool, chunk_rows: Optional[int] = None
                             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Chunked PyTorch backward: recompute the chunk's logits, g = s (softmax - onehot) on live rows,
    dx = g W, dW += g^T x, db += colsum(g) (dW, db accumulated in fp32 / fp64)."""
    N, H = x.shape
    V = weight.shape[0]
    acc = _acc_dtype(x.dtype)
    live = _live(labels, n_act, ignore_index)
    scale = grad.to(acc)
    if mean:
        scale = scale / count.clamp(min=1)
    dx = torch.zeros_like(x)
    dw = torch.zeros((V, H), dtype=acc, device=x.device)
    db = torch.zeros((V,), dtype=acc, device=x.device) if bias is not None else None
    C = torch_chunk_rows(V, chunk_rows)
    for r0 in range(0, N, C):
        sl = slice(r0, min(N, r0 + C))
        z = F.linear(x[sl], weight, bias).to(acc)  # (c, V)
        g = torch.exp(z - lse[sl, None])  # softmax (c, V)
        lv = live[sl].to(acc)
        g.scatter_add_(1, labels[sl].clamp(0, V - 1)[:, None], -lv[:, None])
        g = g * (lv * scale)[:, None]
        g_in = g.to(x.dtype)
        dx[sl] = g_in @ weight.to(x.dtype)
        if g_in.dtype == acc:
            dw.addmm_(g_in.t(), x[sl])
        else:
            dw += (g_in.t() @ x[sl]).to(acc)
        if db is not None:
            db += g_in.to(acc).sum(dim=0)
    return dx, dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


# ---- custom ops ------------------------------------------------------------------------------------------
def _kernel_module():
    from mlmfast.kernels import linear_ce as K  # noqa: PLC0415

    return K


def _n_act_tensor(n_act: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    if n_act is None:
        return torch.full((1,), n, dtype=torch.int64, device=device)
    return n_act.reshape(1).to(device=device, dtype=torch.int64)


@torch.library.custom_op("mlmfast::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                      n_act: Optional[torch.Tensor], ignore_index: int, mean: bool, kernel: bool,
                      chunk_rows: int, grad_in_forward: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, count, dx, dW, db); the last three are gradients for d out / d loss = 1 when grad_in_forward
    (the twin only), else empty. A custom op cannot return None: "no tensor" is an empty (0,) tensor."""
    empty = x.new_empty((0,))
    if kernel:
        loss, lse, count = _kernel_module().linear_ce_forward(x, weight, bias, labels,
                                                              _n_act_tensor(n_act, x.shape[0], x.device),
                                                              ignore_index, mean)
        return loss, lse, count, empty, empty.clone(), empty.clone()
    loss, lse, count, dx, dw, db = linear_ce_forward_torch(x, weight, bias, labels, n_act, ignore_index, mean,
                                                           chunk_rows or None, grad_in_forward)
    return (loss, lse, count, empty if dx is None else dx, empty.clone() if dw is None else dw,
            empty.clone() if db is None else db)


@_linear_ce_fwd_op.register_fake
def _(x, weight, bias, labels, n_act, ignore_index, mean, kernel, chunk_rows, grad_in_forward):
    acc = _acc_dtype(x.dtype)
    out = (x.new_empty((), dtype=acc), x.new_empty((x.shape[0],), dtype=acc), x.new_empty((), dtype=torch.int64))
    if grad_in_forward and not kernel:
        db = x.new_empty((weight.shape[0],), dtype=acc) if bias is not None else x.new_empty((0,))
        return (*out, torch.empty_like(x, memory_format=torch.contiguous_format),
                x.new_empty(tuple(weight.shape), dtype=acc), db)
    return (*out, x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,)))


@torch.library.custom_op("mlmfast::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      labels: torch.Tensor, n_act: Optional[torch.Tensor], lse: torch.Tensor, count: torch.Tensor,
                      ignore_index: int, mean: bool, kernel: bool,
                      chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernel:
        dx, dw, db = _kernel_module().linear_ce_backward(grad, x, weight, bias, labels,
                                                         _n_act_tensor(n_act, x.shape[0], x.device), lse, count,
                                                         ignore_index, mean, chunk_rows or None)
    else:
        dx, dw, db = linear_ce_backward_torch(grad, x, weight, bias, labels, n_act, lse, count, ignore_index, mean,
                                              chunk_rows or None)
    return dx, dw, (db if db is not None else weight.new_empty((0,)))  # a custom op cannot return None


@_linear_ce_bwd_op.register_fake
def _(grad, x, weight, bias, labels, n_act, lse, count, ignore_index, mean, kernel, chunk_rows):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, labels, n_act, ignore_index, mean, kernel, chunk_rows, grad_in_forward = inputs
    _, lse, count, dx, dw, db = output
    ctx.grad_in_forward = grad_in_forward and not kernel
    ctx.has_bias = bias is not None
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    if ctx.grad_in_forward:
        ctx.save_for_backward(dx, dw, db)
    else:
        ctx.save_for_backward(x, weight, bias, labels, n_act, lse, count)
    ctx.args = (ignore_index, mean, kernel, chunk_rows)
    ctx.mark_non_differentiable(lse, count, dx, dw, db)
    ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" for each of those outputs: a (V, H) memset


def _is_one(grad: torch.Tensor) -> bool:
    """grad == 1 (the usual loss.backward()), checked only where it costs nothing: a CPU tensor in eager mode.
    (torch 2.11 traces the backward under AOT autograd with is_compiling() False: a fake tensor says so.)"""
    return (grad.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch._guards.detect_fake_mode([grad]) is None and bool(grad == 1))


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None, None, None
    if ctx.grad_in_forward:  # the twin computed d loss / d inputs in the forward: scale by d out / d loss
        dx, dw, db = ctx.saved_tensors
        x_dt, w_dt, b_dt = ctx.dtypes
        if not _is_one(grad_loss):
            g = grad_loss.to(dw.dtype)
            dx, dw, db = dx * g.to(dx.dtype), dw * g, db * g
        dw = dw.to(w_dt)
        db = db.to(b_dt) if ctx.has_bias else None
    else:
        x, weight, bias, labels, n_act, lse, count = ctx.saved_tensors
        ignore_index, mean, kernel, chunk_rows = ctx.args
        dx, dw, db = _linear_ce_bwd_op(grad_loss, x, weight, bias, labels, n_act, lse, count, ignore_index, mean,
                                       kernel, chunk_rows)
        db = db if ctx.has_bias else None
    return dx, dw, db, None, None, None, None, None, None, None


_linear_ce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- dispatch and the public function -------------------------------------------------------------------
def use_kernel(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `linear_cross_entropy` runs the Triton kernels for x under `backend` (see the module docstring)."""
    if backend not in BACKENDS:
        raise UserError(f"backend={backend!r} is not known; use one of {BACKENDS}")
    if backend == "torch":
        return False
    ok_dtype = x.dtype in _KERNEL_DTYPES
    if backend == "auto":
        return _TRITON_FOUND and ok_dtype and x.device.type == "cuda"
    # backend == "kernel": demanded; say why it cannot run
    if not _TRITON_FOUND:
        raise UserError("linear_cross_entropy(backend='kernel'): triton is not installed; use backend='auto'")
    if not ok_dtype:
        raise UserError(f"linear_cross_entropy(backend='kernel'): dtype {x.dtype} is not supported by the kernel "
                        "(float16, bfloat16, float32); use backend='auto'")
    if x.device.type == "cpu" and not _interpret():
        raise UserError("linear_cross_entropy(backend='kernel') on CPU tensors needs TRITON_INTERPRET=1 set before "
                        "triton is imported; use backend='auto' (the chunked PyTorch twin) on CPU")
    if x.device.type not in ("cuda", "cpu"):
        raise UserError(f"linear_cross_entropy(backend='kernel'): device {x.device} is not supported")
    return True


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                         *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         num_active: Optional[torch.Tensor] = None, backend: str = "auto",
                         chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of the logits x @ weight.T + bias against labels, without materialising them for all rows.

    x (N, H) float, weight (V, H), bias (V,) or None, labels (N,) int (ignore_index = not predicted).
    reduction "mean" (over the live rows; 0 when there are none) or "sum". num_active: int64 tensor with one
    element, rows >= it are ignored (see the module docstring). backend "auto" | "kernel" | "torch".
    chunk_rows: rows per chunk (the twin's, or the kernel backward's dlogits scratch); None = by memory budget.
    Returns a 0-d fp32 tensor (fp64 for fp64 inputs).
    """
    op = dict(op="linear_cross_entropy")
    check_tensor("x", x, "a 2-D float tensor [N, H] (rows, hidden)", dtypes=FLOAT, shape=(None, None), **op)
    N, H = x.shape
    on_x = dict(device=x.device, device_of="x", **op)
    check_tensor("weight", weight, f"a float tensor [V, H] with H = {dim_str(H)} (x's hidden size)", dtypes=FLOAT,
                 shape=(None, H), **on_x)
    V = weight.shape[0]
    check_tensor("bias", bias, f"a float tensor [V] = [{dim_str(V)}] or None", dtypes=FLOAT, shape=(V,), optional=True,
                 **on_x)
    check_tensor("labels", labels, f"an integer tensor [N] = [{dim_str(N)}] (ignore_index = not predicted)", dtypes=INT,
                 shape=(N,), **on_x)
    if reduction not in ("mean", "sum"):
        raise UserError(f"linear_cross_entropy: reduction={reduction!r}; use 'mean' or 'sum'")
    check_tensor("num_active", num_active, "an integer tensor [1] or [] (rows at or past it are ignored)",
                 dtypes=INT, optional=True, **on_x)
    if num_active is not None and num_active.numel() != 1:
        raise UserError(f"linear_cross_entropy: num_active shape: expected an integer tensor [1] or [], got "
                        f"{describe(num_active)}")
    if not isinstance(ignore_index, numbers.Integral):
        raise UserError(f"linear_cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    live = None if num_active is None else torch.arange(N, device=x.device) < num_active.reshape(())
    check_range("labels", labels, 0, V, what="label", hi_name="vocab size", ignore=int(ignore_index),
                where=live, **op)  # CPU: exact; CUDA: an async device assert (no sync)
    # One compute dtype: the autocast dtype when autocast is on for this device, else the promoted dtype.
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
        if bias is not None:
            dtype = torch.promote_types(dtype, bias.dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    labels = labels.to(torch.int64)
    kernel = use_kernel(x, backend)
    # The twin computes the gradients while it holds each chunk's logits (3 matmuls instead of 4), when they
    # will be needed; the kernels recompute them in the backward (nothing but lse is kept).
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    loss = _linear_ce_fwd_op(x, weight, bias, labels, num_active, int(ignore_index), reduction == "mean",
                             kernel, int(chunk_rows or 0), needs_grad and not kernel)[0]
    return loss


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                   labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                                   reduction: str = "mean") -> torch.Tensor:
    """The plain definition (full logits): the test oracle (in fp64) and the reference path's loss."""
    z = F.linear(x, weight, bias)
    acc = _acc_dtype(z.dtype)
    total = F.cross_entropy(z.to(acc), labels.long(), ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


def _probe() -> Optional[str]:
    if not _TRITON_FOUND:
        return "triton is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (CPU runs the chunked PyTorch twin; the kernel runs on CPU only with backend='kernel' " \
               "under TRITON_INTERPRET=1)"
    return None


dispatch.register("linear_ce", "Triton fused linear + cross-entropy (kernels/linear_ce.py)",
                  "chunked PyTorch twin (linear_ce.linear_ce_forward_torch)", _probe)
