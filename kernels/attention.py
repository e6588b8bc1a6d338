"""Fused bidirectional attention in Triton (FlashAttention-2 style): forward, backward, padding, dropout.

Layers, each readable alone:
  1. `@triton.jit` kernels: `_attn_fwd_kernel`, `_attn_bwd_preprocess_kernel`, `_attn_bwd_dkdv_kernel`,
     `_attn_bwd_dq_kernel`, and `_dropout_mask_kernel` (writes the dropout keep-mask, for tests/debugging).
  2. Host launchers `attention_forward` / `attention_backward`: validate, allocate, pick block sizes, launch.
  3. Custom ops `mlmfast::attention_fwd` / `mlmfast::attention_bwd` with fakes and autograd, so the kernels run
     in eager mode and under torch.compile (the ops are opaque to inductor).
  4. `attention_kernel(q, k, v, ...)`: the entry `mlmfast.attention` calls when the kernel path is taken.

Conventions:
  * q, k, v, out, dq, dk, dv are [B, H, L, D] views with a unit stride on D; any other strides are honoured, so
    a [B, L, H, D] tensor passed as `x.transpose(1, 2)` costs no copy. Outputs take the layout of the input
    they belong to (see `_alloc_like`): [B, L, H, D] storage in, [B, L, H, D] storage out.
  * Padding of row b is described by `bounds[b] = (lo, hi, holes)` (kept positions lie in [lo, hi)) plus, when
    a key_padding_mask is given, a per-position mask `kmask[b, j]`. A position is kept iff lo <= j < hi and
    kmask[b, j]; holes = 1 iff kmask drops a position inside [lo, hi), and only then do the fwd and dQ kernels'
    full blocks read it (a runtime branch per program; dK/dV always reads it). Blocks outside [lo, hi) are
    skipped, not just masked, and padded positions are never read (NaN there changes nothing). Padded query rows
    output exactly 0 and their LSE is +inf, which makes every recomputed probability of that row exactly 0 in
    the backward (so they send exactly 0 gradient anywhere).
  * Precision: fp32 accumulation and softmax statistics; 16-bit inputs feed P and dS to the tensor cores in the
    input dtype; fp32 inputs use TF32 dots on the GPU (see `_dot_precision`).
  * Dropout uses Philox-4x32-7 (7 rounds, as PyTorch's FlashAttention-2 dropout) keyed by a 64-bit seed. Write
    query row i = 16 a + 8 h + r and key j = 16 g + 8 k + 2 q + s (r < 8, q < 4; h, k, s in {0, 1}). The call
    with counter (((8 a + r) * cdiv(L, 16) + g) * 4 + q, b * H + h, 0, 0) returns 4 x 32 bits, cut into 8 draws
    of 16 bits (word 2 h + k, low half for s = 0): one call serves rows i and i + 8 and the keys 2 q, 2 q + 1 of
    two 8-key blocks, which are exactly the elements one thread holds in a tensor-core accumulator, so each
    thread draws its own (see `_dropout_keep`). A weight is kept iff its draw is >= round(p * 65536). The mask
    depends only on (seed, b, h, i, j, L): the backward regenerates it exactly, `dropout_mask()` returns it, and
    `dropout_mask_reference()` recomputes it in plain PyTorch (a test checks they agree).
  * Deterministic: no atomics; each output element is written by one program in a fixed loop order.
  * No device-to-host synchronisation anywhere in forward or backward.

This module imports triton at import time; `mlmfast.kernels` and `mlmfast.attention` import it only when the
kernel path is taken.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from mlmfast._checks import _compiling
from mlmfast.errors import UserError

from ._launch import cdiv, device_arch, next_power_of_2, on_device

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)  # compile-checked; any D <= 128 runs (padded to a power of 2)
MAX_HEAD_DIM = 128
MAX_SEQ_LEN = 131072  # keeps the Philox counter ((8 a + r) * cdiv(L, 16) + g) * 4 + q within 32 bits

# Fill outputs with NaN before the kernels write them, so that an unwritten element cannot pass a test.
# Tests switch it on; MLMFAST_POISON=1 switches it on for debugging.
POISON_OUTPUTS = os.environ.get("MLMFAST_POISON", "0") == "1"


# =====================================================================================================
# 1. Kernels
# =====================================================================================================
#
# Math (one (batch, head); scale = softmax_scale; kept(j) = key j is not padding; Z = keep / (1 - p_drop)):
#   s_ij = scale * q_i . k_j  over kept j                       (scores)
#   Forward, per query block, over key blocks, in base 2 (x = s * log2 e) -- the online softmax:
#     m_new = max(m, rowmax(x));  alpha = 2^(m - m_new);  P~ = 2^(x - m_new)
#     l = alpha * l + rowsum(P~);  acc = alpha * acc + (P~ * keep) V;  m = m_new
#   and at the end  O = acc / l / (1 - p_drop),  LSE = (m + log2 l) * ln 2  (natural log).
#   Backward, with P = exp(s - LSE) recomputed tile by tile:
#     dV = (P o Z)^T dO;   dP = (dO V^T) o Z;   delta_i = rowsum(O_i o dO_i)  (= sum_j P_ij dP_ij)
#     dS = P o (dP - delta);   dQ = scale * dS K;   dK = scale * dS^T Q
#   The delta kernel computes delta; the dK/dV kernel owns a key block and loops over query blocks; the dQ
#   kernel owns a query block and loops over key blocks. Neither needs atomics.


@triton.jit
def _keep(
    offs,  # [R] positions
    lo, hi,  # kept positions lie in [lo, hi)
    kmask_base,  # KMASK pointer at (b, 0)
    HAS_MASK: tl.constexpr,  # also require kmask[offs] != 0
):
    # [R] bool: position kept. The mask is read only inside [lo, hi).
    ok = (offs >= lo) & (offs < hi)
    if HAS_MASK:
        ok = ok & (tl.load(kmask_base + offs, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _load_rows(
    ptrs,  # [R, BLOCK_D] pointers of R rows of a [*, HEAD_DIM] tile
    row_ok,  # [R] bool: rows to read (others read as 0); ignored when not CHECK_ROWS
    offs_d,  # [BLOCK_D] column indices
    HEAD_DIM: tl.constexpr,  # real head dim
    BLOCK_D: tl.constexpr,  # power of two >= HEAD_DIM
    CHECK_ROWS: tl.constexpr,  # False when every row is known to be kept
):
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_rows(
    ptrs,  # [R, BLOCK_D] pointers
    x,  # [R, BLOCK_D] values
    row_ok,  # [R] bool: rows to write
    offs_d,  # [BLOCK_D] column indices
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _block_ranges(lo, hi, BLOCK: tl.constexpr):
    # Split the blocks overlapping [lo, hi) into [first, full_lo) (the partial first block, if any),
    # [full_lo, full_hi) (blocks entirely inside [lo, hi)) and [full_hi, hi) (the partial last block, if any).
    first = (lo // BLOCK) * BLOCK
    full_lo = tl.cdiv(lo, BLOCK) * BLOCK
    full_hi = tl.maximum((hi // BLOCK) * BLOCK, full_lo)
    return first, full_lo, full_hi


@triton.jit
def _dropout_keep(
    seed,  # int64 scalar: the Philox key
    bh,  # scalar b * H + h: Philox counter word c1
    start_m,  # first query row of the tile (a multiple of 16)
    start_n,  # first key of the tile (a multiple of 16)
    n_groups,  # cdiv(L, 16): groups of 16 keys per query row
    p_thresh,  # keep iff the 16-bit draw >= p_thresh = round(p_drop * 65536)
    BLOCK_M: tl.constexpr,  # a multiple of 16
    BLOCK_N: tl.constexpr,  # a multiple of 16
):
    # Returns keep [BLOCK_M, BLOCK_N] (bool) for the query rows start_m.. and keys start_n.. (see the module
    # docstring for the draw layout). One Philox-4x32-7 call per (row pair, key group, q) gives 4 x 32 bits =
    # 8 draws of 16 bits: draw 4 h + 2 k + s is for row 16 a + 8 h + r and key 16 g + 8 k + 2 q + s. This matches
    # the MMA accumulator layout (a thread holds rows r and r + 8 of each 16 and the key pair 2 q, 2 q + 1 of
    # each 8), so in the fwd and dQ tiles every thread computes exactly the draws of its own elements and no
    # data moves between threads (the old layout, 8 consecutive keys per call, went through shared memory).
    R: tl.constexpr = BLOCK_M // 16
    G: tl.constexpr = BLOCK_N // 16
    # (n_groups and p_thresh may be constexprs: Triton specialises integer arguments equal to 1; no .to() on them)
    pair = (start_m // 16 + tl.arange(0, R)).to(tl.uint32)[:, None] * 8 + tl.arange(0, 8).to(tl.uint32)[None, :]
    g = (start_n // 16 + tl.arange(0, G)).to(tl.uint32)
    q = tl.arange(0, 4).to(tl.uint32)
    c0 = (pair[:, :, None, None] * n_groups + g[None, None, :, None]) * 4 + q[None, None, None, :]  # [R, 8, G, 4]
    c1 = tl.zeros_like(c0) + bh.to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero, 7)
    w0 = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))  # [R, 8, G, 4, s, k], h = 0
    w1 = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))  # h = 1
    x = tl.permute(tl.join(w0, w1), (0, 6, 1, 2, 5, 3, 4))  # [R, h, 8 (r), G, k, 4 (q), s]
    return tl.reshape(x, (BLOCK_M, BLOCK_N)) >= p_thresh


@triton.jit
def _program_rows(
    BOUNDS, KMASK, SEED,  # see _attn_fwd_kernel
    H, L,  # number of heads, sequence length
    BLOCK: tl.constexpr,  # positions this program owns (query rows for fwd / dq, keys for dkdv)
    BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
):
    # The program prologue of all three attention kernels. The 1-D grid (no 65535 limit on B * H) gives the
    # program positions [start, start + BLOCK) of head (b, h); a head's blocks run together. Returns b, h, bh,
    # start, offs [BLOCK], offs_d [BLOCK_D], kmask_base, ok [BLOCK] (the owned positions that are kept), the range
    # [other_lo, other_hi) of the other side to visit (empty when no owned position is kept), the dropout seed,
    # n_groups = cdiv(L, 16) (see _dropout_keep) and holes (nonzero: the mask drops positions inside [lo, hi) of
    # this row, so full blocks must read it; zero: they run unmasked, as without a mask).
    n_blocks = tl.cdiv(L, BLOCK)
    start = (tl.program_id(0) % n_blocks) * BLOCK
    bh = tl.program_id(0) // n_blocks
    b = bh // H
    h = bh % H
    lo = tl.load(BOUNDS + 3 * b)
    hi = tl.load(BOUNDS + 3 * b + 1)
    holes = 0
    if HAS_MASK:
        holes = tl.load(BOUNDS + 3 * b + 2)
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    kmask_base = KMASK + b.to(tl.int64) * L
    ok = _keep(offs, lo, hi, kmask_base, HAS_MASK)
    skip = (start >= hi) | (start + BLOCK <= lo)
    other_lo = tl.where(skip, 0, lo)
    other_hi = tl.where(skip, 0, hi)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    n_groups = (L + 15) // 16
    return b, h, bh, start, offs, offs_d, kmask_base, ok, other_lo, other_hi, seed, n_groups, holes


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i,  # running state: [BLOCK_M, BLOCK_D] fp32, [BLOCK_M] fp32, [BLOCK_M] fp32 (base 2)
    q,  # [BLOCK_M, BLOCK_D] query tile
    k_base, v_base,  # K, V pointers at (b, h, 0, 0)
    stride_kl, stride_vl,  # row strides of K, V
    kmask_base,  # KMASK pointer at (b, 0)
    start_m, offs_d,  # first query row of the tile, [BLOCK_D] head-dim indices
    start, stop,  # key range [start, stop) visited in blocks of BLOCK_N (start is a multiple of BLOCK_N)
    kv_lo, kv_hi,  # kept keys lie in [kv_lo, kv_hi)
    qk_scale,  # softmax_scale * log2(e)
    seed, bh, n_groups, p_thresh,  # dropout (see _dropout_keep)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # check which keys are kept (False: all keys of the range are kept)
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # (a) scores of this key block; padded keys are neither read nor attended to
        kv_ok = _keep(offs_n, kv_lo, kv_hi, kmask_base, HAS_MASK)
        k = _load_rows(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], kv_ok, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        if MASKED:
            qk = tl.where(kv_ok[None, :], qk, float("-inf"))
        # (b) online softmax update (m_i starts finite, so a fully masked block gives p = 0, never NaN)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # (c) dropout: the normaliser l_i uses the undropped p; 1 / (1 - p_drop) is applied at the end
        if DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, n_groups, p_thresh, BLOCK_M, BLOCK_N)
            # a multiply, not tl.where: a select here is moved past the cast to 16 bits and becomes ~2.5 integer
            # instructions per element on packed halves (sm_90 SASS); this is 2 FP32 ones (p is finite, so the same)
            p = p * keep.to(tl.float32)
        # (d) acc += P V
        v = _load_rows(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], kv_ok, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # [B, H, L, D] inputs, unit stride on D
    O,  # [B, H, L, D] output
    LSE,  # [B, H, L] fp32 output: natural-log sum of exp of the scaled scores; +inf on padded query rows
    BOUNDS,  # [B, 3] int32: kept positions of row b lie in [lo, hi); holes = 1 if KMASK drops some of them
    KMASK,  # [B, L] int8: 1 = keep (read only when HAS_MASK)
    SEED,  # [1] int64: dropout seed (read only when DROPOUT)
    stride_qb, stride_qh, stride_ql,  # strides of Q (elements)
    stride_kb, stride_kh, stride_kl,  # strides of K
    stride_vb, stride_vh, stride_vl,  # strides of V
    stride_ob, stride_oh, stride_ol,  # strides of O
    H, L,  # number of heads, sequence length
    sm_scale,  # softmax scale
    drop_scale,  # 1 / (1 - p_drop)
    p_thresh,  # dropout threshold on 16-bit draws
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # head dim, and the power of two >= it
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows per program, keys per inner step
    HAS_MASK: tl.constexpr,  # a per-position mask is given (padding is not just outside [lo, hi))
    DROPOUT: tl.constexpr,  # p_drop > 0
    DOT_PREC: tl.constexpr,  # tl.dot input precision for fp32 inputs: "ieee" or "tf32"
):
    # 1. The program owns query rows [start_m, start_m + BLOCK_M) of (b, h); a query block with no kept row
    #    visits no key block ([kv_lo, kv_hi) is empty).
    b, h, bh, start_m, offs_m, offs_d, kmask_base, q_ok, kv_lo, kv_hi, seed, n_groups, holes = _program_rows(
        BOUNDS, KMASK, SEED, H, L, BLOCK_M, BLOCK_D, HAS_MASK, DROPOUT)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    # 2. Running state of the online softmax (m starts finite: see _attn_fwd_inner (b)).
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                   + offs_m[:, None] * stride_ql + offs_d[None, :], q_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    qk_scale = sm_scale * 1.4426950408889634
    # 3. Key blocks: the partial first block (masked), full blocks (unmasked unless HAS_MASK), the partial last
    #    block (masked). Blocks outside [kv_lo, kv_hi) are never visited.
    first, full_lo, full_hi = _block_ranges(kv_lo, kv_hi, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, kmask_base,
                                    start_m, offs_d, first, full_lo, kv_lo, kv_hi, qk_scale,
                                    seed, bh, n_groups, p_thresh,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_MASK, DROPOUT, DOT_PREC)
    if holes:  # the mask matters inside [kv_lo, kv_hi): full blocks read it
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, kmask_base,
                                        start_m, offs_d, full_lo, full_hi, kv_lo, kv_hi, qk_scale,
                                        seed, bh, n_groups, p_thresh,
                                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, True, DROPOUT, DOT_PREC)
    else:  # no mask, or one that only pads outside [kv_lo, kv_hi): full blocks are all kept
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, kmask_base,
                                        start_m, offs_d, full_lo, full_hi, kv_lo, kv_hi, qk_scale,
                                        seed, bh, n_groups, p_thresh,
                                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, False, DROPOUT, DOT_PREC)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, kmask_base,
                                    start_m, offs_d, full_hi, kv_hi, kv_lo, kv_hi, qk_scale,
                                    seed, bh, n_groups, p_thresh,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_MASK, DROPOUT, DOT_PREC)
    # 4. Normalise; padded query rows get O = 0 and LSE = +inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = tl.where(q_ok[:, None], acc * (drop_scale / l_safe)[:, None], 0.0)
    lse = tl.where(q_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    _store_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_ol + offs_d[None, :], o.to(O.dtype.element_ty), offs_m < L, offs_d,
                HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # [B, H, L, D] forward output and its gradient
    DELTA,  # [B, H, L] fp32 output: delta_i = rowsum(O_i o dO_i)
    stride_ob, stride_oh, stride_ol,  # strides of O
    stride_dob, stride_doh, stride_dol,  # strides of DO
    H, L,  # number of heads, sequence length
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # 1. The program owns rows [start_m, start_m + BLOCK_M) of (b, h).
    n_blocks = tl.cdiv(L, BLOCK_M)  # 1-D grid (no 65535 limit on B * H); a head's blocks run together
    start_m = (tl.program_id(0) % n_blocks) * BLOCK_M
    bh = tl.program_id(0) // n_blocks
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # 2. delta = rowsum(O o dO) in fp32 (padded rows: whatever dO holds; the other kernels never read them).
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                   + offs_m[:, None] * stride_ol + offs_d[None, :], offs_m < L, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                    + offs_m[:, None] * stride_dol + offs_d[None, :], offs_m < L, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _load_delta(delta_base, offs_m, q_ok, MASKED: tl.constexpr):
    # delta of query rows offs_m (0 on rows that are not kept)
    if MASKED:
        delta = tl.load(delta_base + offs_m, mask=q_ok, other=0.0)
    else:
        delta = tl.load(delta_base + offs_m)
    return delta


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv,  # [BLOCK_N, BLOCK_D] fp32 accumulators
    k, v,  # [BLOCK_N, BLOCK_D] this program's key and value tiles
    q_base, do_base,  # Q, DO pointers at (b, h, 0, 0)
    stride_ql, stride_dol,  # row strides of Q, DO
    lse_base, delta_base,  # LSE, DELTA pointers at (b, h, 0)
    kmask_base,  # KMASK pointer at (b, 0)
    start_n, offs_d,  # first key of this program's block, [BLOCK_D] head-dim indices
    start, stop,  # query range [start, stop) visited in blocks of BLOCK_M
    q_lo, q_hi,  # kept query rows lie in [q_lo, q_hi)
    qk_scale, inv_scale, drop_scale,  # softmax_scale * log2(e); 1 / softmax_scale; 1 / (1 - p_drop)
    seed, bh, n_groups, p_thresh,  # dropout (see _dropout_keep)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # check which query rows are kept (False: all rows of the range are kept)
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # (a) P^T recomputed from the saved LSE. Padded query rows are not read (q = dO = 0, LSE = +inf, so
        #     P = 0 there). Padded keys of this block are not masked: they only touch their own rows of dK and
        #     dV, which the caller zeroes.
        q_ok = _keep(offs_m, q_lo, q_hi, kmask_base, HAS_MASK)
        q = _load_rows(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], q_ok, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=q_ok, other=float("inf"))
        else:
            lse = tl.load(lse_base + offs_m)
        if DROPOUT:
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
            pT = tl.exp2(qkT * qk_scale - (lse * 1.4426950408889634)[None, :])
        else:
            # the product accumulates onto -LSE / scale, so P^T = 2^(acc * scale * log2 e): the [BLOCK_M] LSE
            # vector is dead once it is in the accumulator (fewer registers while the product runs; see (b)).
            # Not with dropout: there the accumulator's initial values cost integer moves (the int pipe bounds
            # the dropout loop) and no register peak is relieved
            qkT = tl.dot(k, tl.trans(q), tl.broadcast_to(-(lse * inv_scale)[None, :], (BLOCK_N, BLOCK_M)),
                         input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
            pT = tl.exp2(qkT * qk_scale)
        # (b) dV += (P o Z)^T dO;  dP^T = (V dO^T) o Z^T;  dS^T = P^T o (dP^T - delta);  dK += dS^T Q
        do = _load_rows(do_base + offs_m[:, None] * stride_dol + offs_d[None, :], q_ok, offs_d,
                        HEAD_DIM, BLOCK_D, MASKED)
        if DROPOUT:
            keepT = tl.trans(_dropout_keep(seed, bh, start_m, start_n, n_groups, p_thresh, BLOCK_M, BLOCK_N))
            if do.dtype == tl.float32:  # no cast to 16 bits follows: a select is cheap (and fp32 D=128 spilled
                pdT = tl.where(keepT, pT * drop_scale, 0.0)  # with the multiply under triton 3.6)
            else:  # a multiply by Z^T, not a select: see _attn_fwd_inner (c)
                zT = tl.where(keepT, drop_scale, 0.0)
                pdT = pT * zT
            dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=DOT_PREC)
            delta = _load_delta(delta_base, offs_m, q_ok, MASKED)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
            if do.dtype == tl.float32:
                dpT = tl.where(keepT, dpT * drop_scale, 0.0)
            else:
                dpT = dpT * zT
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
        else:
            # Without dropout dP^T accumulates onto -delta (as the scores onto -LSE / scale) and comes before the
            # dV product, so that P^T's 16-bit copy (an operand of that asynchronous product) is not live while
            # dP^T is computed. Both cut registers at the peak: the 4-warp tiles that measured fastest on the
            # H200 spilled without them (dkdv D=64 128x64 w4: 748 bytes) and fit now.
            delta = _load_delta(delta_base, offs_m, q_ok, MASKED)
            dsT = pT * tl.dot(v, tl.trans(do), tl.broadcast_to(-delta[None, :], (BLOCK_N, BLOCK_M)),
                              input_precision=DOT_PREC)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # [B, H, L, D] forward inputs and the gradient of the output
    DK, DV,  # [B, H, L, D] outputs
    LSE, DELTA,  # [B, H, L] fp32: forward LSE (+inf on padded rows), delta from the preprocess kernel
    BOUNDS,  # [B, 3] int32: kept positions of row b lie in [lo, hi); holes = 1 if KMASK drops some of them
    KMASK,  # [B, L] int8: 1 = keep (read only when HAS_MASK)
    SEED,  # [1] int64: dropout seed (read only when DROPOUT)
    stride_qb, stride_qh, stride_ql,  # strides of Q
    stride_kb, stride_kh, stride_kl,  # strides of K
    stride_vb, stride_vh, stride_vl,  # strides of V
    stride_dob, stride_doh, stride_dol,  # strides of DO
    stride_dkb, stride_dkh, stride_dkl,  # strides of DK
    stride_dvb, stride_dvh, stride_dvl,  # strides of DV
    H, L,  # number of heads, sequence length
    sm_scale,  # softmax scale
    drop_scale,  # 1 / (1 - p_drop)
    p_thresh,  # dropout threshold on 16-bit draws
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # 1. The program owns keys [start_n, start_n + BLOCK_N) of (b, h); a key block with no kept key visits no
    #    query block ([q_lo, q_hi) is empty; its dK, dV are 0).
    b, h, bh, start_n, offs_n, offs_d, kmask_base, k_ok, q_lo, q_hi, seed, n_groups, _holes = _program_rows(
        BOUNDS, KMASK, SEED, H, L, BLOCK_N, BLOCK_D, HAS_MASK, DROPOUT)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                   + offs_n[:, None] * stride_kl + offs_d[None, :], k_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                   + offs_n[:, None] * stride_vl + offs_d[None, :], k_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    lse_base = LSE + bh.to(tl.int64) * L
    delta_base = DELTA + bh.to(tl.int64) * L
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    inv_scale = 1.0 / sm_scale
    # 2. Query blocks: partial first (masked), full (unmasked unless HAS_MASK), partial last (masked).
    first, full_lo, full_hi = _block_ranges(q_lo, q_hi, BLOCK_M)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, lse_base, delta_base,
                                  kmask_base, start_n, offs_d, first, full_lo, q_lo, q_hi, qk_scale, inv_scale,
                                  drop_scale, seed, bh, n_groups, p_thresh,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_MASK, DROPOUT, DOT_PREC)
    # (full blocks read the mask whenever there is one: a second loop copy for rows without holes, as fwd and dQ
    #  have, spilled registers in several dK/dV configs)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, lse_base, delta_base,
                                  kmask_base, start_n, offs_d, full_lo, full_hi, q_lo, q_hi, qk_scale, inv_scale,
                                  drop_scale, seed, bh, n_groups, p_thresh,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_MASK, HAS_MASK, DROPOUT, DOT_PREC)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, lse_base, delta_base,
                                  kmask_base, start_n, offs_d, full_hi, q_hi, q_lo, q_hi, qk_scale, inv_scale,
                                  drop_scale, seed, bh, n_groups, p_thresh,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_MASK, DROPOUT, DOT_PREC)
    # 3. Padded keys get exactly 0 (their rows were not masked inside the loop).
    dk = tl.where(k_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(k_ok[:, None], dv, 0.0)
    _store_rows(DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
                + offs_n[:, None] * stride_dkl + offs_d[None, :], dk.to(DK.dtype.element_ty), offs_n < L, offs_d,
                HEAD_DIM, BLOCK_D)
    _store_rows(DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
                + offs_n[:, None] * stride_dvl + offs_d[None, :], dv.to(DV.dtype.element_ty), offs_n < L, offs_d,
                HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # [BLOCK_M, BLOCK_D] fp32 accumulator
    q, do,  # [BLOCK_M, BLOCK_D] this program's query and output-gradient tiles
    lse2, delta,  # [BLOCK_M] fp32: LSE * log2(e) (+inf on padded rows), delta
    k_base, v_base,  # K, V pointers at (b, h, 0, 0)
    stride_kl, stride_vl,  # row strides of K, V
    kmask_base,  # KMASK pointer at (b, 0)
    start_m, offs_d,  # first query row of the tile, [BLOCK_D] head-dim indices
    start, stop,  # key range [start, stop) visited in blocks of BLOCK_N
    kv_lo, kv_hi,  # kept keys lie in [kv_lo, kv_hi)
    qk_scale, drop_scale,  # softmax_scale * log2(e); 1 / (1 - p_drop)
    seed, bh, n_groups, p_thresh,  # dropout (see _dropout_keep)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # (a) P recomputed from LSE; padded keys must be masked here (they would reach every row of dQ).
        kv_ok = _keep(offs_n, kv_lo, kv_hi, kmask_base, HAS_MASK)
        k = _load_rows(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], kv_ok, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(kv_ok[None, :], p, 0.0)
        # (b) dP = (dO V^T) o Z;  dS = P o (dP - delta);  dQ += dS K
        v = _load_rows(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], kv_ok, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        if DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, n_groups, p_thresh, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # [B, H, L, D] forward inputs and the gradient of the output
    DQ,  # [B, H, L, D] output
    LSE, DELTA,  # [B, H, L] fp32: forward LSE (+inf on padded rows), delta from the preprocess kernel
    BOUNDS,  # [B, 3] int32: kept positions of row b lie in [lo, hi); holes = 1 if KMASK drops some of them
    KMASK,  # [B, L] int8: 1 = keep (read only when HAS_MASK)
    SEED,  # [1] int64: dropout seed (read only when DROPOUT)
    stride_qb, stride_qh, stride_ql,  # strides of Q
    stride_kb, stride_kh, stride_kl,  # strides of K
    stride_vb, stride_vh, stride_vl,  # strides of V
    stride_dob, stride_doh, stride_dol,  # strides of DO
    stride_dqb, stride_dqh, stride_dql,  # strides of DQ
    H, L,  # number of heads, sequence length
    sm_scale,  # softmax scale
    drop_scale,  # 1 / (1 - p_drop)
    p_thresh,  # dropout threshold on 16-bit draws
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # 1. The program owns query rows [start_m, start_m + BLOCK_M) of (b, h) (padded rows are not read); a query
    #    block with no kept row visits no key block.
    b, h, bh, start_m, offs_m, offs_d, kmask_base, q_ok, kv_lo, kv_hi, seed, n_groups, holes = _program_rows(
        BOUNDS, KMASK, SEED, H, L, BLOCK_M, BLOCK_D, HAS_MASK, DROPOUT)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                   + offs_m[:, None] * stride_ql + offs_d[None, :], q_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                    + offs_m[:, None] * stride_dol + offs_d[None, :], q_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    lse2 = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=q_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=q_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    # 2. Key blocks, split as in the forward.
    first, full_lo, full_hi = _block_ranges(kv_lo, kv_hi, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, kmask_base,
                            start_m, offs_d, first, full_lo, kv_lo, kv_hi, qk_scale, drop_scale,
                            seed, bh, n_groups, p_thresh,
                            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_MASK, DROPOUT, DOT_PREC)
    if holes:  # see _attn_fwd_kernel
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, kmask_base,
                                start_m, offs_d, full_lo, full_hi, kv_lo, kv_hi, qk_scale, drop_scale,
                                seed, bh, n_groups, p_thresh,
                                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, True, DROPOUT, DOT_PREC)
    else:
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, kmask_base,
                                start_m, offs_d, full_lo, full_hi, kv_lo, kv_hi, qk_scale, drop_scale,
                                seed, bh, n_groups, p_thresh,
                                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, False, DROPOUT, DOT_PREC)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, kmask_base,
                            start_m, offs_d, full_hi, kv_hi, kv_lo, kv_hi, qk_scale, drop_scale,
                            seed, bh, n_groups, p_thresh,
                            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_MASK, DROPOUT, DOT_PREC)
    # 3. Padded query rows get exactly 0.
    dq = tl.where(q_ok[:, None], dq * sm_scale, 0.0)
    _store_rows(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
                + offs_m[:, None] * stride_dql + offs_d[None, :], dq.to(DQ.dtype.element_ty), offs_m < L, offs_d,
                HEAD_DIM, BLOCK_D)


@triton.jit
def _dropout_mask_kernel(
    KEEP,  # [B, H, L, L] int8 output: 1 where the attention kernels keep weight (b, h, i, j)
    SEED,  # [1] int64: dropout seed
    H, L,  # number of heads, sequence length
    p_thresh,  # dropout threshold on 16-bit draws
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1. The program owns the tile (rows start_m.., keys start_n..) of (b, h).
    n_m, n_n = tl.cdiv(L, BLOCK_M), tl.cdiv(L, BLOCK_N)  # 1-D grid over (m block, n block, b * H + h)
    pid = tl.program_id(0)
    start_m = (pid % n_m) * BLOCK_M
    start_n = ((pid // n_m) % n_n) * BLOCK_N
    bh = pid // (n_m * n_n)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # 2. The same draws as the attention kernels.
    keep = _dropout_keep(tl.load(SEED), bh, start_m, start_n, (L + 15) // 16, p_thresh, BLOCK_M, BLOCK_N)
    ptrs = KEEP + bh.to(tl.int64) * L * L + offs_m.to(tl.int64)[:, None] * L + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < L))


# =====================================================================================================
# 2. Host launchers
# =====================================================================================================


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query rows per program (fwd, dq) / per inner step (dkdv)
    block_n: int  # keys per inner step (fwd, dq) / per program (dkdv)
    num_warps: int
    num_stages: int


# Launch configurations, (arch, 16-bit inputs?, kernel) -> {BLOCK_D: (plain, key mask, dropout)}, each
# (BLOCK_M, BLOCK_N, num_warps, num_stages); "plain" has neither a per-key mask nor dropout, "dropout" covers
# dropout with or without a mask. For each entry the first of a list of candidates (largest tiles first) that
# compiles without a register spill for every head dim of its BLOCK_D, fp16 and bf16 alike, with triton 3.9 (CI)
# and with triton 3.6 (the GPU machine's image; ptxas differs) (`python -m mlmfast.kernels.compile_check
# --all-variants` under each). sm_90 16-bit, head dims 64 and 128: the fastest spill-free configs of
# `benchmarks/bench_attention.py --sweep` on an H200 (2026-11-28, bf16, L = 512 and 2048, plain variant;
# benchmarks/results/2026-11-28-h200-attention-sweep-*.json), reused for the mask / dropout variants where they
# compile without a spill too. The sweep's fastest dK/dV configs (4 warps) spilled with the kernel they were
# timed with; since session 8 (dP^T and the scores accumulate onto -delta and -LSE / scale, dP^T before the dV
# product) the plain variant fits, and takes them: D=64 (128, 64, 4, 2) (sweep, fwd+bwd at L = 512: 1.151 ms vs
# 1.279 for the old (64, 128, 8, 3); with 692 spilled bytes then, none now), D=128 (64, 32, 4, 2) (1.458 vs 1.651
# ms for the old (64, 64, 8, 2); a 32-key tile is too short for wgmma, so it runs the sm_80 mma, which the sweep
# timed faster than every wgmma tile at D=128): timings of the earlier kernel body, so re-sweep. Since the session-7
# draw layout, dQ D=128's dropout variant compiles spill-free with (64, 64, 4, 3) and takes it (static count,
# triton 3.6: 0.60 vs 1.22 instructions per element with (64, 64, 8, 2)); dK/dV D=64's does with (64, 128, 8, 3)
# too, but under 3.6 it issues more integer work per element than (32, 128, 8, 2): left for a timed sweep. The
# rest is not tuned on a GPU yet. arch 80 covers sm_80..sm_89; fp32 inputs run TF32 dots.
# dkdv: BLOCK_N keys per program, BLOCK_M query rows per step; fwd / dq: BLOCK_M query rows per program.
_CONFIG_TABLE: dict[tuple[int, bool, str], dict[int, tuple[tuple[int, int, int, int], ...]]] = {
    # sm_90, 16-bit inputs
    (90, True, "fwd"): {
        16: ((128, 64, 4, 3), (128, 64, 4, 3), (128, 64, 4, 3)),
        32: ((128, 64, 4, 3), (128, 64, 4, 3), (128, 64, 4, 3)),
        64: ((128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
        128: ((128, 32, 8, 3), (128, 32, 8, 3), (128, 32, 8, 3)),
    },
    (90, True, "dkdv"): {
        16: ((64, 128, 8, 2), (64, 128, 8, 2), (64, 128, 8, 2)),
        32: ((64, 128, 8, 2), (64, 128, 8, 2), (64, 128, 8, 2)),
        64: ((128, 64, 4, 2), (64, 128, 8, 3), (32, 128, 8, 2)),
        128: ((64, 32, 4, 2), (32, 64, 8, 2), (32, 64, 8, 2)),
    },
    (90, True, "dq"): {
        16: ((128, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 2)),
        32: ((128, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 2)),
        64: ((64, 32, 4, 3), (64, 32, 4, 3), (64, 32, 4, 3)),
        128: ((64, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 3)),
    },
    # sm_90, fp32 inputs
    (90, False, "fwd"): {
        16: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        32: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        64: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        128: ((64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2)),
    },
    (90, False, "dkdv"): {
        16: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        32: ((64, 64, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2)),
        64: ((32, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)),
        128: ((64, 32, 4, 2), (32, 32, 8, 2), (16, 32, 8, 1)),
    },
    (90, False, "dq"): {
        16: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        32: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        64: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2)),
        128: ((64, 32, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)),
    },
    # sm_80, 16-bit inputs
    (80, True, "fwd"): {
        16: ((128, 64, 4, 3), (128, 64, 4, 3), (128, 64, 4, 3)),
        32: ((128, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3)),
        64: ((128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
        128: ((128, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 2)),
    },
    (80, True, "dkdv"): {
        16: ((64, 128, 8, 2), (64, 128, 8, 2), (32, 128, 8, 2)),
        32: ((32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 8, 2)),
        64: ((16, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2)),
        128: ((64, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 1)),
    },
    (80, True, "dq"): {
        16: ((128, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 2)),
        32: ((128, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 2)),
        64: ((128, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)),
        128: ((64, 64, 8, 2), (64, 64, 8, 2), (32, 32, 8, 2)),
    },
    # sm_80, fp32 inputs
    (80, False, "fwd"): {
        16: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        32: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        64: ((64, 64, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2)),
        128: ((64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
    },
    (80, False, "dkdv"): {
        16: ((64, 64, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2)),
        32: ((32, 64, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2)),
        64: ((64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
        128: ((64, 32, 4, 2), (16, 32, 4, 1), (16, 32, 8, 1)),
    },
    (80, False, "dq"): {
        16: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
        32: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2)),
        64: ((32, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2)),
        128: ((64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2)),
    },
}
_PRE_CONFIG = KernelConfig(64, 16, 4, 1)  # delta = rowsum(O o dO): BLOCK_M rows per program


def parse_config(item: str) -> tuple[str, tuple[int, int, int, int]]:
    """"KIND=BM,BN,W,S" (a command-line launch config, e.g. "dkdv=128,64,4,2") -> (kind, (BM, BN, W, S)); a
    ValueError that says what is expected otherwise. KIND is fwd, dq or dkdv; BM, BN are multiples of 16 (the
    dropout draw layout's tile unit)."""
    kind, _, spec = item.partition("=")
    try:
        cfg = tuple(int(x) for x in spec.split(","))
    except ValueError:
        cfg = ()
    if kind not in ("fwd", "dq", "dkdv") or len(cfg) != 4 or cfg[0] % 16 or cfg[1] % 16 or min(cfg) < 1:
        raise ValueError(f"{item!r}: expected KIND=BM,BN,W,S with KIND fwd, dq or dkdv and BM, BN multiples of 16, "
                         "e.g. dkdv=64,128,8,3")
    return kind, cfg


def block_d(head_dim: int) -> int:
    """The power of two >= head_dim (at least 16, the smallest tl.dot size) that the kernels work on."""
    return max(16, next_power_of_2(head_dim))


@functools.lru_cache(maxsize=None)
def kernel_config(kind: str, head_dim: int, dtype: torch.dtype, arch: int = 90, has_mask: bool = False,
                  dropout: bool = False) -> KernelConfig:
    """Launch configuration of kernel `kind` ("fwd", "pre", "dkdv", "dq") for a head dim, dtype, arch (80, 90)
    and variant (per-key mask, dropout)."""
    if kind == "pre":
        return _PRE_CONFIG
    variant = 2 if dropout else 1 if has_mask else 0
    table = _CONFIG_TABLE[90 if arch >= 90 else 80, dtype != torch.float32, kind]
    return KernelConfig(*table[block_d(head_dim)][variant])


def launch_options(cfg: KernelConfig, arch: int) -> dict:
    """Triton launch options of a config. On sm_8x, `.maxnreg 255` stops ptxas from capping registers to fit
    more CTAs per SM (seen: 168 registers and a spill where 228 registers fit without one)."""
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if arch < 90:
        opts["maxnreg"] = 255
    return opts


def _is_blhd(x: torch.Tensor) -> bool:
    """True when x [B, H, L, D] is a view of [B, L, H, D] storage (heads interleaved within a token)."""
    return x.stride(-1) == 1 and x.stride(1) < x.stride(2)


def _rows_fit_int32(row_stride: int, L: int) -> bool:
    """The kernels form `row * stride_l` in int32 (the batch/head base is int64): it must not wrap for any row
    of the last, partial block."""
    return row_stride * (L + 128) < 2**31


def _alloc_like(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised [B, H, L, D] tensor in x's layout family: [B, L, H, D] storage if x has it (and its row
    offsets fit in int32), else contiguous."""
    B, H, L, D = x.shape
    dtype = x.dtype if dtype is None else dtype
    if _is_blhd(x) and _rows_fit_int32(H * D, L):
        return torch.empty((B, L, H, D), dtype=dtype, device=x.device).transpose(1, 2)
    return torch.empty((B, H, L, D), dtype=dtype, device=x.device)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride on D and int32-safe row offsets (copied to contiguous [B, H, L, D] if needed)."""
    if x.stride(-1) == 1 and _rows_fit_int32(x.stride(2), x.shape[2]):
        return x
    return x.contiguous()


def _poison(*tensors: torch.Tensor) -> None:
    if POISON_OUTPUTS:
        for t in tensors:
            t.fill_(float("nan"))


def _p_thresh(dropout_p: float) -> int:
    return min(65535, int(round(dropout_p * 65536)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: TF32 tensor-core dots (fp32 accumulation), as with torch.backends.cuda.matmul.allow_tf32.
    # True-fp32 ("ieee") dots lower to FMA loops that hold a whole head-dim row per thread and spill at D >= 64;
    # "tf32x3" spills too. 16-bit inputs ignore this. Triton's interpreter always computes in fp32.
    return "tf32" if dtype == torch.float32 else "ieee"


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride()[:3]


def _mask_seed_args(bounds: torch.Tensor, kmask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                    dropout: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The KMASK and SEED kernel arguments: the tensors, or (without a mask / dropout, when the kernels never read
    them) views of `bounds` of the right dtypes as placeholders."""
    return (kmask if kmask is not None else bounds.view(torch.int8),
            seed if dropout else bounds.view(-1)[:2].view(torch.int64))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                      kmask: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q, k, v [B, H, L, D]; bounds [B, 3] int32 (padding_bounds); kmask [B, L] int8
    or None; seed [1] int64 (needed when dropout_p > 0). Returns (out [B, H, L, D] in q's layout,
    lse [B, H, L] fp32)."""
    B, H, L, D = q.shape
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    out = _alloc_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _poison(out, lse)
    if out.numel() == 0:
        return out, lse
    dropout = dropout_p > 0.0
    arch = device_arch(q.device)
    cfg = kernel_config("fwd", D, q.dtype, arch, kmask is not None, dropout)
    grid = (cdiv(L, cfg.block_m) * B * H,)
    with on_device(q.device):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, bounds, *_mask_seed_args(bounds, kmask, seed, dropout),
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
            H, L, float(softmax_scale), 1.0 / (1.0 - dropout_p), _p_thresh(dropout_p),
            HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            HAS_MASK=kmask is not None, DROPOUT=dropout, DOT_PREC=_dot_precision(q.dtype),
            **launch_options(cfg, arch),
        )
    return out, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, bounds: torch.Tensor, kmask: Optional[torch.Tensor],
                       seed: Optional[torch.Tensor], dropout_p: float,
                       softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta preprocess, dK/dV and dQ kernels. Returns (dq, dk, dv), each in its input's layout."""
    B, H, L, D = q.shape
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    do, out = _unit_last_stride(do), _unit_last_stride(out)
    dq, dk, dv = _alloc_like(q), _alloc_like(k), _alloc_like(v)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _poison(dq, dk, dv, delta)
    if dq.numel() == 0:
        return dq, dk, dv
    dropout = dropout_p > 0.0
    arch = device_arch(q.device)
    kmask_arg, seed_arg = _mask_seed_args(bounds, kmask, seed, dropout)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d(D), HAS_MASK=kmask is not None, DROPOUT=dropout,
                  DOT_PREC=_dot_precision(q.dtype))
    scalars = (H, L, float(softmax_scale), 1.0 / (1.0 - dropout_p), _p_thresh(dropout_p))
    with on_device(q.device):
        # 1. delta = rowsum(O o dO)
        cfg = kernel_config("pre", D, q.dtype, arch)
        _attn_bwd_preprocess_kernel[(cdiv(L, cfg.block_m) * B * H,)](
            out, do, delta, *_strides3(out), *_strides3(do), H, L,
            HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=cfg.block_m, **launch_options(cfg, arch),
        )
        # 2. dK, dV: one program per key block
        cfg = kernel_config("dkdv", D, q.dtype, arch, kmask is not None, dropout)
        _attn_bwd_dkdv_kernel[(cdiv(L, cfg.block_n) * B * H,)](
            q, k, v, do, dk, dv, lse, delta, bounds, kmask_arg, seed_arg,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
            *scalars, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common, **launch_options(cfg, arch),
        )
        # 3. dQ: one program per query block
        cfg = kernel_config("dq", D, q.dtype, arch, kmask is not None, dropout)
        _attn_bwd_dq_kernel[(cdiv(L, cfg.block_m) * B * H,)](
            q, k, v, do, dq, lse, delta, bounds, kmask_arg, seed_arg,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
            *scalars, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common, **launch_options(cfg, arch),
        )
    return dq, dk, dv


def dropout_mask(batch: int, heads: int, seq_len: int, dropout_p: float, seed, device) -> torch.Tensor:
    """The keep-mask [B, H, L, L] (bool) that the kernels use for (seed, dropout_p): for tests and debugging."""
    device = torch.device(device)
    keep = torch.empty((batch, heads, seq_len, seq_len), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    seed_t = _seed_tensor(seed, device)
    bm = bn = 32
    grid = (cdiv(seq_len, bm) * cdiv(seq_len, bn) * batch * heads,)
    with on_device(device):
        _dropout_mask_kernel[grid](keep, seed_t, heads, seq_len, _p_thresh(dropout_p), BLOCK_M=bm, BLOCK_N=bn)
    return keep.bool()


def dropout_mask_reference(batch: int, heads: int, seq_len: int, dropout_p: float, seed: int) -> torch.Tensor:
    """`dropout_mask()` recomputed in plain PyTorch on the CPU from the draw layout in the module docstring (an
    independent check of the kernels' index arithmetic; O(B H L^2) Python-level tensor ops: small sizes)."""
    from mlmfast.ops import philox4x32

    B, H, L = batch, heads, seq_len
    seed = int(seed) % 2**64
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    a, h, r = i // 16, (i // 8) % 2, i % 8
    g, k, q, s = j // 16, (j // 8) % 2, (j // 2) % 4, j % 2
    c0 = ((8 * a + r) * ((L + 15) // 16) + g) * 4 + q  # [L, L]
    bh = torch.arange(B * H).view(B * H, 1, 1)
    words = philox4x32(c0, bh, 0, 0, seed & 0xFFFFFFFF, seed >> 32, rounds=7)  # 4 x [B H, L, L]
    word = torch.stack(words)  # [4, B H, L, L]
    w = torch.gather(word, 0, (2 * h + k).expand(B * H, L, L).unsqueeze(0)).squeeze(0)
    draw = (w >> (16 * s)) & 0xFFFF
    return (draw >= _p_thresh(dropout_p)).view(B, H, L, L)


# =====================================================================================================
# 3. Custom ops (eager + torch.compile) and autograd
# =====================================================================================================


@torch.library.custom_op("mlmfast::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                      kmask: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, bounds, kmask, seed, dropout_p, softmax_scale)


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, bounds, kmask, seed, dropout_p, softmax_scale):
    B, H, L, _ = q.shape
    return _alloc_like(q), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("mlmfast::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, bounds: torch.Tensor, kmask: Optional[torch.Tensor],
                      seed: Optional[torch.Tensor], dropout_p: float,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, out, lse, bounds, kmask, seed, dropout_p, softmax_scale)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(do, q, k, v, out, lse, bounds, kmask, seed, dropout_p, softmax_scale):
    return _alloc_like(q), _alloc_like(k), _alloc_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, bounds, kmask, seed, dropout_p, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bounds, kmask, seed)
    ctx.dropout_p = dropout_p
    ctx.softmax_scale = softmax_scale


def _grads(ctx, dout, backward):
    """The gradients of (q, k, v, bounds, kmask, seed, dropout_p, softmax_scale) from what _setup_context saved,
    by `backward` (the custom op, or attention_backward itself on the eager path)."""
    q, k, v, out, lse, bounds, kmask, seed = ctx.saved_tensors
    dq, dk, dv = backward(dout, q, k, v, out, lse, bounds, kmask, seed, ctx.dropout_p, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


def _backward(ctx, dout, dlse):
    return _grads(ctx, dout, _attention_bwd_op)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward / backward as the custom op, for eager calls on plain tensors: a custom op's dispatch
    (schema checks, autograd wrapper, redispatch, twice per step) cost about 240 us per forward + backward on a
    2-core Xeon against 145 us for this (benchmarks: CPU-side launch cost, which a GPU step at small shapes waits
    on). torch.compile, fake tensors and tensor subclasses take the custom op (its fake impl and schema)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = attention_forward(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, attention_backward)


def _plain_eager(*tensors: torch.Tensor) -> bool:
    """Eager mode and plain tensors (no FakeTensor, DTensor or other subclass): the lighter autograd.Function."""
    return not _compiling() and all(type(t) is torch.Tensor for t in tensors)


# =====================================================================================================
# 4. Entry point used by mlmfast.attention
# =====================================================================================================


def padding_bounds(batch: int, seq_len: int, seqlens: Optional[torch.Tensor],
                   key_padding_mask: Optional[torch.Tensor],
                   device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(bounds [B, 3] int32, kmask [B, L] int8 or None) from seqlens and/or a key-padding mask (True = keep).

    bounds[b] = (lo, hi, holes). With a mask, [lo, hi) spans its first to last kept position (device reductions,
    no host sync) and the mask itself goes to the kernels, so any pattern (left padding, holes) is exact; blocks
    outside [lo, hi) are skipped. holes = 1 when the mask drops a position inside [lo, hi): only then do the fwd
    and dQ kernels read it in full blocks, so a right- or left-padded mask (HF's usual attention_mask) runs their
    unmasked blocks, as `seqlens` does (dK/dV reads it whenever it is given). Without a mask, holes = 0.
    """
    if seqlens is not None:
        hi = seqlens.to(device=device, dtype=torch.int32).clamp(0, seq_len)
    else:
        hi = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    lo = torch.zeros_like(hi)
    holes = torch.zeros_like(hi)
    kmask = None
    if key_padding_mask is not None:
        keep = key_padding_mask.to(device=device) != 0
        idx = torch.arange(seq_len, dtype=torch.int32, device=device)
        if seqlens is not None:
            keep = keep & (idx[None, :] < hi[:, None])
        hi = torch.where(keep, idx + 1, 0).amax(dim=1).to(torch.int32)
        lo = torch.where(keep, idx, seq_len).amin(dim=1).to(torch.int32)
        lo = torch.minimum(lo, hi)  # a row with no kept position: [0, 0)
        lo = torch.where(hi == 0, 0, lo).to(torch.int32)
        holes = (keep.sum(dim=1, dtype=torch.int32) != hi - lo).to(torch.int32)
        kmask = keep.to(torch.int8).contiguous()
    return torch.stack([lo, hi, holes], dim=1).contiguous(), kmask


_BOUNDS_CACHE: list = []  # at most one entry: (seqlens, key_padding_mask, (B, L, device, their versions), result)


def _padding_bounds_cached(batch: int, seq_len: int, seqlens: Optional[torch.Tensor],
                           key_padding_mask: Optional[torch.Tensor], device: torch.device):
    """padding_bounds, reused while the same mask tensors come again unchanged (same objects, same version
    counters): every layer of a model passes the batch's one mask, so its ~10 small device ops run once per
    forward instead of once per layer. Eager mode and plain tensors only."""
    given = [t for t in (seqlens, key_padding_mask) if t is not None]
    if not given or not _plain_eager(*given) or _capturing(device):
        # under CUDA graph capture the bounds must come from the graph's own pool: a cached tensor could be freed
        # (evicted by a later call) while the graph still reads it at replay
        return padding_bounds(batch, seq_len, seqlens, key_padding_mask, device)
    try:
        versions = tuple(t._version for t in given)
    except RuntimeError:  # inference-mode tensors have no version counter
        return padding_bounds(batch, seq_len, seqlens, key_padding_mask, device)
    key = (batch, seq_len, device, versions)
    if _BOUNDS_CACHE:
        s, m, k, result = _BOUNDS_CACHE[0]
        if s is seqlens and m is key_padding_mask and k == key:
            return result
    result = padding_bounds(batch, seq_len, seqlens, key_padding_mask, device)
    _BOUNDS_CACHE[:] = [(seqlens, key_padding_mask, key, result)]
    return result


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """seed (None, int, or an integer tensor) -> int64 [1] on device, without a host sync."""
    if seed is None:
        # drawn from the device's default generator: reproducible under torch.manual_seed, graph-safe
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        # a copy: the backward re-reads it, so a caller bumping its seed tensor in place must not change the
        # saved one; non_blocking: a CPU seed tensor for a CUDA q is not a host sync
        return seed.reshape(1).to(device=device, dtype=torch.int64, non_blocking=True, copy=True)
    seed = int(seed) % 2**64
    if seed >= 2**63:
        seed -= 2**64
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, seqlens=None, key_padding_mask=None,
                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None, seed=None) -> torch.Tensor:
    """The Triton path of `mlmfast.attention` (same arguments; the caller has validated them)."""
    B, H, L, D = q.shape
    if L > MAX_SEQ_LEN:
        raise UserError(f"attention kernel supports L <= {MAX_SEQ_LEN}, got L={L}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds, kmask = _padding_bounds_cached(B, L, seqlens, key_padding_mask, q.device)
    seed_t = _seed_tensor(seed, q.device) if dropout_p > 0.0 else None
    if _plain_eager(q, k, v):
        out, _ = _EagerAttention.apply(q, k, v, bounds, kmask, seed_t, float(dropout_p), scale)
    else:
        out, _ = _attention_fwd_op(q, k, v, bounds, kmask, seed_t, float(dropout_p), scale)
    return out
