"""Fast MLM ops backed by `mlmfast._C`: `mask_select` and `gather_rows`, as torch custom ops.

mask_select (`mlmfast::mask_select`): `mlmfast.masking.mask_tokens`'s semantics with a counter-based
random stream (Philox4x32-10 keyed by `seed`, counter (position, row_offset + row, offset)), in one launch with
static output shapes and no host sync. A row's draws depend only on (seed, offset, row_offset + its index), so
data-parallel ranks that mask rows [k B, (k + 1) B) of a global batch with row_offset = k B get the masks of
one call on the whole batch, however it is split. Three implementations give the same bits for the same
inputs, seed, offset and row_offset:
    CUDA kernel (csrc/mask_select.cu)   CUDA tensors, when the CUDA part of mlmfast._C is built
    C++ twin (csrc/mask_select_cpu.cpp) CPU tensors, OpenMP over rows
    PyTorch twin (`mask_select_torch`)  anything else, and whenever mlmfast._C is missing
The algorithm is written once, in csrc/mask_select.h. Its random stream is not torch's generator, so
`mask_select` is statistically (not bitwise) equal to the reference `mask_tokens` for the same seed.

gather_rows (`mlmfast::gather_rows`, backward `mlmfast::scatter_rows`): hidden [B, L, H] and positions
[B, P] -> [B*P, H]; the backward scatter-adds into [B, L, H]. CUDA kernel with 16-byte vector loads for
fp32/fp16/bf16; index_select / index_add_ elsewhere. A position outside [0, L) reads as a zero row and
receives no gradient on every path (the CUDA kernel cannot raise without a host sync).

Both ops have fake implementations (torch.compile(fullgraph=True) traces through them) and gather_rows has
autograd. `mlmfast info` prints which implementation is active (see `mlmfast.dispatch`).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Union

import torch

from . import dispatch
from ._checks import FLOAT, INT_OR_BOOL, check_row_offset, check_tensor, dim_str, shape_str, special_id_list
from ._checks import is_int as _is_int
from .errors import UserError
from .masking import IGNORE_INDEX, MODES, MaskingOutput, default_max_predictions

__all__ = ["mask_select", "mask_select_torch", "gather_rows", "mask_select_backend", "gather_backend",
           "extension", "extension_error"]

_U32 = 1 << 32
_MASK32 = _U32 - 1
_MAX_OFFSET = 1 << 63
_MAX_VOCAB = 1 << 31
_IDS = (torch.int32, torch.int64)


# ---- the extension ---------------------------------------------------------------------------------------
_EXT_STATE: dict = {}


def extension():
    """The `mlmfast._C` module, or None when it is not built (the reason: `extension_error()`)."""
    if "mod" not in _EXT_STATE:
        try:
            from . import _C  # noqa: PLC0415

            _EXT_STATE["mod"], _EXT_STATE["err"] = _C, None
        except ImportError as exc:
            _EXT_STATE["mod"], _EXT_STATE["err"] = None, f"{type(exc).__name__}: {exc}"
    return _EXT_STATE["mod"]


def extension_error() -> Optional[str]:
    extension()
    return _EXT_STATE["err"]


def _cuda_part_reason() -> Optional[str]:
    ext = extension()
    if ext is None:
        return f"mlmfast._C not built: {extension_error()}"
    if not ext.WITH_CUDA:
        why = getattr(ext, "CUDA_SKIP_REASON", "") or "built without nvcc"
        return f"CUDA part of mlmfast._C not compiled ({why}; rebuild with MLMFAST_CUDA=1)"
    return None


def mask_select_backend(device: Union[torch.device, str]) -> str:
    """Which implementation `mask_select` runs for tensors on `device`: "cuda", "cpp" or "torch"."""
    device = torch.device(device)
    ext = extension()
    if ext is not None and device.type == "cpu":
        return "cpp"
    if ext is not None and device.type == "cuda" and ext.WITH_CUDA:
        return "cuda"
    return "torch"


def gather_backend(device: Union[torch.device, str], dtype: torch.dtype) -> str:
    """Which implementation `gather_rows` runs: "cuda" (kernel) or "torch" (index_select / index_add_)."""
    ext = extension()
    ok = ext is not None and ext.WITH_CUDA and torch.device(device).type == "cuda" and dtype in _GATHER_DTYPES
    return "cuda" if ok else "torch"


def _probe_mask_select_cpu() -> Optional[str]:
    return None if extension() is not None else f"mlmfast._C not built: {extension_error()}"


def _probe_cuda() -> Optional[str]:
    reason = _cuda_part_reason()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


dispatch.register("mask_select[cpu]", "C++ twin of the CUDA kernel (mlmfast._C, OpenMP over rows)",
                  "PyTorch twin (ops.mask_select_torch, same bits)", _probe_mask_select_cpu)
dispatch.register("mask_select[cuda]", "CUDA kernel, one launch, no sync (mlmfast._C)",
                  "PyTorch twin (ops.mask_select_torch, same bits)", _probe_cuda)
dispatch.register("gather_rows[cuda]", "CUDA gather / deterministic scatter-add, 16-byte loads (mlmfast._C)",
                  "index_select / index_add_", _probe_cuda)


# ---- host-side constants of mask_select ------------------------------------------------------------------
def _threshold(prob: float) -> int:
    """Event of probability `prob` as `uniform 32-bit word < threshold`, threshold in [0, 2^32]."""
    return min(_U32, max(0, math.floor(prob * _U32)))


def _n_allowed(specials: list[int], vocab_size: int) -> int:
    return vocab_size - sum(1 for s in specials if 0 <= s < vocab_size)


# ---- the PyTorch twin --------------------------------------------------------------------------------------
_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and int64 b in [0, 2^32), without overflow."""
    bl, bh = b & 0xFFFF, b >> 16
    pl, ph = a * bl, a * bh  # each < 2^48
    lo = (pl + ((ph & 0xFFFF) << 16)) & _MASK32
    hi = (ph + (pl >> 16)) >> 16
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcast); the PyTorch twin of csrc/philox.h."""
    return philox4x32(c0, c1, c2, c3, k0, k1, rounds=10)


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int) -> list[torch.Tensor]:
    """Philox4x32 with `rounds` rounds (Random123's round function and key schedule, as `tl.philox`)."""
    c = torch.broadcast_tensors(*[torch.as_tensor(x, dtype=torch.long) for x in (c0, c1, c2, c3)])
    c0, c1, c2, c3 = (x & _MASK32 for x in c)
    k0, k1 = k0 & _MASK32, k1 & _MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return [c0, c1, c2, c3]


def mask_select_torch(input_ids, attention_mask, lengths, special_tokens_mask, word_ids, special_ids: list[int],
                      mask_token_id: int, vocab_size: int, mlm_probability: float, mask_replace_prob: float,
                      random_replace_prob: float, exact: bool, max_predictions: int, seed: int, offset: int,
                      row_offset: int = 0):
    """csrc/mask_select.h in plain PyTorch (vectorised over the batch): the same bits as the C++ twin and the
    CUDA kernel. Arguments as the `mlmfast::mask_select` op (validated); returns its 6 tensors."""
    B, L = input_ids.shape
    P = max_predictions
    dev = input_ids.device
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, seed >> 32
    off_lo, off_hi = offset & _MASK32, (offset >> 32) & 0x7FFFFFFF
    ids = input_ids.long()  # (B, L)
    pos = torch.arange(L, device=dev).expand(B, L)  # (B, L)
    row = ((torch.arange(B, device=dev) + row_offset) & _MASK32)[:, None].expand(B, L)  # (B, L) counter row

    # eligibility
    elig = torch.ones((B, L), dtype=torch.bool, device=dev)
    if lengths is not None:
        elig &= pos < lengths.long().clamp(0, L)[:, None]
    if attention_mask is not None:
        elig &= attention_mask != 0
    if special_tokens_mask is not None:
        elig &= special_tokens_mask == 0
    if len(special_ids) <= 64:  # comparisons: no host->device copy of the id list
        for s in special_ids:
            elig &= ids != s
    else:
        # built on the CPU and copied without blocking: torch.tensor(..., device=cuda) would be a host sync
        elig &= ~torch.isin(ids, torch.tensor(special_ids, dtype=torch.long).to(dev, non_blocking=True))

    # unit words and keys
    d = philox4x32_10(pos, row, off_lo, off_hi, k0, k1)  # 4 x (B, L)
    u, tag = d[0], pos
    if word_ids is not None:
        w = word_ids.long()
        is_word = w >= 0
        wd = philox4x32_10(w & _MASK32, row, off_lo, off_hi | 0x80000000, k0, k1)[0]
        u = torch.where(is_word, wd, u)
        tag = torch.where(is_word, (w & 0x7FFFFFFF) | 0x80000000, pos)

    # selection
    if not exact:
        sel = elig & (u < _threshold(mlm_probability))
    elif L == 0:
        sel = elig
    else:
        n = elig.sum(dim=1)  # (B,)
        k = torch.floor(n.double() * mlm_probability + 0.5).long()
        k = torch.where(n > 0, k.clamp(min=1), k)
        k = torch.minimum(k, n)
        r = k + 1  # T = the r-th smallest key; r > n -> everything
        skey = (u - (1 << 31)) * _U32 + tag  # (B, L) unit key as an order-preserving signed int64
        big = torch.iinfo(torch.long).max
        sorted_keys = torch.where(elig, skey, big).sort(dim=1).values
        T = sorted_keys.gather(1, (r - 1).clamp(max=L - 1)[:, None])  # (B, 1)
        less = (elig & (skey < T)).sum(dim=1, keepdim=True)  # (B, 1)
        sel = elig & ((r > n)[:, None] | (skey < T) | ((less == 0) & (skey == T)))

    # capacity cut
    rank = sel.long().cumsum(dim=1)  # (B, L) 1-based
    kept = sel & (rank <= P)
    num_selected = kept.sum(dim=1)
    num_dropped = sel.sum(dim=1) - num_selected

    # corruption
    a = d[1]
    to_mask = kept & (a < _threshold(mask_replace_prob))
    to_rand = kept & ~to_mask & (a < _threshold(min(1.0, mask_replace_prob + random_replace_prob)))
    rid = (d[2] * _n_allowed(special_ids, vocab_size)) >> 32  # (B, L) index among the allowed ids
    for s in special_ids:  # the rid-th non-special id: step over the sorted special ids
        if s >= 0:
            rid = rid + (rid >= s).long()
    out = torch.where(to_mask, mask_token_id, torch.where(to_rand, rid, ids)).to(input_ids.dtype)

    labels = torch.where(kept, ids, IGNORE_INDEX)
    slot = torch.where(kept, rank - 1, P)  # (B, L); P = scratch column
    positions = torch.zeros((B, P + 1), dtype=torch.long, device=dev)
    positions.scatter_(1, slot, torch.where(kept, pos, 0))
    positions = positions[:, :P].contiguous()
    used = torch.arange(P, device=dev)[None, :] < num_selected[:, None]
    if L == 0:
        position_labels = torch.full((B, P), IGNORE_INDEX, dtype=torch.long, device=dev)
    else:
        position_labels = torch.where(used, ids.gather(1, positions), IGNORE_INDEX)
    return out, labels, positions, position_labels, num_selected, num_dropped


# ---- the extension path -------------------------------------------------------------------------------------
def _addr(t: Optional[torch.Tensor]) -> tuple[int, int]:
    return (0, 0) if t is None else (t.data_ptr(), t.element_size())


def _mask_select_ext(ext, input_ids, attention_mask, lengths, special_tokens_mask, word_ids, special_ids,
                     mask_token_id, vocab_size, mlm_probability, mask_replace_prob, random_replace_prob, exact,
                     max_predictions, seed, offset, row_offset=0, outputs=None):
    """The C++ twin / CUDA kernel. `outputs`: the 6 contiguous output tensors, preallocated (tests poison
    them and surround them with guard bands); default: fresh ones."""
    B, L = input_ids.shape
    P = max_predictions
    input_ids = input_ids.contiguous()
    attention_mask, lengths, special_tokens_mask, word_ids = (
        None if t is None else t.contiguous() for t in (attention_mask, lengths, special_tokens_mask, word_ids))
    if outputs is None:
        dev = input_ids.device
        outputs = (torch.empty_like(input_ids), torch.empty((B, L), dtype=torch.long, device=dev),
                   torch.empty((B, P), dtype=torch.long, device=dev), torch.empty((B, P), dtype=torch.long, device=dev),
                   torch.empty((B,), dtype=torch.long, device=dev), torch.empty((B,), dtype=torch.long, device=dev))
    out, labels, positions, position_labels, num_selected, num_dropped = outputs
    p = ext.MaskSelectParams()
    p.input_ids, p.ids_size = _addr(input_ids)
    p.attention_mask, p.attention_mask_size = _addr(attention_mask)
    p.lengths, p.lengths_size = _addr(lengths)
    p.special_mask, p.special_mask_size = _addr(special_tokens_mask)
    p.word_ids, p.word_ids_size = _addr(word_ids)
    p.out_ids, p.labels, p.positions = out.data_ptr(), labels.data_ptr(), positions.data_ptr()
    p.position_labels = position_labels.data_ptr()
    p.num_selected, p.num_dropped = num_selected.data_ptr(), num_dropped.data_ptr()
    p.B, p.L, p.P = B, L, P
    p.special_ids = special_ids
    p.mask_token_id, p.vocab_size, p.n_allowed = mask_token_id, vocab_size, _n_allowed(special_ids, vocab_size)
    p.thr_select = _threshold(mlm_probability)
    p.thr_mask = _threshold(mask_replace_prob)
    p.thr_mask_random = _threshold(min(1.0, mask_replace_prob + random_replace_prob))
    p.p_select, p.exact = float(mlm_probability), int(bool(exact))
    p.seed, p.offset, p.row_offset = seed & ((1 << 64) - 1), offset, row_offset
    if input_ids.device.type == "cuda":
        dev = input_ids.device
        ext.mask_select_cuda(p, dev.index, torch.cuda.current_stream(dev).cuda_stream)
    else:
        ext.mask_select_cpu(p)
    return out, labels, positions, position_labels, num_selected, num_dropped


@torch.library.custom_op("mlmfast::mask_select", mutates_args=())
def _mask_select_op(
    input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
    special_tokens_mask: Optional[torch.Tensor], word_ids: Optional[torch.Tensor], special_ids: list[int],
    mask_token_id: int, vocab_size: int, mlm_probability: float, mask_replace_prob: float,
    random_replace_prob: float, exact: bool, max_predictions: int, seed: int, offset: int, row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (input_ids, attention_mask, lengths, special_tokens_mask, word_ids, list(special_ids), mask_token_id,
            vocab_size, mlm_probability, mask_replace_prob, random_replace_prob, exact, max_predictions,
            seed, offset, row_offset)
    backend = mask_select_backend(input_ids.device)
    if backend != "torch" and len(special_ids) <= extension().MAX_SPECIAL_IDS:
        return _mask_select_ext(extension(), *args)
    return mask_select_torch(*args)


@_mask_select_op.register_fake
def _(input_ids, attention_mask, lengths, special_tokens_mask, word_ids, special_ids, mask_token_id, vocab_size,
      mlm_probability, mask_replace_prob, random_replace_prob, exact, max_predictions, seed, offset, row_offset=0):
    B, L = input_ids.shape
    P = max_predictions

    def long(*shape):
        return input_ids.new_empty(shape, dtype=torch.long)

    # contiguous like the real op's (it masks input_ids.contiguous()), whatever input_ids' strides
    return input_ids.new_empty((B, L)), long(B, L), long(B, P), long(B, P), long(B), long(B)


# ---- mask_select: the public function -----------------------------------------------------------------------
def _prob(name: str, value, lo_open: bool) -> float:
    """A probability in [0, 1]; lo_open: in (0, 1] (mlm_probability: 1.0 = every eligible token, as HF allows)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(float(value)):
        raise UserError(f"{name}={value!r} is not a number; pass a float probability")
    value = float(value)
    if lo_open and not (0.0 < value <= 1.0):
        raise UserError(f"{name}={value} must be in (0, 1] (e.g. 0.15)")
    if not lo_open and not (0.0 <= value <= 1.0):
        raise UserError(f"{name}={value} must be a probability in [0, 1]")
    return value


def _check_masks(input_ids: torch.Tensor, attention_mask, lengths, special_tokens_mask, word_ids) -> None:
    """The optional per-token / per-row tensors of mask_select: shape, dtype and device of input_ids."""
    B, L = input_ids.shape
    like = f"[B, L] = {shape_str(input_ids.shape)} (input_ids' shape)"
    dev = dict(device=input_ids.device, device_of="input_ids", optional=True)
    check_tensor("attention_mask", attention_mask, f"an integer or bool tensor {like}, 0 = padding",
                 dtypes=INT_OR_BOOL, shape=(B, L), **dev)
    check_tensor("special_tokens_mask", special_tokens_mask, f"an integer or bool tensor {like}, 1 = special",
                 dtypes=INT_OR_BOOL, shape=(B, L), **dev)
    check_tensor("word_ids", word_ids, f"an int32 or int64 tensor of word ids {like}", dtypes=_IDS,
                 shape=(B, L), **dev)
    check_tensor("lengths", lengths, f"an int32 or int64 tensor [B] = [{dim_str(B)}] of row lengths", dtypes=_IDS,
                 shape=(B,), **dev)


def mask_select(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Union[Iterable[int], torch.Tensor, None] = None,
    attention_mask: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    special_tokens_mask: Optional[torch.Tensor] = None,
    word_ids: Optional[torch.Tensor] = None,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    mode: str = "bernoulli",
    max_predictions: Optional[int] = None,
    seed: int = 0,
    offset: int = 0,
    row_offset: int = 0,
) -> MaskingOutput:
    """Select MLM targets and corrupt them (BERT 80/10/10) in one launch; see the module docstring.

    input_ids (B, L) int32/int64. Padding: attention_mask (B, L) (0 = pad) and/or lengths (B,) (positions
    >= lengths[b] are pad). Never selected: ids in special_token_ids (at most 64 on the kernel path; more
    runs the PyTorch twin) and positions where special_tokens_mask != 0. word_ids (B, L): whole-word units
    (same id >= 0 in a row = one word, < 0 = a unit of its own; ids must be < 2^31). mode "bernoulli" or
    "exact" as in mask_tokens. max_predictions: capacity P (default `default_max_predictions(L, p)`).
    seed (any int, taken mod 2^64) and offset (0 <= offset < 2^63): the random stream; use a new offset for
    each batch (e.g. the step number). row_offset (0 <= row_offset <= 2^32 - B): the index of this call's
    first row in the global batch; row b draws as row row_offset + b. Data parallel: rank k of a global batch
    split into local batches of B rows passes row_offset = k * B (and the same seed and offset on every rank),
    and gets exactly the rows of one call on the whole batch. Ids are not range-checked (that would need a
    sync): an id outside [0, vocab_size) is treated as an ordinary token.
    """
    check_tensor("input_ids", input_ids, "a 2-D torch.Tensor of int32 or int64 token ids [B, L]", dtypes=_IDS,
                 shape=(None, None))
    if not _is_int(vocab_size) or not (1 <= vocab_size < _MAX_VOCAB):
        raise UserError(f"vocab_size={vocab_size!r} must be an int in [1, 2^31)")
    if not _is_int(mask_token_id) or not (0 <= mask_token_id < vocab_size):
        raise UserError(f"mask_token_id={mask_token_id!r} is outside [0, vocab_size={vocab_size})")
    p = _prob("mlm_probability", mlm_probability, lo_open=True)
    pm = _prob("mask_replace_prob", mask_replace_prob, lo_open=False)
    pr = _prob("random_replace_prob", random_replace_prob, lo_open=False)
    if pm + pr > 1.0 + 1e-12:
        raise UserError(f"mask_replace_prob + random_replace_prob = {pm} + {pr} > 1; the sum must be <= 1")
    if mode not in MODES:
        raise UserError(f"mode={mode!r} is not known; use one of {MODES}")
    if not _is_int(seed):
        raise UserError(f"seed={seed!r} must be an int")
    if not _is_int(offset) or not (0 <= offset < _MAX_OFFSET):
        raise UserError(f"offset={offset!r} must be an int in [0, 2^63) (e.g. the step number)")
    B, L = input_ids.shape
    check_row_offset(row_offset, B)
    if max_predictions is None:
        P = default_max_predictions(L, p)
    elif not _is_int(max_predictions) or max_predictions < 1:
        raise UserError(f"max_predictions={max_predictions!r} must be an int >= 1 (or None for the default)")
    else:
        P = int(max_predictions)
    _check_masks(input_ids, attention_mask, lengths, special_tokens_mask, word_ids)
    specials = special_id_list(special_token_ids)
    if pr > 0.0 and _n_allowed(specials, vocab_size) == 0:
        raise UserError(f"random_replace_prob={pr} > 0 but every id in [0, {vocab_size}) is in special_token_ids; "
                        "set random_replace_prob=0 or fix special_token_ids")
    seed = int(seed) & ((1 << 64) - 1)
    seed_i64 = seed - (1 << 64) if seed >= (1 << 63) else seed  # the op schema's int is int64
    out = _mask_select_op(input_ids, attention_mask, lengths, special_tokens_mask, word_ids, specials,
                          int(mask_token_id), int(vocab_size), p, pm, pr, mode == "exact", P, seed_i64, int(offset),
                          int(row_offset))
    return MaskingOutput(*out)


# ---- gather_rows -------------------------------------------------------------------------------------------
_GATHER_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _flat_index(positions: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*P,) row index into hidden.view(B*L, H) (invalid -> B*L, a scratch row) and the (B*P,) valid mask."""
    B = positions.shape[0]
    pos = positions.long()
    valid = (pos >= 0) & (pos < L)  # (B, P)
    base = torch.arange(B, device=pos.device)[:, None] * L
    idx = torch.where(valid, pos + base, B * L)
    return idx.reshape(-1), valid.reshape(-1)


def _gather_torch(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    B, L, H = hidden.shape
    idx, valid = _flat_index(positions, L)
    out = hidden.reshape(B * L, H).index_select(0, torch.where(valid, idx, 0))  # (B*P, H)
    return out.masked_fill_(~valid[:, None], 0)


def _scatter_torch(grad: torch.Tensor, positions: torch.Tensor, L: int) -> torch.Tensor:
    B = positions.shape[0]
    H = grad.shape[1]
    idx, _ = _flat_index(positions, L)
    acc_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    acc = torch.zeros((B * L + 1, H), dtype=acc_dtype, device=grad.device)
    acc.index_add_(0, idx, grad.to(acc_dtype))  # float32 sums, one rounding (as the CUDA kernel)
    return acc[: B * L].to(grad.dtype).reshape(B, L, H)


def _cuda_gather_ok(t: torch.Tensor) -> bool:
    return gather_backend(t.device, t.dtype) == "cuda"


@torch.library.custom_op("mlmfast::gather_rows", mutates_args=())
def _gather_rows_op(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    B, L, H = hidden.shape
    P = positions.shape[1]
    if not _cuda_gather_ok(hidden):
        return _gather_torch(hidden, positions)
    hidden, positions = hidden.contiguous(), positions.contiguous()
    out = torch.empty((B * P, H), dtype=hidden.dtype, device=hidden.device)
    dev = hidden.device
    extension().gather_rows_cuda(hidden.data_ptr(), positions.data_ptr(), out.data_ptr(), B, L, P, H,
                                 _GATHER_DTYPES[hidden.dtype], positions.element_size(), dev.index,
                                 torch.cuda.current_stream(dev).cuda_stream)
    return out


@_gather_rows_op.register_fake
def _(hidden, positions):
    return hidden.new_empty((positions.shape[0] * positions.shape[1], hidden.shape[2]))


@torch.library.custom_op("mlmfast::scatter_rows", mutates_args=())
def _scatter_rows_op(grad: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    B, P = positions.shape
    H = grad.shape[1]
    if not _cuda_gather_ok(grad):
        return _scatter_torch(grad, positions, seq_len)
    grad, positions = grad.contiguous(), positions.contiguous()
    out = torch.empty((B, seq_len, H), dtype=grad.dtype, device=grad.device)
    dev = grad.device
    extension().scatter_rows_cuda(grad.data_ptr(), positions.data_ptr(), out.data_ptr(), B, seq_len, P, H,
                                  _GATHER_DTYPES[grad.dtype], positions.element_size(), dev.index,
                                  torch.cuda.current_stream(dev).cuda_stream)
    return out


@_scatter_rows_op.register_fake
def _(grad, positions, seq_len):
    return grad.new_empty((positions.shape[0], seq_len, grad.shape[1]))


def _gather_setup(ctx, inputs, output):
    hidden, positions = inputs
    ctx.save_for_backward(positions)
    ctx.seq_len = hidden.shape[1]


def _gather_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return _scatter_rows_op(grad, positions, ctx.seq_len), None


def _scatter_setup(ctx, inputs, output):
    _, positions, _ = inputs
    ctx.save_for_backward(positions)


def _scatter_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return _gather_rows_op(grad, positions), None, None


_gather_rows_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_rows_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, H) float, positions (B, P) int -> (B*P, H): row b*P + j is hidden[b, positions[b, j]].

    Differentiable in hidden (backward: a deterministic scatter-add into (B, L, H)). A position outside
    [0, L) gives a zero row and no gradient (not checked: that would need a host sync).
    """
    check_tensor("hidden", hidden, "a float tensor [B, L, H] (the encoder output)", dtypes=FLOAT,
                 shape=(None, None, None))
    B = hidden.shape[0]
    check_tensor("positions", positions, f"an int32 or int64 tensor [B, P] with B = {dim_str(B)} (hidden's batch size), "
                 "e.g. MaskingOutput.positions", dtypes=_IDS, shape=(B, None), device=hidden.device,
                 device_of="hidden")
    return _gather_rows_op(hidden, positions)
