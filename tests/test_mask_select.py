"""Tests of mask_select (mlmfast/ops.py, csrc/): the C++ twin, the PyTorch twin and (with -m gpu) the CUDA kernel.

- the three implementations give the same bits (property tests over awkward shapes: L = 1, B = 1, all-padding
  rows, all-special rows, capacity smaller than needed);
- the reference's statistics (selection rate, 80/10/10, random ids, exact counts, whole words) hold for the
  twin, on >= 100k eligible tokens with 5-sigma binomial bounds;
- the op contract: validation (UserError), fake implementation (opcheck, torch.compile(fullgraph=True)),
  the fallback when mlmfast._C is missing, the dispatch status;
- GPU: the CUDA kernel equals the twin bit for bit, and runs without a host sync.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from _mlm_batches import MASK, VOCAB, binomial_ok, mlm_batch
from _mlm_batches import SPECIAL as SPECIAL_IDS
from mlmfast import dispatch, ops
from mlmfast.errors import UserError
from mlmfast.masking import IGNORE_INDEX, MaskingOutput, default_max_predictions, mask_tokens

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # e.g. the GPU machine: the same property tests over seeded random draws
    import functools
    import random
    import types

    def _bounded(lo, hi):  # like hypothesis, favour the bounds
        return lambda r: r.choice([lo, hi]) if r.random() < 0.25 else r.randint(lo, hi)

    st = types.SimpleNamespace(
        integers=_bounded,
        booleans=lambda: (lambda r: r.random() < 0.5),
        sampled_from=lambda xs: (lambda r: r.choice(list(xs))),
        lists=lambda elem, min_size, max_size: (lambda r: [elem(r) for _ in range(r.randint(min_size, max_size))]),
        composite=lambda f: (lambda: (lambda r: f(lambda strat: strat(r)))),
    )

    def given(strategy, examples: int = 60):
        def deco(test):
            @functools.wraps(test)
            def run(*a, **k):
                for i in range(examples):
                    test(*a, strategy(random.Random(i)), **k)
            run.__signature__ = inspect.Signature(list(inspect.signature(test).parameters.values())[:-1])
            return run
        return deco

TOL = {
    "sigmas": 5.0,  # binomial bounds
    "stat_batch": 1200,  # rows of the statistics batch
    "stat_len": 128,  # row length (>= 100k eligible tokens in all)
    "min_eligible": 100_000,
}
SPECIAL = list(SPECIAL_IDS)  # a list: some tests extend it
FIELDS = ("input_ids", "labels", "positions", "position_labels", "num_selected", "num_dropped")

needs_ext = pytest.mark.skipif(ops.extension() is None, reason=f"mlmfast._C not built: {ops.extension_error()}")


def _binomial_ok(count: int, n: int, p: float) -> bool:
    return binomial_ok(count, n, p, TOL["sigmas"])


def _op_args(ids, attn=None, lengths=None, stm=None, wid=None, specials=SPECIAL, mask_id=MASK, vocab=VOCAB,
             p=0.15, pm=0.8, pr=0.1, exact=False, P=None, seed=0, offset=0):
    P = default_max_predictions(ids.shape[1], p) if P is None else P
    return (ids, attn, lengths, stm, wid, sorted(set(specials)), mask_id, vocab, p, pm, pr, exact, P, seed, offset)


def _run_cpp(*args):
    return MaskingOutput(*ops._mask_select_ext(ops.extension(), *args))


GUARD = 64  # elements of poison before and after every output
POISON = 0x5A5A5A5A5A5A5A5A  # any element the kernel forgets to write keeps this value


def _run_guarded(*args):
    """The C++ twin / CUDA kernel writing into poisoned outputs inside poisoned guard bands: every element
    must be written (else it differs from the PyTorch twin) and nothing outside may be (checked here)."""
    ids = args[0]
    B, L = ids.shape
    P = args[12]
    bufs, outs = [], []
    for shape, dtype in [((B, L), ids.dtype), ((B, L), torch.long), ((B, P), torch.long), ((B, P), torch.long),
                         ((B,), torch.long), ((B,), torch.long)]:
        n = math.prod(shape)
        poison = POISON if dtype == torch.long else 0x5A5A5A5A
        buf = torch.full((n + 2 * GUARD,), poison, dtype=dtype, device=ids.device)
        bufs.append((buf, n, poison))
        outs.append(buf[GUARD:GUARD + n].view(shape))
    res = MaskingOutput(*ops._mask_select_ext(ops.extension(), *args, outputs=tuple(outs)))
    for buf, n, poison in bufs:
        assert (buf[:GUARD] == poison).all() and (buf[GUARD + n:] == poison).all(), "write out of bounds"
    return res


def _run_torch(*args):
    return MaskingOutput(*ops.mask_select_torch(*args))


def _assert_same(a: MaskingOutput, b: MaskingOutput, what=""):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, (what, f, x.dtype, y.dtype, x.shape, y.shape)
        assert torch.equal(x.cpu(), y.cpu()), (what, f, x, y)


def _check_invariants(out: MaskingOutput, ids, eligible, P: int, specials, mask_id: int):
    """Every output tells the same story, and nothing ineligible or out of bounds happened."""
    B, L = ids.shape
    ids = ids.long()
    assert out.input_ids.dtype == ids.dtype or out.input_ids.dtype == torch.int32
    assert out.positions.shape == (B, P) and out.position_labels.shape == (B, P)
    sel = out.labels != IGNORE_INDEX
    assert not (sel & ~eligible).any(), "selected an ineligible position"
    assert torch.equal(out.labels[sel], ids[sel])
    assert torch.equal(sel.sum(1), out.num_selected)
    assert (out.num_selected <= P).all() and (out.num_dropped >= 0).all()
    assert ((out.num_dropped == 0) | (out.num_selected == P)).all(), "dropped positions while slots were free"
    changed = out.input_ids.long() != ids
    assert not (changed & ~sel).any(), "changed an unselected position"
    special = torch.tensor(sorted(set(specials)), dtype=torch.long)
    new = out.input_ids.long()[changed]
    assert not (torch.isin(new, special) & (new != mask_id)).any(), "random replacement with a special id"
    for b in range(B):
        n = int(out.num_selected[b])
        pos = out.positions[b, :n]
        assert torch.equal(pos, torch.nonzero(sel[b]).flatten()), "positions are not the selected ones, ascending"
        assert torch.equal(out.position_labels[b, :n], ids[b, pos])
        assert (out.positions[b, n:] == 0).all() and (out.position_labels[b, n:] == IGNORE_INDEX).all()


def _eligible(ids, attn=None, lengths=None, stm=None, specials=SPECIAL):
    B, L = ids.shape
    e = ~torch.isin(ids.long(), torch.tensor(sorted(set(specials)) or [-(1 << 40)], dtype=torch.long))
    if attn is not None:
        e &= attn != 0
    if lengths is not None:
        e &= torch.arange(L)[None, :] < lengths.long()[:, None]
    if stm is not None:
        e &= stm == 0
    return e


# ---- Philox --------------------------------------------------------------------------------------------------
KAT = [  # Random123 known-answer vectors for Philox4x32-10: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    got = [int(w) for w in ops.philox4x32_10(*ctr, *key)]
    assert tuple(got) == want
    if ops.extension() is not None:
        assert tuple(ops.extension().philox4x32_10(*ctr, *key)) == want


# ---- the twins agree bit for bit (property tests) ---------------------------------------------------------------
@st.composite
def cases(draw):
    B = draw(st.integers(1, 5))
    L = draw(st.integers(1, 70))
    vocab = draw(st.integers(2, 40))
    n_special = draw(st.integers(0, min(6, vocab - 1)))
    specials = draw(st.lists(st.integers(-3, vocab + 3), min_size=n_special, max_size=n_special))
    mask_id = draw(st.integers(0, vocab - 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    ids = torch.randint(0, vocab, (B, L), generator=g)
    if draw(st.booleans()) and specials:  # an all-special row
        ids[0] = specials[0] if 0 <= specials[0] < vocab else ids[0]
    kind = draw(st.sampled_from(["none", "attn", "lengths", "both"]))
    attn = lengths = None
    if kind in ("attn", "both"):
        attn = (torch.rand((B, L), generator=g) < 0.8).to(draw(st.sampled_from([torch.long, torch.bool, torch.int32])))
        if draw(st.booleans()):
            attn[-1] = 0  # an all-padding row
    if kind in ("lengths", "both"):
        lengths = torch.randint(-1, L + 2, (B,), generator=g).to(draw(st.sampled_from([torch.long, torch.int32])))
    stm = (torch.rand((B, L), generator=g) < 0.1).to(torch.uint8) if draw(st.booleans()) else None
    wid = None
    wkind = draw(st.sampled_from(["none", "runs", "scattered"]))
    if wkind == "runs":  # WordPiece-like: consecutive pieces share an id, -1 for specials
        starts = torch.rand((B, L), generator=g) < 0.6
        wid = starts.long().cumsum(1) - 1
        wid[torch.rand((B, L), generator=g) < 0.1] = -1
    elif wkind == "scattered":  # the same id anywhere in the row (still one word)
        wid = torch.randint(-2, max(2, L // 3), (B, L), generator=g)
    if wid is not None and draw(st.booleans()):
        wid = wid.int()
    pm = draw(st.sampled_from([0.0, 0.8, 0.5, 1.0]))
    pr = draw(st.sampled_from([0.0, 0.1, round(1.0 - pm, 6)]))
    if pr > 0 and vocab - len({s for s in specials if 0 <= s < vocab}) == 0:
        pr = 0.0
    p = draw(st.sampled_from([0.15, 0.5, 0.01, 0.99]))
    exact = draw(st.booleans())
    P = draw(st.integers(1, L + 3))
    seed = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.integers(0, 2**63 - 1))
    if draw(st.booleans()):
        ids = ids.int()
    args = _op_args(ids, attn, lengths, stm, wid, specials, mask_id, vocab, p, pm, pr, exact, P,
                    seed - (1 << 64) if seed >= 1 << 63 else seed, offset)
    return args


@needs_ext
@given(cases())
def test_cpp_twin_equals_torch_twin(args):
    ids, attn, lengths, stm, wid, specials, mask_id, _, _, _, _, _, P, _, _ = args
    a, b = _run_guarded(*args), _run_torch(*args)
    _assert_same(a, b)
    _check_invariants(a, ids, _eligible(ids, attn, lengths, stm, specials), P, specials, mask_id)


@given(cases())
def test_capacity_keeps_lowest_positions(args):
    """A smaller P keeps a prefix of the larger P's selection, with the same corruption; never writes past P."""
    args = list(args)
    ids = args[0]
    L = ids.shape[1]
    args[12] = L
    full = (_run_cpp if ops.extension() is not None else _run_torch)(*args)
    assert (full.num_dropped == 0).all()
    P = max(1, int(full.num_selected.max()) - 1)
    args[12] = P
    cut = (_run_cpp if ops.extension() is not None else _run_torch)(*args)
    assert torch.equal(cut.num_selected, full.num_selected.clamp(max=P))
    assert torch.equal(cut.num_dropped, full.num_selected - cut.num_selected)
    assert torch.equal(cut.positions, torch.where(cut.position_labels == IGNORE_INDEX, 0, full.positions[:, :P]))
    kept = cut.labels != IGNORE_INDEX
    assert torch.equal(cut.input_ids[kept], full.input_ids[kept])
    assert torch.equal(cut.input_ids[~kept], ids[~kept])


@needs_ext
@pytest.mark.parametrize("B,L", [(1, 1), (1, 2), (3, 1), (2, 17), (1, 127), (2, 129), (2, 1500)])
@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_twins_awkward_shapes(B, L, mode):
    ids, attn = mlm_batch(B, L, seed=B * 1000 + L)
    for wid in (None, torch.arange(L).expand(B, L) // 3):
        args = _op_args(ids, attn, wid=wid, exact=mode == "exact", seed=L, offset=B)
        _assert_same(_run_cpp(*args), _run_torch(*args), (B, L, mode))


@needs_ext
@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_probability_one_selects_every_eligible_token(mode):
    """mlm_probability = 1.0 (HF's collator accepts it): every eligible token selected, by both twins alike
    (the kernels' take-all case), whole words too; corruption still 80/10/10."""
    ids, attn = mlm_batch(3, 129, seed=11)
    for wid in (None, torch.arange(129).expand(3, 129) // 4):
        args = _op_args(ids, attn, wid=wid, p=1.0, exact=mode == "exact", P=129, seed=5)
        a = _run_cpp(*args)
        _assert_same(a, _run_torch(*args), mode)
        elig = _eligible(ids, attn)
        assert torch.equal(a.labels != IGNORE_INDEX, elig) and torch.equal(a.labels[elig], ids.long()[elig])
        assert (a.num_dropped == 0).all()


@needs_ext
def test_twins_many_special_ids_and_zeromlm_batch():
    ids, attn = mlm_batch(4, 40, seed=3)
    specials = SPECIAL + list(range(10, 80))  # > 64: the op runs the PyTorch twin, same semantics
    out = ops.mask_select(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=specials,
                          attention_mask=attn, seed=1)
    _check_invariants(out, ids, _eligible(ids, attn, specials=specials), out.positions.shape[1], specials, MASK)
    empty = torch.empty((0, 9), dtype=torch.long)
    for run in (_run_cpp, _run_torch):
        o = run(*_op_args(empty, P=4))
        assert o.positions.shape == (0, 4) and o.num_selected.shape == (0,)
    for run in (_run_cpp, _run_torch):
        o = run(*_op_args(torch.empty((3, 0), dtype=torch.long), P=2))
        assert o.labels.shape == (3, 0) and (o.positions == 0).all() and (o.position_labels == -100).all()


# ---- seed and offset ------------------------------------------------------------------------------------------
def test_seed_offset_reproducible_and_fresh():
    ids, attn = mlm_batch(16, 64, seed=0)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=attn)
    a = ops.mask_select(ids, seed=5, offset=0, **kw)
    _assert_same(a, ops.mask_select(ids, seed=5, offset=0, **kw))
    assert not torch.equal(a.labels, ops.mask_select(ids, seed=5, offset=1, **kw).labels)
    assert not torch.equal(a.labels, ops.mask_select(ids, seed=6, offset=0, **kw).labels)
    big = ops.mask_select(ids, seed=2**64 + 5, offset=0, **kw)  # seeds are taken mod 2^64
    _assert_same(a, big)
    neg = ops.mask_select(ids, seed=-1, **kw)  # -1 == 2^64 - 1
    _assert_same(neg, ops.mask_select(ids, seed=2**64 - 1, **kw))
    # a row's draws depend on (row index, position), not on the other rows
    sub = ops.mask_select(ids[:4], seed=5, offset=0, attention_mask=attn[:4], mask_token_id=MASK,
                          vocab_size=VOCAB, special_token_ids=SPECIAL)
    assert torch.equal(sub.labels, a.labels[:4])


# ---- row_offset: masks independent of how a global batch is split across ranks -------------------------------
def _with_rows(args, rows: slice, row_offset: int):
    """The op arguments of `args` restricted to the batch rows `rows`, drawing from counter row row_offset."""
    a = list(args[:15])
    for i in range(5):  # input_ids, attention_mask, lengths, special_tokens_mask, word_ids
        if a[i] is not None:
            a[i] = a[i][rows]
    return tuple(a) + (row_offset,)


def _assert_concat(full: MaskingOutput, parts, what=""):
    for f in FIELDS:
        assert torch.equal(getattr(full, f), torch.cat([getattr(p, f) for p in parts])), (what, f)


@st.composite
def split_cases(draw):
    args = draw(cases())
    B = args[0].shape[0]
    cut = draw(st.integers(0, B))  # the first rank gets rows [0, cut), the second [cut, B)
    base = draw(st.sampled_from([0, 1, 2**31 - 7, 2**32 - B]))  # row_offset of the whole batch
    return args, cut, base


@given(split_cases())
def test_row_offset_split_invariant_twins(case):
    """Rows [0, B) at row_offset r == rows [0, c) at r ++ rows [c, B) at r + c, on the C++ and the PyTorch twin,
    over the awkward cases of `cases()` (both modes, word ids or not, capacity cuts, int32/int64)."""
    args, cut, base = case
    B = args[0].shape[0]
    runs = [_run_torch] + ([_run_cpp] if ops.extension() is not None else [])
    outs = []
    for run in runs:
        full = run(*_with_rows(args, slice(0, B), base))
        parts = run(*_with_rows(args, slice(0, cut), base)), run(*_with_rows(args, slice(cut, B), base + cut))
        _assert_concat(full, parts, (run.__name__, B, cut, base))
        outs.append(full)
    for o in outs[1:]:
        _assert_same(outs[0], o, "C++ twin == PyTorch twin at a row_offset")


def _halves_kw(ids, attn, wid, rows):
    return dict(attention_mask=attn[rows], word_ids=None if wid is None else wid[rows])


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
@pytest.mark.parametrize("whole_word", [False, True])
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_row_offset_halves_public_api(mode, whole_word, impl, monkeypatch):
    """mask_select and mask_tokens on a [2B, L] batch == its halves at row_offset 0 and B (data parallel)."""
    if impl == "cpp" and ops.extension() is None:
        pytest.skip(f"mlmfast._C not built: {ops.extension_error()}")
    if impl == "torch":
        monkeypatch.setattr(ops, "_EXT_STATE", {"mod": None, "err": "ImportError: simulated"})
    for B, L in [(1, 1), (3, 17), (4, 129), (16, 40)]:
        ids, attn = mlm_batch(2 * B, L, seed=B * 100 + L)
        wid = (torch.arange(L).expand(2 * B, L) // 3).contiguous() if whole_word else None
        kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, mode=mode, seed=L + 3)
        top, bottom = slice(0, B), slice(B, 2 * B)
        full = ops.mask_select(ids, offset=4, **kw, **_halves_kw(ids, attn, wid, slice(None)))
        parts = (ops.mask_select(ids[top], offset=4, row_offset=0, **kw, **_halves_kw(ids, attn, wid, top)),
                 ops.mask_select(ids[bottom], offset=4, row_offset=B, **kw, **_halves_kw(ids, attn, wid, bottom)))
        _assert_concat(full, parts, ("mask_select", impl, B, L))
        if impl == "cpp":  # mask_tokens: the kernel path honours row_offset
            full = mask_tokens(ids, **kw, **_halves_kw(ids, attn, wid, slice(None)))
            parts = (mask_tokens(ids[top], **kw, **_halves_kw(ids, attn, wid, top)),
                     mask_tokens(ids[bottom], row_offset=B, backend="kernel", **kw,
                                 **_halves_kw(ids, attn, wid, bottom)))
            _assert_concat(full, parts, ("mask_tokens", B, L))
            if B * L >= 64:  # and a row_offset changes the draws (the halves are not masked alike)
                assert not torch.equal(parts[1].labels, mask_tokens(ids[bottom], **kw,
                                                                     **_halves_kw(ids, attn, wid, bottom)).labels)


def test_row_offset_zero_keeps_the_old_bits():
    """Known answers of the PyTorch twin before row_offset existed (commit b776641): the default is unchanged."""
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 3], [2, 20, 21, 22, 23, 24, 25, 26, 27, 28, 3, 0]])
    attn = (ids != 0).long()
    wid = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, 3, 4, 5, 5, -1], [-1, 0, 1, 1, 2, 3, 4, 4, 5, 6, -1, -1]])
    per_pos = [[2, 4, 11, 21, 13, 14, 11, 16, 17, 18, 4, 3], [2, 20, 4, 22, 23, 4, 4, 26, 27, 28, 3, 0]]
    per_word = [[2, 10, 11, 12, 31, 14, 11, 16, 46, 18, 19, 3], [2, 20, 4, 4, 23, 4, 25, 26, 27, 4, 3, 0]]
    want = {  # (exact, whole word) -> (masked ids, positions)
        (False, False): (per_pos, [[1, 3, 6, 10, 0, 0, 0, 0], [2, 4, 5, 6, 7, 0, 0, 0]]),
        (False, True): (per_word, [[4, 5, 6, 8, 0, 0, 0, 0], [2, 3, 4, 5, 9, 0, 0, 0]]),
        (True, False): (per_pos, [[1, 3, 6, 7, 10, 0, 0, 0], [2, 4, 5, 6, 7, 0, 0, 0]]),
        (True, True): (per_word, [[4, 5, 6, 8, 0, 0, 0, 0], [2, 3, 4, 5, 9, 0, 0, 0]]),
    }
    runs = [_run_torch] + ([_run_cpp] if ops.extension() is not None else [])
    for (exact, whole_word), (masked, positions) in want.items():
        args = _op_args(ids, attn, wid=wid if whole_word else None, p=0.5, pm=0.5, pr=0.3, exact=exact, P=8,
                        seed=1234, offset=99)
        for run in runs:
            for a in (args, args + (0,)):  # row_offset left out, and given as 0
                out = run(*a)
                assert out.input_ids.tolist() == masked and out.positions.tolist() == positions, (run, exact)


def test_row_offset_errors(monkeypatch):
    ids, attn = mlm_batch(4, 8, seed=0)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=attn)
    for bad in (-1, 2**32 - 3, 2**32, 1.0, True, "1", None):
        with pytest.raises(UserError, match="row_offset"):
            ops.mask_select(ids, row_offset=bad, **kw)
        with pytest.raises(UserError, match="row_offset"):
            mask_tokens(ids, row_offset=bad, seed=0, **kw)
    ops.mask_select(ids, row_offset=2**32 - 4, **kw)  # the last rows: 2^32 - 4 .. 2^32 - 1
    with pytest.raises(UserError, match="row_offset.*reference"):
        mask_tokens(ids, row_offset=4, seed=0, backend="reference", **kw)
    with pytest.raises(UserError, match="row_offset.*generator"):
        mask_tokens(ids, row_offset=4, generator=torch.Generator(), **kw)
    # auto without a kernel: the reference, row_offset folded into the seed (documented): parts of a split batch
    # are not masked alike, though not row by row as the kernel does
    from mlmfast.masking import fold_row_offset

    monkeypatch.setattr(ops, "_EXT_STATE", {"mod": None, "err": "ImportError: simulated"})
    got = mask_tokens(ids, row_offset=4, seed=0, **kw)
    _assert_same(got, mask_tokens(ids, seed=fold_row_offset(0, 4), backend="reference", **kw))
    assert not torch.equal(got.labels, mask_tokens(ids, seed=0, backend="reference", **kw).labels)
    _assert_same(mask_tokens(ids, row_offset=0, seed=0, **kw), mask_tokens(ids, seed=0, backend="reference", **kw))


# ---- statistics: the twin behaves like the reference --------------------------------------------------------
def _statmlm_batch():
    ids, attn = mlm_batch(TOL["stat_batch"], TOL["stat_len"], seed=11)
    n_elig = int(_eligible(ids, attn).sum())
    assert n_elig >= TOL["min_eligible"]
    return ids, attn, n_elig


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_statistics_match_reference(mode):
    ids, attn, n_elig = _statmlm_batch()
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=attn, mode=mode)
    twin = ops.mask_select(ids, seed=1, offset=3, **kw)
    ref = mask_tokens(ids, seed=1, backend="reference", **kw)
    for out in (twin, ref):
        sel = out.labels != IGNORE_INDEX
        n_sel = int(sel.sum())
        assert int(out.num_dropped.sum()) == 0
        if mode == "bernoulli":
            assert _binomial_ok(n_sel, n_elig, 0.15), n_sel / n_elig
        new = out.input_ids[sel]
        n_mask = int((new == MASK).sum())
        n_kept = int((new == ids[sel]).sum())
        # kept = 10% + the random draws that hit the original id (1/45 of the 10%)
        assert _binomial_ok(n_mask, n_sel, 0.8)
        assert _binomial_ok(n_kept, n_sel, 0.1 + 0.1 / (VOCAB - len(SPECIAL)))
        rand = new[(new != MASK) & (new != ids[sel])]
        assert not torch.isin(rand, torch.tensor(SPECIAL)).any()
    if mode == "exact":  # k = floor(p n + 0.5) per row: the same counts as the reference, exactly
        assert torch.equal(twin.num_selected, ref.num_selected)


def test_random_ids_uniform_and_positions_uniform():
    ids, attn, n_elig = _statmlm_batch()
    out = ops.mask_select(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=attn,
                          mlm_probability=0.5, mask_replace_prob=0.0, random_replace_prob=1.0, seed=3,
                          max_predictions=TOL["stat_len"])
    sel = out.labels != IGNORE_INDEX
    new = out.input_ids[sel]
    counts = torch.bincount(new, minlength=VOCAB)
    assert (counts[SPECIAL] == 0).all()
    n, k = int(sel.sum()), VOCAB - len(SPECIAL)
    for c in counts[len(SPECIAL):].tolist():  # each allowed id: binomial(n, 1/k)
        assert _binomial_ok(c, n, 1.0 / k)
    # selection rate in the first and second half of the eligible positions of each row is the same
    elig = _eligible(ids, attn)
    half = torch.arange(ids.shape[1])[None, :] < ids.shape[1] // 2
    for part in (half, ~half):
        assert _binomial_ok(int((sel & part).sum()), int((elig & part).sum()), 0.5)


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_whole_word_statistics(mode):
    ids, attn, _ = _statmlm_batch()
    B, L = ids.shape
    g = torch.Generator().manual_seed(5)
    wid = ((torch.rand((B, L), generator=g) < 0.6).long().cumsum(1) - 1)  # words of ~1.7 pieces
    wid[ids < len(SPECIAL)] = -1
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=attn, word_ids=wid,
              mode=mode, max_predictions=L)
    twin = ops.mask_select(ids, seed=2, **kw)
    ref = mask_tokens(ids, seed=2, backend="reference", **kw)
    sel = twin.labels != IGNORE_INDEX
    # every piece of a word gets the same decision
    for b in range(0, B, 97):
        for w in wid[b].unique().tolist():
            if w >= 0:
                s = sel[b][(wid[b] == w) & (attn[b] != 0)]
                assert s.all() or not s.any()
    # words selected at rate p (bernoulli); token counts per row match the reference in distribution
    words = wid + torch.arange(B)[:, None] * (L + 1)
    word_sel = torch.zeros(B * (L + 1), dtype=torch.long).scatter_reduce(
        0, words[wid >= 0], sel[wid >= 0].long(), "amax")
    n_words = int(torch.unique(words[wid >= 0]).numel())
    if mode == "bernoulli":
        assert _binomial_ok(int(word_sel.sum()), n_words, 0.15)
    t, r = twin.num_selected.double(), ref.num_selected.double()
    se = math.sqrt((t.var() + r.var()) / B)
    assert abs(t.mean() - r.mean()) <= TOL["sigmas"] * se, (t.mean(), r.mean())
    if mode == "exact":  # never above the budget, except a single word larger than the budget
        n = _eligible(ids, attn).sum(1)
        k = torch.floor(n.double() * 0.15 + 0.5).long().clamp(min=1)
        assert ((twin.num_selected <= k) | (twin.num_selected <= 8)).all()


# ---- the public function, the op, the fallback -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_mask_select_api(dtype):
    ids, attn = mlm_batch(3, 33, seed=1, dtype=dtype)
    out = ops.mask_select(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=torch.tensor(SPECIAL),
                          attention_mask=attn, seed=9)
    assert isinstance(out, MaskingOutput)
    assert out.input_ids.dtype == dtype and out.positions.shape == (3, default_max_predictions(33, 0.15))
    lengths = attn.sum(1)
    via_len = ops.mask_select(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL,
                              lengths=lengths, seed=9)
    _assert_same(out, via_len)  # lengths and the equivalent attention mask are the same thing


def test_mask_select_errors():
    ids, attn = mlm_batch(2, 8, seed=0)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL)
    bad = [
        (dict(input_ids=ids.float()), "input_ids"),
        (dict(input_ids=ids[0]), "input_ids"),
        (dict(attention_mask=attn[:, :4]), "attention_mask"),
        (dict(attention_mask=attn.float()), "attention_mask"),
        (dict(lengths=torch.ones(3, dtype=torch.long)), "lengths"),
        (dict(word_ids=torch.zeros_like(ids, dtype=torch.bool)), "word_ids"),
        (dict(mlm_probability=1.5), "mlm_probability"),
        (dict(mask_replace_prob=0.9, random_replace_prob=0.2), "mask_replace_prob"),
        (dict(mode="nope"), "mode"),
        (dict(offset=-1), "offset"),
        (dict(seed=1.5), "seed"),
        (dict(max_predictions=0), "max_predictions"),
        (dict(mask_token_id=VOCAB), "mask_token_id"),
        (dict(special_token_ids=list(range(VOCAB))), "random_replace_prob"),
    ]
    for over, name in bad:
        args = {**kw, "input_ids": ids, **over}
        with pytest.raises(UserError, match=name):
            ops.mask_select(args.pop("input_ids"), **args)


def test_opcheck_and_compile():
    ids, attn = mlm_batch(3, 20, seed=2)
    wid = torch.arange(20).expand(3, 20) // 2
    args = _op_args(ids, attn, None, None, wid, exact=True, seed=4, offset=2)
    torch.library.opcheck(torch.ops.mlmfast.mask_select.default, args)
    torch.library.opcheck(torch.ops.mlmfast.mask_select.default, args + (5,))  # with a row_offset
    # non-contiguous ids: the real op's outputs are contiguous, so the fake's must be too (inductor checks strides)
    torch.library.opcheck(torch.ops.mlmfast.mask_select.default, (ids.t().contiguous().t(),) + args[1:])

    def step(x, m, offset, row_offset=0):
        o = ops.mask_select(x, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=m,
                            seed=7, offset=offset, row_offset=row_offset)
        return o.input_ids * 2, o.positions, o.position_labels

    for row_offset in (0, 9):
        eager = step(ids, attn, 3, row_offset)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, attn, 3, row_offset)
        for x, y in zip(eager, compiled):
            assert torch.equal(x, y)


def test_fallback_without_extension(monkeypatch):
    ids, attn = mlm_batch(4, 30, seed=8)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=attn, seed=3,
              mode="exact")
    with_ext = ops.mask_select(ids, **kw)
    monkeypatch.setattr(ops, "_EXT_STATE", {"mod": None, "err": "ImportError: simulated"})
    assert ops.mask_select_backend("cpu") == "torch"
    _assert_same(with_ext, ops.mask_select(ids, **kw))  # the PyTorch twin: same bits
    st_ = {s.name: s for s in dispatch.all_status()}
    assert st_["mask_select[cpu]"].reason.startswith("mlmfast._C not built: ImportError: simulated")
    assert "mlmfast._C not built" in st_["mask_select[cuda]"].reason


def test_mask_tokens_backends(monkeypatch):
    """mask_tokens(backend=...): auto = the kernel path when mlmfast._C is there, reference otherwise."""
    ids, attn = mlm_batch(6, 40, seed=4)
    kw = dict(special_token_ids=SPECIAL, attention_mask=attn, mode="exact")
    ref = mask_tokens(ids, MASK, VOCAB, seed=3, backend="reference", **kw)
    g = torch.Generator().manual_seed(3)
    _assert_same(ref, mask_tokens(ids, MASK, VOCAB, generator=g, **kw))  # a generator -> the reference
    assert torch.equal(ref.num_selected, mask_tokens(ids, MASK, VOCAB, seed=3, **kw).num_selected)
    with pytest.raises(UserError, match="backend"):
        mask_tokens(ids, MASK, VOCAB, backend="fast", **kw)
    if ops.extension() is not None:
        sel = ops.mask_select(ids, mask_token_id=MASK, vocab_size=VOCAB, seed=3, offset=0, **kw)
        _assert_same(sel, mask_tokens(ids, MASK, VOCAB, seed=3, **kw))
        _assert_same(sel, mask_tokens(ids, MASK, VOCAB, seed=3, backend="kernel", **kw))
        torch.manual_seed(0)  # seed=None: random by default, reproducible through torch's default generator
        a, b = mask_tokens(ids, MASK, VOCAB, **kw), mask_tokens(ids, MASK, VOCAB, **kw)
        torch.manual_seed(0)
        assert not torch.equal(a.labels, b.labels)
        _assert_same(a, mask_tokens(ids, MASK, VOCAB, **kw))
    monkeypatch.setattr(ops, "_EXT_STATE", {"mod": None, "err": "ImportError: simulated"})
    _assert_same(ref, mask_tokens(ids, MASK, VOCAB, seed=3, **kw))  # auto falls back to the reference
    with pytest.raises(UserError, match="simulated"):
        mask_tokens(ids, MASK, VOCAB, seed=3, backend="kernel", **kw)


@needs_ext
def test_mask_tokens_kernel_statistics():
    """The reference's own statistics checks, through mask_tokens(backend="kernel")."""
    ids, attn, n_elig = _statmlm_batch()
    out = mask_tokens(ids, MASK, VOCAB, special_token_ids=SPECIAL, attention_mask=attn, seed=8, backend="kernel",
                      mlm_probability=0.3)
    sel = out.labels != IGNORE_INDEX
    assert _binomial_ok(int(sel.sum()), n_elig, 0.3)
    _check_invariants(out, ids, _eligible(ids, attn), out.positions.shape[1], SPECIAL, MASK)


def test_dispatch_status():
    st_ = {s.name: s for s in dispatch.all_status()}
    assert {"mask_select[cpu]", "mask_select[cuda]", "gather_rows[cuda]"} <= set(st_)
    if ops.extension() is not None:
        assert st_["mask_select[cpu]"].available
        assert ops.mask_select_backend("cpu") == "cpp"
    if not torch.cuda.is_available():
        assert not st_["mask_select[cuda]"].available and st_["mask_select[cuda]"].reason


def test_extension_build_flags():
    ext = ops.extension()
    if ext is None:
        pytest.skip(f"mlmfast._C not built: {ops.extension_error()}")
    assert ext.cpu_threads() >= 1
    if ext.WITH_CUDA:
        assert "80" in ext.CUDA_ARCHS and "90" in ext.CUDA_ARCHS
        assert ext.cuda_device_count() >= 0  # callable without a GPU


# ---- GPU ---------------------------------------------------------------------------------------------------------
def _cuda_kernel_or_fail():
    ext = ops.extension()
    if ext is None or not ext.WITH_CUDA:
        pytest.fail(f"the CUDA part of mlmfast._C is not built: {ops._cuda_part_reason()}")


@pytest.mark.gpu
@pytest.mark.parametrize("B,L", [(1, 1), (3, 17), (8, 128), (4, 512), (2, 1500), (2, 4096), (300, 64)])
@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
@pytest.mark.parametrize("whole_word", [False, True])
def test_cuda_equals_twin(cuda_device, B, L, mode, whole_word):
    _cuda_kernel_or_fail()
    for dtype in (torch.int64, torch.int32):
        ids, attn = mlm_batch(B, L, seed=L + B, dtype=dtype)
        wid = (torch.arange(L).expand(B, L) // 3).contiguous() if whole_word else None
        for P in (default_max_predictions(L, 0.15), max(1, L // 50)):  # the default, and a capacity that overflows
            args = _op_args(ids, attn, None, None, wid, exact=mode == "exact", P=P, seed=L * 7 + 1, offset=B)
            args += (0 if P == max(1, L // 50) else 2**32 - B,)  # row_offset: none, and the last rows
            cpu = _run_cpp(*args)
            gpu_args = tuple(a.to(cuda_device) if isinstance(a, torch.Tensor) else a for a in args)
            gpu = MaskingOutput(*ops._mask_select_ext(ops.extension(), *gpu_args))
            _assert_same(gpu, cpu, (B, L, mode, whole_word, dtype, P))


@pytest.mark.gpu
@given(cases())
def test_cuda_equals_twin_properties(args):
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    _cuda_kernel_or_fail()
    gpu_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    _assert_same(_run_guarded(*gpu_args), _run_cpp(*args))


@pytest.mark.gpu
@given(split_cases())
def test_cuda_row_offset_equals_twin(case):
    """The kernel honours row_offset as the twins do: a split batch on the GPU == the whole batch on the CPU."""
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    _cuda_kernel_or_fail()
    args, cut, base = case
    B = args[0].shape[0]
    gpu_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    parts = (_run_guarded(*_with_rows(gpu_args, slice(0, cut), base)),
             _run_guarded(*_with_rows(gpu_args, slice(cut, B), base + cut)))
    _assert_concat(_run_cpp(*_with_rows(args, slice(0, B), base)), [MaskingOutput(*(t.cpu() for t in (
        getattr(p, f) for f in FIELDS))) for p in parts])


@pytest.mark.gpu
def test_cuda_opcheck_and_inductor(cuda_device):
    """The fake implementation agrees with the CUDA kernel (opcheck), and inductor compiles through the op with
    the same outputs as eager."""
    _cuda_kernel_or_fail()
    ids, attn = mlm_batch(3, 20, seed=2)
    ids, attn = ids.to(cuda_device), attn.to(cuda_device)
    args = _op_args(ids, attn, None, None, None, exact=True, seed=4, offset=2)
    torch.library.opcheck(torch.ops.mlmfast.mask_select.default, args)
    torch.library.opcheck(torch.ops.mlmfast.mask_select.default, (ids.t().contiguous().t(),) + args[1:])

    def step(x, m):
        o = ops.mask_select(x, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=m,
                            seed=7, offset=3)
        return o.input_ids * 2, o.positions, o.position_labels

    for x, y in zip(step(ids, attn), torch.compile(step, fullgraph=True, backend="inductor")(ids, attn)):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_cuda_no_host_sync_and_graph_capture(cuda_device):
    _cuda_kernel_or_fail()
    ids, attn = mlm_batch(64, 128, seed=1)
    ids, attn = ids.to(cuda_device), attn.to(cuda_device)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, attention_mask=attn, seed=3)
    ops.mask_select(ids, **kw)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("bernoulli", "exact"):
            out = ops.mask_select(ids, mode=mode, offset=5, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_same(out, ops.mask_select(ids.cpu(), mode="exact", offset=5, **{**kw, "attention_mask": attn.cpu()}))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = ops.mask_select(ids, offset=9, **kw)
    g.replay()
    torch.cuda.synchronize()
    _assert_same(captured, ops.mask_select(ids, offset=9, **kw))
