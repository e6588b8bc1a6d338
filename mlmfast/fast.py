"""The fast MLM step's building blocks, shared by `BertForMLM` (path "fast") and `mlmfast.accelerate` (HF models).

    x = embeddings(ids) ─▶ layers 1..n-1: `encoder_layer` (fused attention; the dense ops on the real tokens only
      when the batch is padded enough and their count is known without a sync or a data-dependent shape:
      `unpad_plan`)
      ─▶ pos = `target_positions`
      ─▶ layer n at the predicted positions only (`encoder_layer(queries=pos)`: keys / values from every row)
      ─▶ `compact_rows` (predicted rows first) ─▶ head transform ─▶ `linear_cross_entropy` ─▶ loss

Dispatch (`backend`, one of BACKENDS), decided per call from the tensors, never from a host sync:
    "auto"    CUDA tensors: the Triton attention and linear-CE kernels (when triton is installed).
              CPU tensors: SDPA with an additive padding bias + the chunked PyTorch linear-CE (no interpreter).
    "kernel"  the Triton kernels wherever they can run: CUDA, or CPU under TRITON_INTERPRET=1 (tests).
    "torch"   SDPA + the chunked PyTorch linear-CE on every device.
The last layer always uses SDPA (its queries are fewer than its keys; the Triton kernel wants Lq == Lk).
mask_select (csrc/, C++ twin on CPU, CUDA kernel on GPU) is the trainer's / collator's business, not this file's.

Targets: compact positions / position_labels [B, P] (as `MaskingOutput` gives them; unused slots -100), or
HF-style dense labels [B, L] (-100 = not predicted).
  * static shapes (CUDA tensors, and whenever torch.compile traces): positions are used as they are; dense
    labels make every position a query of the last layer (P = L: no saving there, still exact). The head's rows
    (B*P) are compacted, predicted rows first in row-major order, by a cumsum + scatter (no host sync); their
    number `num_active` stays on the device and the kernels stop there, so the empty tail costs a few idle
    programs, not FLOPs. Empty slots gather a zero row (an out-of-range index) and pass no gradient.
  * exact (CPU tensors, eager): the targets become per-row positions, predicted first, P = the largest count in
    the batch, and `nonzero` picks the predicted rows; on the CPU reading a count is free.
Either way every label != -100 is predicted exactly once: no capacity cut, no silent drop. A label at a padded
position is not supported (the kernel's padded query rows are 0; HF collators never label padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import INT, check_all, check_tensor, dim_str, is_int, shape_str
from .attention import _TRITON_FOUND as _ATTN_TRITON_FOUND
from .attention import attention
from .errors import UserError
from .linear_ce import linear_cross_entropy
from .ops import gather_rows

IGNORE_INDEX = -100
BACKENDS = ("auto", "kernel", "torch")
_ATTN_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ATTN_KERNEL_MAX_HEAD_DIM = 128


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"fast-path backend {backend!r} is not known; use one of {', '.join(BACKENDS)}")
    return backend


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # very old torch
        return False


# ---- attention -----------------------------------------------------------------------------------------------
def use_attention_kernel(x: torch.Tensor, head_dim: int, backend: str) -> bool:
    """Whether `self_attention` calls `mlmfast.attention` (the Triton kernel) rather than SDPA."""
    if backend == "torch":
        return False
    if backend == "auto":
        return (_ATTN_TRITON_FOUND and x.device.type == "cuda" and x.dtype in _ATTN_KERNEL_DTYPES
                and head_dim <= _ATTN_KERNEL_MAX_HEAD_DIM)
    return True  # "kernel": mlmfast.attention (Triton on CUDA / under the interpreter, else its own reference)


def padding_bias(keep: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, L) bool keep-mask -> (B, 1, 1, L) additive bias (0 or the dtype's most negative finite value).

    A finite minimum (not -inf) keeps an all-padding row finite in SDPA, as in the reference model."""
    if keep is None:
        return None
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]


# ---- unpadding -----------------------------------------------------------------------------------------------
UNPAD_MAX_FILL = 0.85  # backend "auto": drop padding from the dense ops when at most this share is real


@dataclass
class Unpadded:
    """The real tokens of a padded (B, L) batch, for running the dense parts of a layer (projections, feed-forward,
    LayerNorm, dropout) on (T, H) rows instead of (B, L, H): with 45% real tokens, 45% of the FLOPs. Attention
    still sees the padded layout (unpack -> attention -> pack)."""

    index: torch.Tensor  # (T,) int64: flat positions b * L + l of the real tokens, ascending
    batch: int
    seq_len: int

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (T, ...) the real tokens, row-major."""
        return x.reshape(self.batch * self.seq_len, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, xt: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, L, ...) with zeros at the padding."""
        out = xt.new_zeros(self.batch * self.seq_len, *xt.shape[1:]).index_copy(0, self.index, xt)
        return out.view(self.batch, self.seq_len, *xt.shape[1:])


def real_token_index(flat: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(T,) int64 flat positions of the True entries of flat (N,) bool, ascending, when the caller knows their
    number T = num_tokens on the host: a stable sort on the device puts them first, so there is no host sync
    (`nonzero` must read the count back). A wrong count is caught on the device (torch._assert_async)."""
    order = torch.sort((~flat).to(torch.uint8), stable=True).indices  # real positions first, in order
    if flat.device.type != "meta" and (flat.device.type != "cpu" or _compiling()):
        torch._assert_async(flat.sum() == num_tokens)
    return order[:num_tokens]


def unpad_plan(keep: Optional[torch.Tensor], backend: str, num_tokens: Optional[int] = None) -> Optional[Unpadded]:
    """An `Unpadded` plan when it pays and costs no device sync: backend "auto" and at most UNPAD_MAX_FILL of the
    positions real. None = run the layers on the padded (B, L, H) layout.

    The number of real positions decides. In eager mode on the CPU it is read from the mask (free; num_tokens, if
    given, must match it). On a GPU reading it would be a device->host sync, and under torch.compile a
    data-dependent shape, so there the plan needs num_tokens, the count that the caller knows on the host
    (counted on the CPU batch before copying it). Under torch.compile num_tokens becomes a dynamic size after the
    second distinct value (dynamo's automatic dynamic shapes): two builds, not one per count. `mlmfast train
    --compile` passes it; the eager trainer does not (in the eager GPU step, bound by the host's launch rate,
    unpadding measured slower on an H200, NOTES.md); the train benchmark measures both (mlmfast-fast-unpad,
    mlmfast-fast-unpad-compile)."""
    if keep is None or backend != "auto":
        return None
    B, L = keep.shape
    flat = keep.reshape(-1)
    if keep.device.type == "cpu" and not _compiling():
        count = int(flat.sum())
        if num_tokens is not None and num_tokens != count:
            raise UserError(f"num_tokens: expected the number of real (non-zero) attention_mask positions, "
                            f"{count}, got {num_tokens}")
        if not unpads(count, B, L):
            return None
        return Unpadded(flat.nonzero().squeeze(1), B, L)
    if num_tokens is None or not unpads(num_tokens, B, L):
        return None
    return Unpadded(real_token_index(flat, num_tokens), B, L)


def unpads(num_tokens: int, batch: int, seq_len: int) -> bool:
    """Whether a batch with num_tokens real positions out of batch * seq_len gets an unpad plan. Callers that
    compile pass num_tokens only then: a value that changes guards a compiled graph, and full (packed) batches,
    passed nothing, never rebuild it."""
    return num_tokens <= UNPAD_MAX_FILL * batch * seq_len


def check_lengths(lengths: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], batch: int,
                  seq_len: int) -> None:
    """lengths: None, or (B,) integers with an attention_mask that is exactly right padding of those lengths
    (exact on CPU; a device assert on CUDA / under torch.compile: no host sync)."""
    if lengths is None:
        return
    if attention_mask is None:
        raise UserError("lengths: pass it with the attention_mask whose right padding it describes (or leave both "
                        "out: no padding)")
    check_tensor("lengths", lengths, f"an integer tensor [B] = [{dim_str(batch)}] of row lengths (right padding)", dtypes=INT,
                 shape=(batch,), device=attention_mask.device, device_of="attention_mask")
    pos = torch.arange(seq_len, device=lengths.device)
    check_all(((attention_mask != 0) == (pos[None, :] < lengths[:, None])).all(dim=1),
              "lengths: the attention_mask is not right padding with these lengths (row b must be real exactly at "
              "positions 0 .. lengths[b]-1); pass the batch's own lengths, or leave lengths out")


def check_num_tokens(num_tokens, batch: int, seq_len: int) -> None:
    """num_tokens: None or an int in [0, B * L] (no tensor: the point is that it is known on the host)."""
    if num_tokens is None:
        return
    if not is_int(num_tokens) or not 0 <= int(num_tokens) <= batch * seq_len:
        raise UserError(f"num_tokens: expected None or a Python int in [0, B * L] = [0, {batch * seq_len}], the "
                        f"number of real attention_mask positions counted on the host, got {num_tokens!r}")


MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")  # per-module


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear (not a subclass such as a LoRA / quantised layer) with no hooks of its own."""
    return type(m) is nn.Linear and not any(getattr(m, h, None) for h in MODULE_HOOKS)


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as _m

    return any(getattr(_m, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                    "_global_backward_hooks", "_global_backward_pre_hooks"))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def project(x: torch.Tensor, *linears: nn.Module,
            post: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> tuple[torch.Tensor, ...]:
    """(lin(x) for lin in linears), as ONE matmul with the weights (and biases) concatenated when they are plain
    nn.Linear layers with the same input size and no hooks (else each module is called, hooks and all). Same
    math; fewer kernels: forward 1 GEMM instead of 3, backward 1 dX GEMM + 1 dW GEMM instead of 3 + 3 and no
    adds of the three dX (the eager GPU step is bound by the host's launch rate, NOTES.md). The parameters stay
    the modules' own: state dicts, optimizers, FSDP2 and HF checkpoints see no change.
    post (a row-wise map, e.g. `Unpadded.unpack`): applied to the fused output before it is split (once), else to
    each module's output."""
    if post is None:  # (not `post or ...`: torch 2.11's dynamo cannot take the truth value of a bound method)
        post = _identity
    if len(linears) < 2 or not all(_plain_linear(m) for m in linears) or _global_module_hooks() or \
            len({m.in_features for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
        return tuple(post(m(x)) for m in linears)
    w = torch.cat([m.weight for m in linears])
    b = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return post(F.linear(x, w, b)).split([m.out_features for m in linears], dim=-1)


def self_attention(x: torch.Tensor, query: nn.Module, key: nn.Module, value: nn.Module, num_heads: int,
                   keep: Optional[torch.Tensor], dropout_p: float, backend: str,
                   scale: Optional[float] = None, unpadded: Optional[Unpadded] = None,
                   seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bidirectional multi-head self-attention of x (B, L, H) with the given projections -> (B, L, H).

    keep (B, L) bool: True = real token (padded keys get no attention); None = no padding. dropout_p: attention
    dropout (pass 0 in eval mode). On the kernel path padded query rows return 0 (SDPA returns finite values);
    either way they reach neither the loss nor any gradient, because no other position attends to them.
    unpadded: x is (T, H), the real tokens of the plan; the projections run on them, attention on the padded
    layout, and the result is (T, H). seqlens (B,): keep is right padding with these lengths (checked by the
    caller): the kernel takes them instead of the mask (no per-key mask loads; full rows run unmasked blocks).
    """
    if unpadded is None:
        B, L, H = x.shape
    else:
        H, B, L = x.shape[1], unpadded.batch, unpadded.seq_len  # x (T, H)
    D = H // num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, nh, L, D)
        return t.view(B, L, num_heads, D).transpose(1, 2)

    # padded layout (unpadded: scattered back once, zeros at the padding): views of one (B, L, 3H) output
    q, k, v = (heads(t) for t in project(x, query, key, value, post=None if unpadded is None else unpadded.unpack))
    if use_attention_kernel(q, D, backend):
        pad = dict(key_padding_mask=keep) if seqlens is None else dict(seqlens=seqlens)
        y = attention(q, k, v, dropout_p=dropout_p, softmax_scale=scale, **pad)  # (B, nh, L, D)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=padding_bias(keep, q.dtype), dropout_p=dropout_p,
                                           scale=scale)  # (B, nh, L, D)
    y = y.transpose(1, 2).reshape(B, L, H)  # (B, L, H)
    return y if unpadded is None else unpadded.pack(y)  # (T, H) unpadded


# ---- row selection --------------------------------------------------------------------------------------------
@dataclass
class SelectedRows:
    hidden: torch.Tensor  # (C, H): the predicted rows first (row-major order), then empty slots (zero rows)
    labels: torch.Tensor  # (C,) int64: targets of the predicted rows, -100 on empty slots
    num_active: Optional[torch.Tensor]  # (1,) int64 on the device: number of predicted rows; None = all C rows


def check_targets(input_ids: torch.Tensor, labels: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                  position_labels: Optional[torch.Tensor]) -> None:
    """Shape / dtype / device checks of the targets (no values read: no host sync). positions and
    position_labels (B, P) come together and take precedence over labels (B, L)."""
    B, L = input_ids.shape
    dev = dict(device=input_ids.device, device_of="input_ids")
    if positions is not None or position_labels is not None:
        if positions is None or position_labels is None:
            missing, given = ("positions", "position_labels") if positions is None else ("position_labels", "positions")
            raise UserError(f"{missing}: expected a tensor [B, P] together with {given} (pass both, as "
                            "MaskingOutput.positions / .position_labels, or HF-style labels), got None")
        check_tensor("positions", positions, f"an integer tensor [B, P] with B = {dim_str(B)} (input_ids' batch size)",
                     dtypes=INT, shape=(B, None), **dev)
        check_tensor("position_labels", position_labels, f"an integer tensor [B, P] = "
                     f"{shape_str(positions.shape)}, the same shape as positions", dtypes=INT,
                     shape=tuple(positions.shape), **dev)
    else:
        check_tensor("labels", labels, f"an integer tensor [B, L] = {shape_str(input_ids.shape)} (input_ids' "
                     f"shape), {IGNORE_INDEX} = not predicted", dtypes=INT, shape=(B, L), optional=True, **dev)


def dense_labels(positions: torch.Tensor, position_labels: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, P) positions + labels -> (B, L) HF-style labels (-100 elsewhere); for the reference path."""
    B = positions.shape[0]
    pos = positions.long()
    ok = (position_labels != IGNORE_INDEX) & (pos >= 0) & (pos < seq_len)
    out = torch.full((B, seq_len + 1), IGNORE_INDEX, dtype=torch.long, device=positions.device)
    out.scatter_(1, torch.where(ok, pos, seq_len), torch.where(ok, position_labels.long(), IGNORE_INDEX))
    return out[:, :seq_len]


def target_positions(batch: int, seq_len: int, device: torch.device, labels: Optional[torch.Tensor] = None,
                     positions: Optional[torch.Tensor] = None, position_labels: Optional[torch.Tensor] = None,
                     exact: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions to predict per row: (pos (B, P) int64, lab (B, P) int64); an empty slot has lab -100 and
    pos = seq_len (out of range: gathers a zero row, gets no gradient).

    static (CUDA / torch.compile): positions are used as they are (P = their width); HF labels (B, L) give
    P = L, pos = 0..L-1, lab = labels. exact (CPU, eager): each row's predicted positions first (in their
    order), P = the largest count in the batch (at least 1; reading it is free on the CPU)."""
    if positions is not None:
        pos, lab = positions.long(), position_labels.long()
        ok = (lab != IGNORE_INDEX) & (pos >= 0) & (pos < seq_len)  # (B, P)
    else:
        lab = labels.long()
        ok = lab != IGNORE_INDEX  # (B, L)
        pos = torch.arange(seq_len, device=device).expand(batch, seq_len)
    if exact is None:
        exact = device.type == "cpu" and not _compiling()
    if exact and ok.numel():
        P = max(1, int(ok.sum(dim=1).max()))
        order = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices[:, :P]  # predicted slots first
        pos, lab, ok = torch.gather(pos, 1, order), torch.gather(lab, 1, order), torch.gather(ok, 1, order)
    return torch.where(ok, pos, seq_len), torch.where(ok, lab, IGNORE_INDEX)


def compact_rows(rows: torch.Tensor, labels: torch.Tensor, exact: Optional[bool] = None) -> SelectedRows:
    """rows (M, H) with labels (M,) -> the labelled rows first (see the module docstring)."""
    M, H = rows.shape
    lab = labels.reshape(-1).long()
    ok = lab != IGNORE_INDEX  # (M,)
    if exact is None:
        exact = rows.device.type == "cpu" and not _compiling()
    if exact:
        keep = ok.nonzero().squeeze(1)  # (N,)
        if keep.shape[0] == M:
            return SelectedRows(rows, lab, None)
        return SelectedRows(rows.index_select(0, keep), lab[keep], None)
    csum = ok.long().cumsum(0)  # (M,) rank + 1 among labelled rows
    n = csum[-1:] if M > 0 else csum.new_zeros((1,))  # (1,)
    slot = torch.arange(M, device=rows.device)
    dest = torch.where(ok, csum - 1, n + (slot - csum))  # stable: labelled rows first, then the rest
    order = torch.empty_like(dest).scatter_(0, dest, slot)  # order[dest[i]] = i
    head = slot < n
    idx = torch.where(head, order, M)  # (M,) empty slots -> out of range -> zero row
    inv = torch.where(ok, dest, M)  # (M,) where each input row went; unlabelled rows get no gradient
    out = _PermuteRows.apply(rows, idx, inv)  # (M, H)
    return SelectedRows(out, torch.where(head, lab[order], IGNORE_INDEX), n)


class _PermuteRows(torch.autograd.Function):
    """out = rows[idx] (zero where idx is out of range), when idx is a partial permutation with inverse inv:
    the backward is then a gather too (grad_rows = grad_out[inv]), not gather_rows' general scatter, which must
    look for duplicate positions (a scan over all M slots per row: M^2 work for one (1, M) gather)."""

    @staticmethod
    def forward(ctx, rows, idx, inv):
        ctx.save_for_backward(inv)
        M, H = rows.shape
        return gather_rows(rows.reshape(1, M, H), idx[None])

    @staticmethod
    def backward(ctx, grad_out):
        (inv,) = ctx.saved_tensors
        M, H = grad_out.shape
        return gather_rows(grad_out.reshape(1, M, H), inv[None]), None, None


def select_rows(hidden: torch.Tensor, labels: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                position_labels: Optional[torch.Tensor] = None, exact: Optional[bool] = None) -> SelectedRows:
    """The rows of hidden (B, L, H) that the MLM head must predict, labelled rows first (module docstring)."""
    B, L, H = hidden.shape
    pos, lab = target_positions(B, L, hidden.device, labels, positions, position_labels, exact)
    rows = gather_rows(hidden, pos)  # (B*P, H)
    return compact_rows(rows, lab.reshape(-1), exact)


# ---- one encoder layer ---------------------------------------------------------------------------------------
def encoder_layer(x: torch.Tensor, attn: nn.Module, num_heads: int, keep: Optional[torch.Tensor],
                  dropout_p: float, backend: str, attn_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  ffn: Callable[[torch.Tensor], torch.Tensor], scale: Optional[float] = None,
                  queries: Optional[torch.Tensor] = None, unpadded: Optional[Unpadded] = None,
                  seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A post-LN BERT layer: x = attn_output(attention(x), x); return ffn(x). attn has .query/.key/.value.
    unpadded (an `unpad_plan`): x is (T, H), the real tokens, and so is the result.

    queries (B, P) positions (out-of-range = empty slot): compute the layer's output only at those positions,
    (B*P, H), with keys and values from every position. Exact: the last layer's output at a position depends on
    the other positions only through their keys and values. This is how the fast path runs the last layer (the
    query projection, attention output and feed-forward block on ~15% of the rows), with SDPA (Lq != Lk).
    """
    if queries is None:
        a = self_attention(x, attn.query, attn.key, attn.value, num_heads, keep, dropout_p, backend, scale,
                           unpadded, seqlens)
        return ffn(attn_output(a, x))  # (B, L, H), or (T, H) unpadded
    if unpadded is not None:
        raise ValueError("the query-rows layer takes the padded layout: unpack before it")
    B, L, H = x.shape
    P = queries.shape[1]
    D = H // num_heads
    xs = gather_rows(x, queries).view(B, P, H)  # (B, P, H) rows at the query positions
    q = attn.query(xs).view(B, P, num_heads, D).transpose(1, 2)  # (B, nh, P, D)
    k, v = (t.view(B, L, num_heads, D).transpose(1, 2) for t in project(x, attn.key, attn.value))  # (B, nh, L, D)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=padding_bias(keep, q.dtype), dropout_p=dropout_p,
                                       scale=scale)  # (B, nh, P, D)
    xs = attn_output(y.transpose(1, 2).reshape(B, P, H), xs)  # (B, P, H)
    return ffn(xs.reshape(B * P, H))  # row-wise: the same as ffn(xs).reshape, but not a view (FSDP2 warns on one)


# ---- the head and the loss ----------------------------------------------------------------------------------
def mlm_head_loss(sel: SelectedRows, transform: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor], backend: str, return_logits: bool = False
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """loss = mean CE of decoder(transform(rows)) over the predicted rows (0.0 without any); logits (N, V) of the
    predicted rows in row-major order only when return_logits (on CUDA that reads their number: a host sync)."""
    h = transform(sel.hidden)  # (C, H)
    loss = linear_cross_entropy(h, weight, bias, sel.labels, num_active=sel.num_active, backend=backend)
    logits = None
    if return_logits:
        live = h if sel.num_active is None else h[sel.labels != IGNORE_INDEX]  # (N, H)
        logits = F.linear(live, weight.to(live.dtype), None if bias is None else bias.to(live.dtype))  # (N, V)
    return loss, logits


__all__ = ["BACKENDS", "SelectedRows", "check_backend", "check_targets", "compact_rows", "dense_labels",
           "encoder_layer", "mlm_head_loss", "padding_bias", "select_rows", "self_attention", "target_positions",
           "use_attention_kernel", "Unpadded", "unpad_plan", "unpads", "UNPAD_MAX_FILL", "project",
           "real_token_index", "check_lengths"]
