"""Fused linear + cross-entropy in Triton for the sparse MLM head: loss = CE(x W^T + b, labels), no [N, V] logits.

Layers, each readable alone:
  1. `@triton.jit` kernels: `_lce_fwd_kernel` (logits tile by tile, online logsumexp, target logit),
     `_lce_bwd_dlogits_kernel` (recomputes a logits tile, writes dlogits for one chunk of rows),
     `_lce_bwd_dx_kernel` (dx = dlogits W) and `_lce_bwd_dw_kernel` (dW += dlogits^T x); db is the sum of
     the dlogits kernel's per-tile column sums.
  2. Host launchers `linear_ce_forward` / `linear_ce_backward`: allocate, pick block sizes, launch, and the tiny
     combine of the forward's per-split partial results (PyTorch, O(N)).
The custom ops, autograd and the chunked-PyTorch twin live in `mlmfast/linear_ce.py` (the public entry point).

Conventions:
  * x [N, H] (rows of the MLM head after its transform), W [V, H] (the decoder = the tied word embeddings),
    b [V] or None, labels [N] int64 (ignore_index = not predicted). Unit stride on H; any row strides.
  * NACT [1] int64: rows >= NACT[0] are ignored whatever their label. The caller puts the predicted rows first
    (a static-capacity compaction) so that work past the live rows is skipped without a host sync: a program
    whose rows are all ignored runs no loop iteration, and the backward loops stop at NACT.
  * Loss = sum over live rows (label != ignore_index and row < NACT) of lse_i - logit_i[label_i], divided by
    their number `count` (mean) or not (sum). count stays on the device.
  * fp32 accumulation everywhere; fp32 inputs use true fp32 dots ("ieee"), 16-bit inputs use tensor cores.
    dlogits are rounded to the input dtype before the dx / dW products (as autocast does for a plain linear).
  * Deterministic: no atomics; every output element is written by one program in a fixed loop order; dW is
    accumulated across row chunks in fp32 in a fixed order.
  * No device-to-host synchronisation.

Math (row i, z_i = x_i W^T + b, live_i = row is live, s = grad_out / max(count, 1) for the mean):
    forward, over vocabulary tiles:  m = max(m, rowmax(z));  S = S e^(m_old - m) + rowsum(e^(z - m));  t += z[y_i]
    (per vocabulary split; the splits are merged on the host: lse = M + log sum_s S_s e^(m_s - M))
    loss_i = lse_i - t_i
    backward:  g_iv = s live_i (e^(z_iv - lse_i) - [v == y_i])   dx = g W,   dW = g^T x,   db = colsum(g)

This module imports triton at import time; `mlmfast.linear_ce` imports it only when the kernel path is taken.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import cdiv, device_arch, on_device

# Fill outputs with NaN before the kernels write them (tests switch it on; MLMFAST_POISON=1 for debugging).
POISON_OUTPUTS = os.environ.get("MLMFAST_POISON", "0") == "1"

# dlogits scratch budget per row chunk of the backward (bytes); a chunk holds at least one BLOCK_M of rows.
DLOGITS_CHUNK_BYTES = 256 * 1024 * 1024


# =====================================================================================================
# 1. Kernels
# =====================================================================================================


@triton.jit
def _live_rows(
    LABELS,  # [N] int64 labels
    offs_m,  # [BLOCK_M] row indices
    n_live,  # rows >= n_live are ignored (min(NACT, N))
    IGNORE,  # ignore index
):
    # (label [BLOCK_M] int64, live [BLOCK_M] bool): a row is live when it is < n_live and not ignored.
    in_range = offs_m < n_live
    label = tl.load(LABELS + offs_m, mask=in_range, other=IGNORE)
    return label, in_range & (label != IGNORE)


@triton.jit
def _logits_tile(
    X, W, BIAS,  # [N, H], [V, H], [V] pointers
    offs_m, rows_ok,  # [BLOCK_M] row indices, rows to read (others read as 0)
    offs_v, v_ok,  # [BLOCK_V] vocabulary indices, columns to read
    stride_xn, stride_wv,  # row strides of X and W (elements)
    H,  # hidden size (the reduction length)
    k_stop,  # H, or 0 to skip the reduction (a tile without live rows)
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # z = x[offs_m] W[offs_v]^T (+ b[offs_v]) as a [BLOCK_M, BLOCK_V] fp32 tile.
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xn
    w_rows = W + offs_v.to(tl.int64)[:, None] * stride_wv
    for k0 in range(0, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        x = tl.load(x_rows + offs_k[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_rows + offs_k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)  # [BV, BK]
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lce_fwd_kernel(
    X,  # [N, H] head rows
    W,  # [V, H] decoder weight
    BIAS,  # [V] decoder bias (read only when HAS_BIAS)
    LABELS,  # [N] int64 targets
    NACT,  # [1] int64: rows >= NACT[0] are ignored
    M_OUT, S_OUT, T_OUT,  # [SPLITS, N] fp32: per split, running max m, sum of e^(z - m), target logit (0 if absent)
    stride_xn, stride_wv,  # row strides of X and W
    N, V, H,  # rows, vocabulary size, hidden size
    V_PER_SPLIT,  # vocabulary columns per split (a multiple of BLOCK_V)
    IGNORE,  # ignore index
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # 1. The program owns rows [pid_m * BLOCK_M, +BLOCK_M) and the vocabulary split [v_lo, v_hi).
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_live = tl.minimum(tl.load(NACT), N)
    label, live = _live_rows(LABELS, offs_m, n_live, IGNORE)
    rows_ok = offs_m < n_live
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    # 2. A block without a live row visits no vocabulary tile.
    any_live = tl.max(live.to(tl.int32), 0) > 0
    v_stop = tl.where(any_live, v_hi, v_lo)
    # 3. Online logsumexp over the split's tiles (m starts finite, so e^(m_old - m) is 0, never NaN).
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(v_lo, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_hi
        z = _logits_tile(X, W, BIAS, offs_m, rows_ok, offs_v, v_ok, stride_xn, stride_wv, H, H,
                         BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_PREC)  # [BM, BV] fp32
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        t_i += tl.sum(tl.where(offs_v[None, :] == label[:, None], z, 0.0), 1)
        m_i = m_new
    # 4. Partial results of this split; the host merges the splits.
    out = pid_s.to(tl.int64) * N + offs_m
    ok = offs_m < N
    tl.store(M_OUT + out, m_i, mask=ok)
    tl.store(S_OUT + out, s_i, mask=ok)
    tl.store(T_OUT + out, t_i, mask=ok)


@triton.jit
def _lce_bwd_dlogits_kernel(
    X, W, BIAS,  # [N, H], [V, H], [V]
    LABELS,  # [N] int64 targets
    NACT,  # [1] int64: rows >= NACT[0] are ignored
    LSE,  # [N] fp32 logsumexp from the forward (0 on ignored rows)
    SCALE,  # [1] fp32: d loss / d loss_i of a live row (grad_out / count for the mean)
    DLOG,  # [C, VP] output, input dtype: dlogits of rows [row0, row0 + C); columns >= V are 0
    DB_PART,  # [cdiv(C, BLOCK_M), V] fp32 output: column sums of this program's dlogits tile (for db)
    stride_xn, stride_wv, stride_dn,  # row strides of X, W, DLOG
    row0, C,  # first row and number of rows of this chunk
    N, V, H, IGNORE,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # 1. The program owns chunk rows [pid_m * BLOCK_M, +BLOCK_M) and vocabulary tile pid_v.
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_live = tl.minimum(tl.load(NACT), N)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = row0 + local
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    # 2. Rows at or past n_live are never read by the dx / dW kernels: only a zero partial column sum.
    if row0 + pid_m * BLOCK_M >= n_live:
        if HAS_BIAS:
            tl.store(DB_PART + pid_m.to(tl.int64) * V + offs_v, tl.zeros([BLOCK_V], dtype=tl.float32), mask=v_ok)
    else:
        label, live = _live_rows(LABELS, offs_m, n_live, IGNORE)
        rows_ok = offs_m < n_live
        any_live = tl.max(live.to(tl.int32), 0) > 0
        k_stop = tl.where(any_live, H, 0)  # a tile of ignored rows only writes zeros
        # 3. Recompute the logits tile, then g = s (softmax - onehot) on live rows, 0 elsewhere.
        z = _logits_tile(X, W, BIAS, offs_m, rows_ok, offs_v, v_ok, stride_xn, stride_wv, H, k_stop,
                         BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_PREC)
        lse = tl.load(LSE + offs_m, mask=live, other=0.0)
        scale = tl.load(SCALE)
        p = tl.exp(z - lse[:, None])
        g = (p - tl.where(offs_v[None, :] == label[:, None], 1.0, 0.0)) * scale
        g = tl.where(live[:, None] & v_ok[None, :], g, 0.0).to(DLOG.dtype.element_ty)  # 0 in the padding
        ptrs = DLOG + local.to(tl.int64)[:, None] * stride_dn + offs_v[None, :]
        tl.store(ptrs, g, mask=((local < C) & (offs_m < N))[:, None])  # whole tiles: VP = the tiles' end
        if HAS_BIAS:  # 4. db partial: this tile's column sums (the host adds the row tiles in order)
            tl.store(DB_PART + pid_m.to(tl.int64) * V + offs_v, tl.sum(g.to(tl.float32), 0), mask=v_ok)


@triton.jit
def _lce_bwd_dx_kernel(
    DLOG,  # [C, V] dlogits of rows [row0, row0 + C)
    W,  # [V, H] decoder weight
    DX,  # [N, H] output (input dtype): rows [row0, row0 + C) are written, 0 past the live rows
    NACT,  # [1] int64: rows >= NACT[0] are ignored
    stride_dn, stride_wv, stride_dxn,  # row strides of DLOG, W, DX
    row0, C, N, V, H,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,  # rows, hidden columns, reduction step
    DOT_PREC: tl.constexpr,
):
    # dx[rows, h-tile] = sum over the vocabulary of dlogits[rows, v] W[v, h-tile]
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_loc = tl.minimum(tl.maximum(tl.minimum(tl.load(NACT), N) - row0, 0), C)  # live rows in this chunk
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    rows_ok = local < n_loc
    v_stop = tl.where(pid_m * BLOCK_M < n_loc, V, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for v0 in range(0, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        g = tl.load(DLOG + local.to(tl.int64)[:, None] * stride_dn + offs_v[None, :],
                    mask=rows_ok[:, None], other=0.0)  # [BM, BV]; columns < VP, zero past V
        w = tl.load(W + offs_v.to(tl.int64)[:, None] * stride_wv + offs_h[None, :],
                    mask=v_ok[:, None] & h_ok[None, :], other=0.0)  # [BV, BH]
        acc = tl.dot(g, w, acc, input_precision=DOT_PREC)
    rows = row0 + local
    tl.store(DX + rows.to(tl.int64)[:, None] * stride_dxn + offs_h[None, :], acc.to(DX.dtype.element_ty),
             mask=((local < C) & (rows < N))[:, None] & h_ok[None, :])


@triton.jit
def _lce_bwd_dw_kernel(
    DLOG,  # [C, V] dlogits of rows [row0, row0 + C)
    X,  # [N, H] head rows
    DW,  # [V, H] fp32 accumulator (contiguous)
    NACT,  # [1] int64: rows >= NACT[0] are ignored
    stride_dn, stride_xn,  # row strides of DLOG and X
    row0, C, N, V, H,
    ACCUMULATE: tl.constexpr,  # add to DW (a later chunk) instead of overwriting it (the first chunk)
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,  # vocab rows, hidden cols, reduction step
    DOT_PREC: tl.constexpr,
):
    # dW[v-tile, h-tile] (+)= sum over live rows r of dlogits[r, v] x[r, h]
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_loc = tl.minimum(tl.maximum(tl.minimum(tl.load(NACT), N) - row0, 0), C)
    if (n_loc > 0) | (not ACCUMULATE):  # a later chunk without live rows leaves the accumulator as it is
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        v_ok = offs_v < V
        h_ok = offs_h < H
        dw_ptrs = DW + offs_v.to(tl.int64)[:, None] * H + offs_h[None, :]
        if ACCUMULATE:
            acc = tl.load(dw_ptrs, mask=v_ok[:, None] & h_ok[None, :], other=0.0)
        else:
            acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
        for r0 in range(0, n_loc, BLOCK_M):
            local = r0 + tl.arange(0, BLOCK_M)
            r_ok = local < n_loc
            g = tl.load(DLOG + local.to(tl.int64)[:, None] * stride_dn + offs_v[None, :],
                        mask=r_ok[:, None], other=0.0)  # [BM, BV]; columns < VP
            x = tl.load(X + (row0 + local).to(tl.int64)[:, None] * stride_xn + offs_h[None, :],
                        mask=r_ok[:, None] & h_ok[None, :], other=0.0)  # [BM, BH]
            acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PREC)
        tl.store(dw_ptrs, acc, mask=v_ok[:, None] & h_ok[None, :])


# =====================================================================================================
# 2. Host launchers
# =====================================================================================================


@dataclass(frozen=True)
class KernelConfig:
    block_a: int  # rows of the output tile (fwd / dlogits / dx: head rows; dw: vocabulary rows)
    block_b: int  # columns of the output tile (fwd / dlogits: vocabulary; dx / dw: hidden)
    block_k: int  # reduction step (fwd / dlogits: hidden; dx: vocabulary; dw: head rows)
    num_warps: int
    num_stages: int


# (kernel, 16-bit inputs?, arch major >= 9) -> config. Chosen so that nothing spills on sm_80 / sm_90 with
# triton 3.9 and 3.6 (`python -m mlmfast.kernels.compile_check`); tune on a GPU. fp32 runs true fp32 dots (no
# tensor cores).
_CONFIGS: dict[tuple[str, bool, bool], KernelConfig] = {}
KINDS = ("fwd", "dlogits", "dx", "dw")


def _fill_configs() -> None:
    for hopper in (False, True):
        stages = 3 if hopper else 2
        for kind in ("fwd", "dlogits", "dx"):
            _CONFIGS[kind, True, hopper] = KernelConfig(128, 128, 64, 8, stages)
            _CONFIGS[kind, False, hopper] = KernelConfig(64, 64, 32, 4, 2)
        _CONFIGS["dw", True, hopper] = KernelConfig(128, 64, 64, 8, 3)  # 128 x 128 spills (fp32 acc + A^T)
        # sm_90 fp32: 4 warps spill under triton 3.9 (capped at 168 registers) since the dlogits operand has no
        # V mask (padded rows); 8 warps: 121 registers (3.9), 156 (3.6), no spill
        _CONFIGS["dw", False, hopper] = KernelConfig(64, 64, 32, 8, 2) if hopper else KernelConfig(32, 32, 32, 4, 1)
    # sm_80 fp32: 4 warps spill; so does BLOCK_K 32 with triton 3.6 (the GPU image's; it stops at 128 registers)
    _CONFIGS["fwd", False, False] = KernelConfig(64, 64, 16, 8, 2)


_fill_configs()


def kernel_config(kind: str, dtype: torch.dtype, arch: int = 90) -> KernelConfig:
    """Launch configuration of kernel `kind` ("fwd", "dlogits", "dx", "dw") for an input dtype and arch."""
    return _CONFIGS[kind, dtype != torch.float32, arch >= 90]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee"  # fp32 inputs are computed in true fp32; 16-bit inputs are unaffected


def _poison(*tensors: torch.Tensor) -> None:
    if POISON_OUTPUTS:
        for t in tensors:
            t.fill_(float("nan"))


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def num_splits(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, splits: Optional[int] = None) -> int:
    """Vocabulary splits of the forward: enough programs to fill the GPU (about 2 per SM), at most one tile each."""
    cfg = kernel_config("fwd", dtype, device_arch(device))
    tiles = cdiv(vocab, cfg.block_b)
    if splits is None:
        splits = cdiv(2 * _num_sms(device), max(1, cdiv(n_rows, cfg.block_a)))
    return max(1, min(int(splits), tiles))


def linear_ce_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                      n_act: torch.Tensor, ignore_index: int, mean: bool,
                      splits: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. x [N, H], weight [V, H], bias [V] or None (all one dtype), labels [N] int64,
    n_act [1] int64. Returns (loss [] fp32, lse [N] fp32 (0 on ignored rows), count [] int64)."""
    N, H = x.shape
    V = weight.shape[0]
    x, weight = _rows_ready(x), _rows_ready(weight)
    labels = labels.contiguous()
    rows = torch.arange(N, device=x.device)
    live = (labels != ignore_index) & (rows < n_act)  # [N]
    count = live.sum()
    if N == 0:
        return x.new_zeros((), dtype=torch.float32), x.new_zeros((0,), dtype=torch.float32), count
    cfg = kernel_config("fwd", x.dtype, device_arch(x.device))
    S = num_splits(N, V, x.dtype, x.device, splits)
    v_per_split = cdiv(cdiv(V, S), cfg.block_b) * cfg.block_b
    S = cdiv(V, v_per_split)
    m = torch.empty((S, N), dtype=torch.float32, device=x.device)
    s = torch.empty_like(m)
    t = torch.empty_like(m)
    _poison(m, s, t)
    grid = (cdiv(N, cfg.block_a), S)
    with on_device(x.device):
        _lce_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, labels, n_act, m, s, t,
            x.stride(0), weight.stride(0), N, V, H, v_per_split, ignore_index,
            BLOCK_M=cfg.block_a, BLOCK_V=cfg.block_b, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None,
            DOT_PREC=_dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # Merge the splits: lse = M + log sum_s S_s e^(m_s - M). Ignored rows have m = -1e30, S = 0 everywhere.
    M = m.amax(dim=0)  # [N]
    lse = M + torch.log((s * torch.exp(m - M)).sum(dim=0))  # [N]; -inf on skipped rows
    loss_rows = torch.where(live, lse - t.sum(dim=0), 0.0)
    loss = loss_rows.sum()
    if mean:
        loss = loss / count.clamp(min=1)
    return loss, torch.where(live, lse, 0.0), count


def backward_chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, chunk_rows: Optional[int] = None,
                        arch: int = 90) -> int:
    """Rows per backward chunk (a multiple of the dlogits kernel's row block): the dlogits scratch [chunk, V]
    stays under DLOGITS_CHUNK_BYTES unless chunk_rows says otherwise."""
    bm = kernel_config("dlogits", dtype, arch).block_a
    if chunk_rows is None:
        chunk_rows = DLOGITS_CHUNK_BYTES // max(1, vocab * torch.finfo(dtype).bits // 8)
    chunk_rows = max(bm, (int(chunk_rows) // bm) * bm)
    return max(1, min(chunk_rows, n_rows))


def linear_ce_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       labels: torch.Tensor, n_act: torch.Tensor, lse: torch.Tensor, count: torch.Tensor,
                       ignore_index: int, mean: bool, chunk_rows: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients (dx [N, H] in x's dtype, dW [V, H] and db [V] in the weight's / bias's dtype) of the forward's
    loss, given grad = d out / d loss (a 0-d tensor). Row chunks of `chunk_rows` bound the dlogits scratch."""
    N, H = x.shape
    V = weight.shape[0]
    x, weight = _rows_ready(x), _rows_ready(weight)
    labels = labels.contiguous()
    scale = grad.reshape(1).to(torch.float32)
    if mean:
        scale = scale / count.clamp(min=1)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    db = torch.zeros((V,), dtype=torch.float32, device=x.device) if bias is not None else None
    if N == 0:
        dw = torch.zeros((V, H), dtype=weight.dtype, device=x.device)
        return dx, dw, None if db is None else db.to(bias.dtype)
    arch = device_arch(x.device)
    prec = _dot_precision(x.dtype)
    c_lg, c_dx, c_dw = (kernel_config(k, x.dtype, arch) for k in ("dlogits", "dx", "dw"))
    C = backward_chunk_rows(N, V, x.dtype, chunk_rows, arch)
    dw = torch.empty((V, H), dtype=torch.float32, device=x.device)  # the first chunk overwrites it
    # dlogits rows padded to a multiple of every kernel's V block (powers of two) and of 128: the row stride is
    # then 16-byte aligned at any V (BERT's 30522, RoBERTa's 50265), so dx / dW read whole tiles with vector
    # (cp.async) loads and no V mask; the dlogits kernel writes zeros in the padding.
    pad = max(128, c_lg.block_b, c_dx.block_k, c_dw.block_a)
    dlog = torch.empty((C, cdiv(V, pad) * pad), dtype=x.dtype, device=x.device)
    db_part = torch.empty((cdiv(C, c_lg.block_a), V), dtype=torch.float32, device=x.device) \
        if bias is not None else dw
    _poison(dx, dw, dlog, db_part)
    with on_device(x.device):
        for i, row0 in enumerate(range(0, N, C)):
            c = min(C, N - row0)
            # 1. dlogits of the chunk's live rows
            _lce_bwd_dlogits_kernel[(cdiv(c, c_lg.block_a), cdiv(dlog.shape[1], c_lg.block_b))](
                x, weight, bias if bias is not None else weight, labels, n_act, lse, scale, dlog, db_part,
                x.stride(0), weight.stride(0), dlog.stride(0), row0, c, N, V, H, ignore_index,
                BLOCK_M=c_lg.block_a, BLOCK_V=c_lg.block_b, BLOCK_K=c_lg.block_k, HAS_BIAS=bias is not None,
                DOT_PREC=prec, num_warps=c_lg.num_warps, num_stages=c_lg.num_stages,
            )
            # 2. dx of the chunk's rows
            _lce_bwd_dx_kernel[(cdiv(c, c_dx.block_a), cdiv(H, c_dx.block_b))](
                dlog, weight, dx, n_act, dlog.stride(0), weight.stride(0), dx.stride(0), row0, c, N, V, H,
                BLOCK_M=c_dx.block_a, BLOCK_H=c_dx.block_b, BLOCK_V=c_dx.block_k, DOT_PREC=prec,
                num_warps=c_dx.num_warps, num_stages=c_dx.num_stages,
            )
            # 3. dW accumulated in fp32 over the chunks, in chunk order; db from the row tiles' column sums
            _lce_bwd_dw_kernel[(cdiv(V, c_dw.block_a), cdiv(H, c_dw.block_b))](
                dlog, x, dw, n_act, dlog.stride(0), x.stride(0), row0, c, N, V, H,
                ACCUMULATE=i > 0, BLOCK_V=c_dw.block_a, BLOCK_H=c_dw.block_b, BLOCK_M=c_dw.block_k, DOT_PREC=prec,
                num_warps=c_dw.num_warps, num_stages=c_dw.num_stages,
            )
            if db is not None:
                db += db_part[: cdiv(c, c_lg.block_a)].sum(dim=0)
    return dx, dw.to(weight.dtype), None if db is None else db.to(bias.dtype)
