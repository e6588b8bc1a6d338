"""Argument checks shared by the public ops: one `UserError` that names the argument, the problem and what is
expected, in one format:

    input_ids dtype: expected a 2-D tensor of integer token ids [B, L], got torch.float32 [2, 3]
    attention: k shape: expected a torch.float32 tensor [B, H, L, D] = [1, 1, 8, 16] (q's shape), got ...
    positions device: expected a tensor on cpu (input_ids' device), got one on meta; move it with .to()

Cost. `check_tensor` reads metadata only (type, dtype, rank, shape, device): free, never a host sync.
`check_range` reads VALUES (token ids, labels); reading a CUDA tensor's values on the host would synchronise the
device, so it depends on where the tensor lives:
    CPU tensor, eager                 exact: one aminmax, UserError naming the offending value
    CUDA tensor, or while compiling   torch._assert_async: a few tiny kernels, no sync; a bad value becomes a
                                      device-side assert (RuntimeError) at the next synchronisation
    any other device (meta, ...)      not checked
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

from .errors import UserError

# dtype families for check_tensor(dtypes=...); a tuple of torch dtypes is also accepted
INT = "integer"  # any integer dtype, not bool
INT_OR_BOOL = "integer or bool"
FLOAT = "floating point"

Dtypes = Union[str, Sequence[torch.dtype], None]


def dim_str(d) -> str:
    """A size for a message: "3"; "?" while torch.compile traces (a dynamic size cannot become text there, and the
    messages of checks that pass are built all the same)."""
    return "?" if _compiling() else str(int(d))


def shape_str(shape: Sequence[int]) -> str:
    """(2, 3) -> "[2, 3]" (sizes as `dim_str` writes them)."""
    return "[" + ", ".join(dim_str(d) for d in shape) + "]"


def describe(x) -> str:
    """What an argument is, for a message: "torch.float32 [2, 3]" for a tensor, the type name otherwise."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {shape_str(x.shape)}"
    return type(x).__name__


def _dtype_ok(t: torch.Tensor, dtypes: Dtypes) -> bool:
    dt = t.dtype
    if dtypes is None:
        return True
    if dtypes == INT:
        return not (dt.is_floating_point or dt.is_complex or dt == torch.bool)
    if dtypes == INT_OR_BOOL:
        return not (dt.is_floating_point or dt.is_complex)
    if dtypes == FLOAT:
        return dt.is_floating_point
    return dt in tuple(dtypes)


def _shape_ok(t: torch.Tensor, shape: Optional[Sequence[Optional[int]]]) -> bool:
    if shape is None:
        return True
    return t.dim() == len(shape) and all(s is None or d == s for d, s in zip(t.shape, shape))


def check_tensor(name: str, t, what: str, *, dtypes: Dtypes = None, shape: Optional[Sequence[Optional[int]]] = None,
                 device: Optional[torch.device] = None, device_of: str = "", optional: bool = False,
                 op: str = "") -> Optional[torch.Tensor]:
    """Return `t` if it is a tensor of the given dtype family, shape and device, else raise one UserError

        "[{op}: ]{name} {type|dtype|shape|device}: expected {what}, got {dtype} [{shape}]"

    what: the full expectation in words, e.g. "an integer tensor [B, L] = [2, 5] (input_ids' shape)".
    dtypes: INT, INT_OR_BOOL, FLOAT or a tuple of dtypes (None: any). shape: one int (exact) or None (any) per
    dimension; its length is the rank. device / device_of: where t must be, and which argument fixes that.
    optional: None is allowed (and returned). Reads no values: no host sync.
    """
    pre = f"{op}: {name}" if op else name
    if t is None:
        if optional:
            return None
        raise UserError(f"{pre}: expected {what}, got None")
    if not isinstance(t, torch.Tensor):
        raise UserError(f"{pre} type: expected {what}, got {type(t).__name__}")
    if not _dtype_ok(t, dtypes):
        raise UserError(f"{pre} dtype: expected {what}, got {describe(t)}")
    if not _shape_ok(t, shape):
        raise UserError(f"{pre} shape: expected {what}, got {describe(t)}")
    if device is not None and t.device != torch.device(device):
        where = f" ({device_of}{_possessive(device_of)} device)" if device_of else ""
        raise UserError(f"{pre} device: expected a tensor on {device}{where}, got one on {t.device}; "
                        f"move it with .to({str(device)!r})")
    return t


def _possessive(name: str) -> str:
    return "'" if name.endswith("s") else "'s"


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def check_all(ok: torch.Tensor, message: str) -> None:
    """Every element of the bool tensor `ok` must be True; else UserError(message) on a CPU tensor in eager mode,
    a device-side assert (no sync) on CUDA or while compiling (see the module docstring)."""
    if ok.device.type not in ("cpu", "cuda"):
        return
    if ok.device.type == "cuda" or _compiling():
        torch._assert_async(ok.all(), message)
    elif not bool(ok.all()):
        raise UserError(message)


def check_range(name: str, t: torch.Tensor, lo: int, hi: int, *, what: str = "value", hi_name: str = "",
                ignore: Optional[int] = None, where: Optional[torch.Tensor] = None, hint: str = "",
                op: str = "") -> None:
    """Every value of the integer tensor t must lie in [lo, hi), except entries equal to `ignore` and entries
    where the bool tensor `where` (t's shape) is False. See the module docstring for the cost per device.

    The message on CPU: "[{op}: ]{name}: {what} {v} >= {hi_name} {hi}{hint} (expected ...)" (or "{v} < {lo}"),
    e.g. "input_ids: token id 97 >= vocab_size 97: the tokenizer does not match the model (...)".
    """
    if t.numel() == 0:
        return
    dev = t.device.type
    if dev not in ("cpu", "cuda"):
        return
    compiling = _compiling()
    skip = None if ignore is None else t == ignore
    if where is not None:
        skip = ~where if skip is None else skip | ~where
    x = t if skip is None else t.masked_fill(skip, lo)  # skipped entries read as lo: always valid
    mn, mx = torch.aminmax(x)
    pre = f"{op}: {name}" if op else name
    allowed = f"{what}s in [{lo}, {hi})" + ("" if ignore is None else f" or {ignore}")
    if dev == "cuda" or compiling:
        torch._assert_async((mn >= lo) & (mx < hi), f"{pre}: expected {allowed}{hint}")
        return
    mn, mx = int(mn), int(mx)  # a CPU tensor: no device sync
    if mx >= hi:
        bound = f"{hi_name} {hi}" if hi_name else str(hi)
        raise UserError(f"{pre}: {what} {mx} >= {bound}{hint} (expected {allowed})")
    if mn < lo:
        raise UserError(f"{pre}: {what} {mn} < {lo}{hint} (expected {allowed})")


def is_int(x) -> bool:
    """A Python / numpy integer, not a bool (the checks' notion of an int argument)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


MAX_ROWS = 1 << 32  # mask_select's counter rows row_offset + b are uint32


def check_row_offset(row_offset, batch: int) -> int:
    """mask_select's row_offset: an int that keeps every counter row row_offset + b (b < batch) below 2^32."""
    if not is_int(row_offset) or not (0 <= row_offset and row_offset + max(batch, 1) <= MAX_ROWS):
        raise UserError(f"row_offset={row_offset!r}: expected an int in [0, 2^32 - B] = "
                        f"[0, {MAX_ROWS - max(batch, 1)}] (B = {batch} rows): the index of this call's first row in "
                        "the global batch, e.g. rank * local_batch_size")
    return int(row_offset)


def special_id_list(special_token_ids) -> list[int]:
    """special_token_ids (None, an iterable of ints, or an integer tensor) -> sorted distinct host ints. A CUDA
    tensor is read once (a sync): pass a list on the hot path."""
    if special_token_ids is None:
        return []
    if isinstance(special_token_ids, torch.Tensor):
        t = special_token_ids
        if t.is_floating_point() or t.is_complex():
            raise UserError(f"special_token_ids dtype: expected integer token ids, got {describe(t)}")
        special_token_ids = t.reshape(-1).tolist()
    try:
        return sorted({int(i) for i in special_token_ids})
    except (TypeError, ValueError) as exc:
        raise UserError(f"special_token_ids={special_token_ids!r}: expected an iterable of ints ({exc}), e.g. "
                        "tokenizer.special_token_ids") from None
