"""Reference MLM masking in plain PyTorch: the CPU path and the oracle for the fused CUDA kernel.

`mask_tokens` picks the positions a masked-language model must predict and corrupts them with BERT's
80/10/10 rule; `MaskingOutput` carries the result both densely (`labels` [B, L]) and compactly
(`positions` / `position_labels` [B, P], for a loss that only runs the MLM head on selected positions).

Algorithm (every step is vectorised over the whole batch; no Python loop over rows or positions):

 1. eligible[b, l] = (attention_mask != 0) & ~special                                          (B, L) bool
    special = special_tokens_mask | isin(input_ids, special_token_ids). With neither given, every
    non-pad position is eligible (then [CLS]/[SEP] can be selected: pass one of them).
 2. Selection units. Without word_ids every position is its own unit. With word_ids, the unit is the word:
    rep[b, l] = the first position of the row whose word id equals word_ids[b, l]             (B, L) long
    (a position with word id < 0 is a one-token unit of its own). A unit is stored at its representative
    position r: size[b, r] = number of ELIGIBLE positions of the unit (0 = unit not eligible).
 3. Draw u_sel ~ U[0, 1)                                                                      (B, L) float32
    (the unit key is u_sel at its representative position).
    - mode="bernoulli": unit selected  <=>  size > 0 and u_sel < mlm_probability.
    - mode="exact":     k[b] = floor(p * n_eligible[b] + 0.5), at least 1 when n_eligible[b] > 0.   (B,)
      Sort the eligible units of each row by u_sel (uniform random order), take the longest prefix whose
      cumulative size stays <= k[b], and always the first unit (so >= 1 word when any is eligible).
      Without word_ids every size is 1, so this is exactly k[b] positions drawn without replacement.
      With word_ids the prefix stops at the first word that does not fit (original BERT skips that word
      and tries the next ones; that rule is sequential per row, this one is a cumsum).
 4. selected[b, l] = eligible[b, l] & unit_selected[b, rep[b, l]]                                (B, L) bool
 5. Capacity P = max_predictions (default `default_max_predictions(L, p)`). A row that selected more than
    P positions keeps its P LOWEST positions; the rest are un-selected (label -100, original id kept) and
    counted in num_dropped[b]. The cut may split a word. No write ever goes past slot P - 1.
 6. Draw u_act ~ U[0, 1)                                                                      (B, L) float32
    and, when random_replace_prob > 0, r_idx ~ randint(0, n_allowed)                          (B, L) long
    where allowed = sorted ids of [0, vocab_size) not in special_token_ids. At each selected position:
        u_act <  pm        -> mask_token_id
        u_act <  pm + pr   -> allowed[r_idx]   (may equal the original id: probability 1 / n_allowed)
        otherwise          -> original id kept
    (pm = mask_replace_prob, pr = random_replace_prob). Random replacements avoid special_token_ids only;
    a special_tokens_mask alone cannot tell which ids are special.
 7. labels = original id where selected else -100; positions = selected positions in ascending order
    (slot = running count - 1), position_labels = labels at those positions; unused slots 0 / -100.

RNG: the draws happen in the order u_sel, u_act, r_idx, from `generator`, or a fresh torch.Generator on the
input's device seeded with `seed`, or torch's default generator of that device. Same seed + same input ->
bit-identical output on the same device.

Backends: `backend="auto"` (default) runs the same contract through `mlmfast.ops.mask_select` (the C++ twin on
CPU, the one-launch CUDA kernel on GPU; csrc/) when mlmfast._C is built and supports the arguments, else
this reference; "reference" forces the code below; "kernel" requires mlmfast.ops. The kernel draws from its
own counter-based stream (Philox, keyed by `seed`): statistically, not bitwise, equal to this reference.
A `generator` always selects the reference.

Data parallel (`row_offset`): on the kernel path row b of a call draws as row `row_offset + b` of one global
batch, so ranks that mask their slices of a global batch with the same seed and row_offset = rank * B get the
masks of one call on the whole batch, whatever the split. The reference draws from a torch.Generator in batch
order and cannot do this: backend="reference" (or a generator) with row_offset != 0 is a UserError, and
backend="auto" falling back to the reference (mlmfast._C not built, > 64 special ids, ...) folds row_offset into
the seed (`fold_row_offset`): the parts of a split batch get different draws, but the masks then depend on how
the batch was split.

Validation never synchronises a CUDA device: the id range is checked exactly on CPU tensors and as a
`torch._assert_async` on CUDA tensors (`mlmfast._checks`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from ._checks import INT, INT_OR_BOOL, check_range, check_row_offset, check_tensor, shape_str, special_id_list
from ._checks import is_int as _is_int
from .errors import UserError

IGNORE_INDEX = -100  # label of a position the loss must ignore (torch.nn.functional.cross_entropy default)
MODES = ("bernoulli", "exact")
BACKENDS = ("auto", "reference", "kernel")
CAPACITY_SIGMAS = 6.0  # default capacity margin: mean + 6 binomial sigmas (P(overflow) ~ 1e-9 per row)
CAPACITY_MULTIPLE = 8  # default capacity is rounded up to a multiple of this (but never above L)
DEFAULT_WORD_SPECIALS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]")  # tokens that get word id -1


@dataclass
class MaskingOutput:
    input_ids: torch.Tensor  # (B, L) input dtype: masked copy of the input
    labels: torch.Tensor  # (B, L) int64: original id at selected positions, -100 elsewhere
    positions: torch.Tensor  # (B, P) int64: selected positions, ascending; unused slots 0
    position_labels: torch.Tensor  # (B, P) int64: original ids at `positions`; unused slots -100
    num_selected: torch.Tensor  # (B,) int64: selected positions per row, after the capacity cut
    num_dropped: torch.Tensor  # (B,) int64: positions un-selected by the capacity cut (overflow)

    @property
    def num_overflow(self) -> int:
        """Total positions dropped by the capacity cut over the batch (synchronises; for reporting)."""
        return int(self.num_dropped.sum().item())


def default_max_predictions(seq_len: int, mlm_probability: float = 0.15) -> int:
    """Capacity P of `positions` with a margin for Bernoulli selection.

    P = min(L, roundup8(ceil(p*L + 6*sqrt(L*p*(1-p))) + 1)), and at least 1.
    E.g. p=0.15: L=128 -> 48, L=512 -> 128. Exact mode selects round(p * n_eligible) <= p*L + 0.5 < P
    positions, so it never overflows the default; Bernoulli overflows with probability ~1e-9 per row
    (more with whole-word masking, whose unit count varies more: overflow is then counted in num_dropped).
    """
    seq_len = int(seq_len)
    p = float(mlm_probability)
    if seq_len < 1:
        return 1
    cap = math.ceil(p * seq_len + CAPACITY_SIGMAS * math.sqrt(seq_len * p * (1.0 - p))) + 1
    cap = -(-cap // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
    return max(1, min(seq_len, cap))


def word_ids_from_tokens(
    tokens: Sequence[Sequence[str]], special_tokens: Iterable[str] = DEFAULT_WORD_SPECIALS
) -> torch.Tensor:
    """Word ids for whole-word masking from WordPiece strings: a "##" piece joins the preceding word.

    Returns a LongTensor (B, L_max): word index within its row (0, 1, ...), -1 for `special_tokens`
    ([CLS], [SEP], [PAD], [MASK] by default) and for the padding of ragged rows. A "##" piece with no
    word before it (start of row, or right after a special token) starts a new word.
    """
    specials = set(special_tokens)
    rows = [list(r) for r in tokens]
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, row in enumerate(rows):  # host-side preprocessing over strings, not the masking hot path
        ids, word, prev_is_word = [], -1, False
        for tok in row:
            if tok in specials:
                ids.append(-1)
                prev_is_word = False
                continue
            if not (tok.startswith("##") and prev_is_word):
                word += 1
            ids.append(word)
            prev_is_word = True
        if ids:
            out[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


# ---- validation --------------------------------------------------------------------------------------------
def _check_prob(name: str, value, *, open_interval: bool) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(float(value)):
        raise UserError(f"{name}={value!r} is not a number; pass a float probability")
    value = float(value)
    if open_interval and not (0.0 < value < 1.0):
        raise UserError(f"{name}={value} must be strictly between 0 and 1 (e.g. 0.15)")
    if not open_interval and value < 0.0:
        raise UserError(f"{name}={value} is negative; pass a probability in [0, 1]")
    return value


def _check_same_shape(name: str, t, input_ids: torch.Tensor, dtypes=INT_OR_BOOL) -> Optional[torch.Tensor]:
    """A per-token tensor (B, L) on input_ids' device; a nested list is converted there."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, device=input_ids.device)
    kind = "an integer" if dtypes == INT else "an integer or bool"
    return check_tensor(name, t, f"{kind} tensor [B, L] = {shape_str(input_ids.shape)} (input_ids' shape), one "
                        "entry per token", dtypes=dtypes, shape=tuple(input_ids.shape), device=input_ids.device,
                        device_of="input_ids")


def _kernel_unsupported(input_ids: torch.Tensor, special_ids: list[int], vocab_size: int,
                        generator) -> Optional[str]:
    """None when mlmfast.ops.mask_select runs these arguments on its C++ / CUDA path, else why not."""
    if generator is not None:
        return "a generator was passed (only the reference draws from a torch.Generator)"
    if input_ids.dtype not in (torch.int32, torch.int64):
        return f"input_ids dtype {input_ids.dtype} (the kernel takes int32 / int64)"
    if vocab_size >= 2**31:
        return f"vocab_size={vocab_size} >= 2^31"
    try:
        from . import ops
    except ImportError as exc:  # pragma: no cover - ops ships with the package
        return f"mlmfast.ops unavailable: {exc}"
    if ops.mask_select_backend(input_ids.device) == "torch":
        ext_err = ops.extension_error()
        return f"mlmfast._C not built: {ext_err}" if ext_err else ops._cuda_part_reason() or \
            f"no kernel for device {input_ids.device}"
    if len(special_ids) > 64:
        return "more than 64 distinct special_token_ids"
    return None


def fold_row_offset(seed: int, row_offset: int) -> int:
    """The reference's seed for a call with row_offset != 0 (backend="auto" falling back): a different stream
    for each part of a split batch (it cannot reproduce the kernel's per-row draws)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(row_offset) * 0xBF58476D1CE4E5B9 + 1) % 2**63


# ---- the reference ----------------------------------------------------------------------------------------
def mask_tokens(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    *,
    special_token_ids: Union[Iterable[int], torch.Tensor, None] = None,
    special_tokens_mask: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    word_ids: Optional[torch.Tensor] = None,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    mode: str = "bernoulli",
    max_predictions: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
    row_offset: int = 0,
) -> MaskingOutput:
    """Select MLM targets and corrupt them (BERT 80/10/10); see the module docstring for the algorithm.

    input_ids (B, L) int32/int64 on any device (the work runs there; the input is never modified).
    special_token_ids / special_tokens_mask: which positions are never selected (union of both); with
    neither, every non-pad position is eligible. attention_mask (B, L): 0 = padding, never selected.
    word_ids (B, L): whole-word masking unit (same id >= 0 in a row = one word; -1 = own unit).
    mode: "bernoulli" (each unit w.p. mlm_probability) or "exact" (round(p * n_eligible) tokens per row).
    max_predictions: capacity P of `positions`; overflow keeps the P lowest positions (see num_dropped).
    seed / generator: reproducible randomness (not both); neither -> torch's default RNG.
    backend: "auto" | "reference" | "kernel" (see the module docstring).
    row_offset: index of row 0 in the global batch (kernel path; data parallel: rank * B, with the same seed on
    every rank). Not honoured by the reference: see "Data parallel" in the module docstring.
    """
    # ---- validate --------------------------------------------------------------------------------------
    check_tensor("input_ids", input_ids, "a 2-D torch.Tensor of integer token ids [B, L] (use "
                 "input_ids.unsqueeze(0) for a single sequence)", dtypes=INT, shape=(None, None))
    if not _is_int(vocab_size) or vocab_size < 1:
        raise UserError(f"vocab_size={vocab_size!r} must be a positive int (the model's vocabulary size)")
    if not _is_int(mask_token_id) or not (0 <= mask_token_id < vocab_size):
        raise UserError(
            f"mask_token_id={mask_token_id!r} is outside [0, vocab_size={vocab_size}); "
            "pass the tokenizer's [MASK] id and the model's vocab size"
        )
    p = _check_prob("mlm_probability", mlm_probability, open_interval=True)
    pm = _check_prob("mask_replace_prob", mask_replace_prob, open_interval=False)
    pr = _check_prob("random_replace_prob", random_replace_prob, open_interval=False)
    if pm + pr > 1.0 + 1e-12:
        raise UserError(
            f"mask_replace_prob + random_replace_prob = {pm} + {pr} > 1; the rest (1 - sum) is the "
            "probability of keeping the original token, so the sum must be <= 1 (BERT: 0.8 + 0.1)"
        )
    if mode not in MODES:
        raise UserError(f"mode={mode!r} is not known; use one of {MODES}")
    if backend not in BACKENDS:
        raise UserError(f"backend={backend!r} is not known; use one of {BACKENDS}")
    if seed is not None and generator is not None:
        raise UserError("pass either seed or generator, not both (seed builds a fresh generator)")
    if seed is not None and not _is_int(seed):
        raise UserError(f"seed={seed!r} must be an int (0 is a valid seed)")
    B, L = input_ids.shape
    device = input_ids.device
    row_offset = check_row_offset(row_offset, B)
    if row_offset != 0 and backend == "reference":
        raise UserError(f"row_offset={row_offset}: expected 0 with backend='reference' (it draws from a "
                        "torch.Generator in batch order and cannot honour a row offset); use backend='auto' or "
                        "'kernel' (the counter-based stream)")
    if row_offset != 0 and generator is not None:
        raise UserError(f"row_offset={row_offset}: expected 0 with a generator (a generator selects the reference, "
                        "which draws in batch order and cannot honour a row offset); pass seed= instead")
    if max_predictions is None:
        P = default_max_predictions(L, p)
    elif not _is_int(max_predictions) or max_predictions < 1:
        raise UserError(f"max_predictions={max_predictions!r} must be an int >= 1 (or None for the default)")
    else:
        P = int(max_predictions)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise UserError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if torch.device(generator.device).type != device.type:
            raise UserError(
                f"generator is on {generator.device} but input_ids is on {device}; "
                f"create it with torch.Generator(device={str(device)!r})"
            )
    special_tokens_mask = _check_same_shape("special_tokens_mask", special_tokens_mask, input_ids)
    attention_mask = _check_same_shape("attention_mask", attention_mask, input_ids)
    word_ids = _check_same_shape("word_ids", word_ids, input_ids, dtypes=INT)
    check_range("input_ids", input_ids, 0, vocab_size, what="token id", hi_name="vocab_size",
                hint=": the tokenizer does not match the model; use the model's tokenizer or a model config "
                     "whose vocab_size covers the tokenizer")  # CPU: exact; CUDA: an async device assert
    specials = special_id_list(special_token_ids)  # sorted, distinct, on the host
    if pr > 0.0 and vocab_size - sum(1 for s in specials if 0 <= s < vocab_size) == 0:
        raise UserError(
            f"random_replace_prob={pr} > 0 but every id in [0, {vocab_size}) is in special_token_ids, "
            "so there is no token to draw; set random_replace_prob=0 or fix special_token_ids"
        )

    if backend != "reference":
        why_not = _kernel_unsupported(input_ids, specials, vocab_size, generator)
        if why_not is not None and backend == "kernel":
            raise UserError(f"backend='kernel' cannot run here: {why_not}; use backend='auto' or 'reference'")
        if why_not is None:
            from .ops import mask_select

            if seed is None:  # random by default, as the reference: one draw from torch's default CPU generator
                seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.long).item())
            return mask_select(
                input_ids, mask_token_id=mask_token_id, vocab_size=vocab_size,
                special_token_ids=specials, attention_mask=attention_mask,
                special_tokens_mask=special_tokens_mask, word_ids=None if word_ids is None else word_ids.long(),
                mlm_probability=p, mask_replace_prob=min(pm, 1.0), random_replace_prob=min(pr, 1.0),
                mode=mode, max_predictions=P, seed=int(seed), offset=0, row_offset=row_offset,
            )
        # backend="auto" falls back to the reference here: row_offset is not honoured row by row (module
        # docstring), but it is folded into the seed, so the parts of a split batch are not masked alike
        if seed is not None and row_offset:
            seed = fold_row_offset(int(seed), row_offset)

    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    special_ids = torch.tensor(specials, dtype=torch.long, device=device)  # (S,)
    allowed_ids = None
    if pr > 0.0:
        allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)  # (V,)
        in_range = special_ids[(special_ids >= 0) & (special_ids < vocab_size)]
        allowed[in_range] = False
        allowed_ids = allowed.nonzero().squeeze(1)  # (n_allowed,) sorted ascending

    if L == 0:  # nothing to select; keep the shapes of the contract
        z = torch.zeros(B, dtype=torch.long, device=device)
        return MaskingOutput(input_ids.clone(), torch.empty((B, 0), dtype=torch.long, device=device),
                             torch.zeros((B, P), dtype=torch.long, device=device),
                             torch.full((B, P), IGNORE_INDEX, dtype=torch.long, device=device), z, z.clone())

    ids = input_ids.long()  # (B, L) int64 view of the original ids, for labels / comparisons
    pos = torch.arange(L, device=device).expand(B, L)  # (B, L) position index

    # 1. eligible positions ----------------------------------------------------------------------------
    special = torch.isin(ids, special_ids) if special_ids.numel() else torch.zeros_like(ids, dtype=torch.bool)
    if special_tokens_mask is not None:
        special = special | (special_tokens_mask != 0)
    eligible = ~special  # (B, L) bool
    if attention_mask is not None:
        eligible = eligible & (attention_mask != 0)

    # 2. selection units: representative position rep and eligible size per unit --------------------------
    if word_ids is None:
        rep = pos  # (B, L) every position is its own unit
        size = eligible.long()  # (B, L) 1 at eligible positions
    else:
        wid = word_ids.long()  # (B, L)
        sorted_w, order = torch.sort(wid, dim=1, stable=True)  # (B, L): equal ids adjacent, by position
        start = torch.ones_like(sorted_w, dtype=torch.bool)
        start[:, 1:] = sorted_w[:, 1:] != sorted_w[:, :-1]  # (B, L) first element of each id group
        group_start = torch.where(start, pos, 0).cummax(dim=1).values  # (B, L) sorted index of the group head
        rep_sorted = order.gather(1, group_start)  # (B, L) lowest position of the group (stable sort)
        rep = torch.empty_like(rep_sorted).scatter_(1, order, rep_sorted)  # (B, L) back to position order
        rep = torch.where(wid < 0, pos, rep)  # word id -1: a unit of its own
        size = torch.zeros_like(rep).scatter_add_(1, rep, eligible.long())  # (B, L) eligible pieces per unit

    # 3. unit selection -------------------------------------------------------------------------------------
    u_sel = torch.rand((B, L), generator=generator, device=device)  # (B, L) unit keys
    unit_ok = size > 0  # (B, L) eligible unit, stored at its representative position
    if mode == "bernoulli":
        unit_sel = unit_ok & (u_sel < p)  # (B, L)
    else:
        n_elig = eligible.sum(dim=1)  # (B,)
        k = torch.floor(n_elig.double() * p + 0.5).long()  # (B,) round half up, not half-even
        k = torch.where(n_elig > 0, k.clamp(min=1), k)  # (B,) BERT: at least one prediction
        key = torch.where(unit_ok, u_sel, 2.0)  # (B, L) ineligible units sort last
        order = torch.argsort(key, dim=1, stable=True)  # (B, L) random order of the eligible units
        size_sorted = size.gather(1, order)  # (B, L)
        take = (size_sorted.cumsum(dim=1) <= k[:, None]) & (size_sorted > 0)  # (B, L) prefix within budget
        take[:, 0] = size_sorted[:, 0] > 0  # always the first unit: >= 1 word when any is eligible
        unit_sel = torch.zeros_like(take).scatter_(1, order, take)  # (B, L) back to position order

    # 4. positions of the selected units --------------------------------------------------------------------
    selected = eligible & unit_sel.gather(1, rep)  # (B, L) bool

    # 5. capacity cut: keep the P lowest selected positions of each row --------------------------------------
    rank = selected.long().cumsum(dim=1)  # (B, L) 1-based rank among selected positions
    kept = selected & (rank <= P)  # (B, L)
    num_selected = kept.sum(dim=1)  # (B,)
    num_dropped = selected.sum(dim=1) - num_selected  # (B,)
    selected = kept

    # 6. corruption: one uniform per position decides MASK / random / keep ------------------------------------
    u_act = torch.rand((B, L), generator=generator, device=device)  # (B, L)
    to_mask = selected & (u_act < pm)  # (B, L)
    out = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)  # (B, L) int64
    if allowed_ids is not None:
        r_idx = torch.randint(0, allowed_ids.numel(), (B, L), generator=generator, device=device)  # (B, L)
        to_rand = selected & ~to_mask & (u_act < pm + pr)  # (B, L)
        out = torch.where(to_rand, allowed_ids[r_idx], out)
    out = out.to(input_ids.dtype)

    # 7. dense and compact labels --------------------------------------------------------------------------
    labels = torch.where(selected, ids, IGNORE_INDEX)  # (B, L) int64
    slot = torch.where(selected, rank - 1, P)  # (B, L) in [0, P]; P = scratch column for unselected
    positions = torch.zeros((B, P + 1), dtype=torch.long, device=device)
    positions.scatter_(1, slot, torch.where(selected, pos, 0))  # scratch column absorbs the rest
    positions = positions[:, :P].contiguous()  # (B, P) ascending; never-written slots stay 0
    used = torch.arange(P, device=device)[None, :] < num_selected[:, None]  # (B, P)
    position_labels = torch.where(used, ids.gather(1, positions), IGNORE_INDEX)  # (B, P)

    return MaskingOutput(
        input_ids=out,
        labels=labels,
        positions=positions,
        position_labels=position_labels,
        num_selected=num_selected,
        num_dropped=num_dropped,
    )
