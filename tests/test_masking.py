"""Tests of the reference MLM masking (mlmfast/masking.py): statistics, invariants, RNG, whole words, errors."""
from __future__ import annotations

import functools

import pytest
import torch

from _mlm_batches import CLS, MASK, PAD, SEP, SPECIAL, VOCAB, binomial_ok, mlm_batch
from mlmfast.errors import UserError
from mlmfast.masking import (
    IGNORE_INDEX,
    MaskingOutput,
    default_max_predictions,
    mask_tokens,
    word_ids_from_tokens,
)

# These tests check the reference implementation itself: pin mask_tokens to it (its default, backend="auto",
# runs mlmfast.ops.mask_select when mlmfast._C is built; tests/test_mask_select.py checks that path).
mask_tokens = functools.partial(mask_tokens, backend="reference")

# ---- one table of tolerances and test-set sizes ----------------------------------------------------------------
TOL = {
    "sigmas": 5.0,  # binomial bounds: |observed - expected| <= sigmas * sqrt(p (1 - p) / n)
    "stat_batch": 640,  # rows of the statistics batch
    "stat_len": 256,  # row length of the statistics batch (>= 100k eligible tokens in all)
    "min_eligible": 100_000,  # the statistics tests refuse to run on fewer eligible tokens
    "uniform_p": 0.5,  # selection rate of the uniformity test (more random draws per id)
}

N_ALLOWED = VOCAB - len(SPECIAL)


def _binomial_ok(count: int, n: int, p: float) -> bool:
    return binomial_ok(count, n, p, TOL["sigmas"])


def _check_consistent(out: MaskingOutput, ids: torch.Tensor, P: int) -> None:
    """input_ids / labels / positions / position_labels / counts all tell the same story."""
    B, L = ids.shape
    assert out.input_ids.shape == (B, L) and out.input_ids.dtype == ids.dtype
    assert out.labels.shape == (B, L) and out.labels.dtype == torch.long
    assert out.positions.shape == (B, P) and out.positions.dtype == torch.long
    assert out.position_labels.shape == (B, P) and out.position_labels.dtype == torch.long
    assert out.num_selected.shape == (B,) and out.num_dropped.shape == (B,)
    sel = out.labels != IGNORE_INDEX
    assert torch.equal(out.labels[sel], ids.long()[sel])  # labels are the original ids
    assert torch.equal(out.input_ids[~sel], ids[~sel])  # unselected positions untouched
    assert torch.equal(out.num_selected, sel.sum(1))
    assert (out.num_dropped >= 0).all()
    assert (out.positions >= 0).all() and (out.positions < max(L, 1)).all()
    for b in range(B):
        n = int(out.num_selected[b])
        assert n <= P
        p_b = out.positions[b, :n]
        assert torch.equal(p_b, sel[b].nonzero().squeeze(1))  # ascending, exactly the selected positions
        assert torch.equal(out.labels[b, p_b], out.position_labels[b, :n])
        assert (out.positions[b, n:] == 0).all()
        assert (out.position_labels[b, n:] == IGNORE_INDEX).all()


def _check_words_whole(out: MaskingOutput, word_ids: torch.Tensor, eligible: torch.Tensor) -> None:
    """Every word (same id >= 0 in a row) has all of its eligible pieces selected, or none."""
    sel = out.labels != IGNORE_INDEX
    for b in range(word_ids.shape[0]):
        if int(out.num_dropped[b]):  # the capacity cut may split a word
            continue
        for w in word_ids[b].unique().tolist():
            if w < 0:
                continue
            pieces = (word_ids[b] == w) & eligible[b]
            s = sel[b][pieces]
            assert s.all() or not s.any(), f"row {b} word {w} partly selected: {s.tolist()}"


# ---- statistics ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_selection_and_split_statistics(mode):
    B, L, p = TOL["stat_batch"], TOL["stat_len"], 0.15
    ids, attn = mlm_batch(B, L, seed=1)
    eligible = (attn == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    n_elig = int(eligible.sum())
    assert n_elig >= TOL["min_eligible"]
    out = mask_tokens(ids, MASK, VOCAB, special_token_ids=SPECIAL, attention_mask=attn, mlm_probability=p,
                      mode=mode, max_predictions=L, seed=123)
    _check_consistent(out, ids, L)
    assert out.num_overflow == 0
    sel = out.labels != IGNORE_INDEX
    assert not (sel & ~eligible).any()
    n_sel = int(sel.sum())
    if mode == "bernoulli":
        assert _binomial_ok(n_sel, n_elig, p), (n_sel, n_elig * p)
    else:
        n_row = eligible.sum(1)
        k = torch.floor(n_row.double() * p + 0.5).long().clamp(min=1)
        assert torch.equal(sel.sum(1), k)

    # Split among the selected: a random draw equals the original id with probability 1 / N_ALLOWED.
    new, orig = out.input_ids[sel], ids[sel]
    n_mask = int((new == MASK).sum())
    n_kept = int((new == orig).sum())
    n_rand = n_sel - n_mask - n_kept
    p_mask, p_kept = 0.8, 0.1 + 0.1 / N_ALLOWED
    p_rand = 1.0 - p_mask - p_kept
    assert _binomial_ok(n_mask, n_sel, p_mask), (n_mask, n_sel)
    assert _binomial_ok(n_kept, n_sel, p_kept), (n_kept, n_sel)
    assert _binomial_ok(n_rand, n_sel, p_rand), (n_rand, n_sel)
    assert not torch.isin(new[new != MASK], torch.tensor(SPECIAL)).any()  # replacements never special


def test_random_replacements_uniform_and_never_special():
    B, L = TOL["stat_batch"], TOL["stat_len"]
    ids, attn = mlm_batch(B, L, seed=2)
    out = mask_tokens(ids, MASK, VOCAB, special_token_ids=SPECIAL, attention_mask=attn,
                      mlm_probability=TOL["uniform_p"], mask_replace_prob=0.0, random_replace_prob=1.0,
                      max_predictions=L, seed=7)
    sel = out.labels != IGNORE_INDEX
    drawn = out.input_ids[sel]  # every selected position holds one uniform draw (maybe the original id)
    n = drawn.numel()
    assert n >= TOL["min_eligible"] // 4
    counts = torch.bincount(drawn, minlength=VOCAB)
    assert (counts[list(SPECIAL)] == 0).all()
    for tok in range(len(SPECIAL), VOCAB):
        assert _binomial_ok(int(counts[tok]), n, 1.0 / N_ALLOWED), (tok, int(counts[tok]), n / N_ALLOWED)


# ---- basic invariants -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_special_padding_dtype_input_untouched(dtype, mode):
    ids, attn = mlm_batch(16, 33, seed=3, dtype=dtype)
    before = ids.clone()
    out = mask_tokens(ids, MASK, VOCAB, special_token_ids=SPECIAL, attention_mask=attn, mlm_probability=0.5,
                      mode=mode, seed=0)
    assert torch.equal(ids, before) and ids.dtype == dtype
    assert out.input_ids.dtype == dtype and out.input_ids.data_ptr() != ids.data_ptr()
    _check_consistent(out, ids, default_max_predictions(33, 0.5))
    sel = out.labels != IGNORE_INDEX
    assert not sel[attn == 0].any()
    assert not torch.isin(ids.long()[sel], torch.tensor(SPECIAL)).any()
    assert not torch.isin(out.input_ids[sel & (out.input_ids != MASK)].long(), torch.tensor(SPECIAL)).any()


def test_special_tokens_mask_union_and_no_special_info():
    ids, attn = mlm_batch(8, 40, seed=4)
    stm = torch.zeros_like(ids)
    stm[:, 5:10] = 1  # extra positions marked special by the mask only
    out = mask_tokens(ids, MASK, VOCAB, special_token_ids=SPECIAL, special_tokens_mask=stm,
                      attention_mask=attn, mlm_probability=0.9, seed=1)
    sel = out.labels != IGNORE_INDEX
    assert not sel[:, 5:10].any() and not sel[:, 0].any()  # mask-special and id-special ([CLS])
    # Mask only: [CLS] at 0 is special by the mask, so never selected.
    stm2 = (torch.isin(ids, torch.tensor(SPECIAL))).to(torch.bool)
    out2 = mask_tokens(ids, MASK, VOCAB, special_tokens_mask=stm2, attention_mask=attn, mlm_probability=0.9,
                       seed=1)
    assert not (out2.labels != IGNORE_INDEX)[stm2].any()
    # Neither given: every non-pad position is eligible, [CLS] included (documented).
    out3 = mask_tokens(ids, MASK, VOCAB, attention_mask=attn, mlm_probability=0.5, mode="exact", seed=1)
    n_row = attn.sum(1)
    assert torch.equal(out3.num_selected, torch.floor(n_row.double() * 0.5 + 0.5).long())


# ---- randomness -------------------------------------------------------------------------------------------
def test_seed_and_generator():
    ids, attn = mlm_batch(8, 64, seed=5)
    kw = dict(special_token_ids=SPECIAL, attention_mask=attn, mlm_probability=0.3)

    def same(a: MaskingOutput, b: MaskingOutput) -> bool:
        return all(torch.equal(getattr(a, f), getattr(b, f)) for f in
                   ("input_ids", "labels", "positions", "position_labels", "num_selected", "num_dropped"))

    a, b = mask_tokens(ids, MASK, VOCAB, seed=0, **kw), mask_tokens(ids, MASK, VOCAB, seed=0, **kw)
    assert same(a, b)
    assert not torch.equal(a.labels, mask_tokens(ids, MASK, VOCAB, seed=1, **kw).labels)
    g = torch.Generator().manual_seed(0)
    assert same(a, mask_tokens(ids, MASK, VOCAB, generator=g, **kw))  # seed=s == fresh generator seeded s
    g2 = mask_tokens(ids, MASK, VOCAB, generator=g, **kw)  # the generator advanced: a new draw
    assert not torch.equal(a.labels, g2.labels)
    torch.manual_seed(11)
    d1 = mask_tokens(ids, MASK, VOCAB, **kw)
    torch.manual_seed(11)
    assert same(d1, mask_tokens(ids, MASK, VOCAB, **kw))  # default RNG follows torch.manual_seed


# ---- capacity / overflow ----------------------------------------------------------------------------------
def test_default_max_predictions():
    assert default_max_predictions(128, 0.15) == 48
    assert default_max_predictions(512, 0.15) == 128
    assert default_max_predictions(1, 0.15) == 1
    for L in (1, 2, 7, 17, 127, 129, 1000):
        for p in (0.01, 0.15, 0.5, 0.99):
            P = default_max_predictions(L, p)
            assert 1 <= P <= L and (P % 8 == 0 or P == L)
            assert P >= min(L, p * L + 0.5)  # exact mode never overflows the default


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_overflow_keeps_lowest_positions(mode):
    ids, attn = mlm_batch(32, 50, seed=6)
    kw = dict(special_token_ids=SPECIAL, attention_mask=attn, mlm_probability=0.5, mode=mode, seed=9)
    full = mask_tokens(ids, MASK, VOCAB, max_predictions=50, **kw)
    P = 3
    cut = mask_tokens(ids, MASK, VOCAB, max_predictions=P, **kw)
    _check_consistent(cut, ids, P)
    assert torch.equal(cut.num_dropped, (full.num_selected - P).clamp(min=0))
    assert torch.equal(cut.num_selected, full.num_selected.clamp(max=P))
    assert cut.num_overflow == int((full.num_selected - P).clamp(min=0).sum()) > 0
    assert torch.equal(cut.positions, full.positions[:, :P])  # the P lowest selected positions
    sel_cut = cut.labels != IGNORE_INDEX
    dropped = (full.labels != IGNORE_INDEX) & ~sel_cut
    assert dropped.any()
    assert torch.equal(cut.input_ids[dropped], ids[dropped])  # un-selected positions restored
    assert torch.equal(cut.input_ids[sel_cut], full.input_ids[sel_cut])  # same draws for the kept ones


def test_max_predictions_larger_than_len():
    ids, attn = mlm_batch(2, 5, seed=7)
    out = mask_tokens(ids, MASK, VOCAB, special_token_ids=SPECIAL, attention_mask=attn, max_predictions=9,
                      mlm_probability=0.9, seed=3)
    _check_consistent(out, ids, 9)


# ---- whole-word masking ---------------------------------------------------------------------------------
def test_word_ids_from_tokens():
    toks = [["[CLS]", "the", "un", "##aff", "##able", "cat", "##s", "[SEP]", "[PAD]"],
            ["##x", "[UNK]", "a", "[MASK]", "##b"]]
    want = torch.tensor([[-1, 0, 1, 1, 1, 2, 2, -1, -1],
                         [0, 1, 2, -1, 3, -1, -1, -1, -1]])
    got = word_ids_from_tokens(toks)
    assert got.dtype == torch.long and torch.equal(got, want)
    assert word_ids_from_tokens([]).shape == (0, 0)


def _random_word_ids(B: int, L: int, seed: int) -> torch.Tensor:
    """Contiguous words of 1-4 pieces with arbitrary (non-contiguous, shuffled) ids; -1 at [CLS]/[SEP]/pad."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand((B, L), generator=g) < 0.45
    starts[:, 0] = True
    wid = starts.long().cumsum(1) * 7 + torch.randint(0, 3, (B, 1), generator=g)  # ids need not be 0..n-1
    return wid


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_whole_word_grouping(mode):
    # A "##" example through word_ids_from_tokens.
    toks = [["[CLS]", "un", "##aff", "##able", "is", "a", "wonder", "##ful", "##ly", "word", "[SEP]"]] * 64
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff",
                                         "##able", "is", "a", "wonder", "##ful", "##ly", "word"])}
    ids = torch.tensor([[vocab[t] for t in row] for row in toks])
    wid = word_ids_from_tokens(toks)
    out = mask_tokens(ids, MASK, len(vocab), special_token_ids=SPECIAL, word_ids=wid, mlm_probability=0.4,
                      mode=mode, seed=5)
    eligible = ~torch.isin(ids, torch.tensor(SPECIAL))
    _check_consistent(out, ids, default_max_predictions(ids.shape[1], 0.4))
    _check_words_whole(out, wid, eligible)
    assert out.num_selected.sum() > 0

    # A random word_ids tensor with padding and arbitrary ids.
    ids, attn = mlm_batch(64, 60, seed=8)
    wid = _random_word_ids(64, 60, seed=8)
    wid[attn == 0] = -1
    eligible = (attn == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    out = mask_tokens(ids, MASK, VOCAB, special_token_ids=SPECIAL, attention_mask=attn, word_ids=wid,
                      mlm_probability=0.3, mode=mode, max_predictions=60, seed=6)
    _check_consistent(out, ids, 60)
    _check_words_whole(out, wid, eligible)
    sel = out.labels != IGNORE_INDEX
    if mode == "exact":
        k = torch.floor(eligible.sum(1).double() * 0.3 + 0.5).long().clamp(min=1)
        for b in range(64):
            n = int(sel[b].sum())
            sizes = [int(((wid[b] == w) & eligible[b]).sum()) for w in wid[b][sel[b]].unique().tolist()]
            assert n <= int(k[b]) or len(sizes) == 1, (b, n, int(k[b]))  # over budget only as the 1st word
            assert n >= 1
    else:
        frac = sel.sum().item() / eligible.sum().item()
        assert 0.15 < frac < 0.45  # word-level Bernoulli: token rate ~ p


def test_whole_word_eligibility_is_per_position():
    # Word 0 = positions 1..3; position 2 is special by the mask: the word is eligible, its pieces 1 and 3 are
    # selected together and position 2 never is.
    ids = torch.tensor([[CLS, 10, 11, 12, SEP]] * 200)
    wid = torch.tensor([[-1, 0, 0, 0, -1]] * 200)
    stm = torch.tensor([[1, 0, 1, 0, 1]] * 200)
    out = mask_tokens(ids, MASK, VOCAB, special_tokens_mask=stm, word_ids=wid, mlm_probability=0.5, seed=2)
    sel = out.labels != IGNORE_INDEX
    assert not sel[:, [0, 2, 4]].any()
    assert torch.equal(sel[:, 1], sel[:, 3]) and sel[:, 1].any() and not sel[:, 1].all()


# ---- property tests -----------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402


@st.composite
def _cases(draw):
    B = draw(st.integers(1, 4))
    L = draw(st.sampled_from([1, 2, 3, 5, 17, 31]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    attn = (torch.rand((B, L), generator=g) < 0.8).long()
    kinds = draw(st.lists(st.sampled_from(["normal", "all_pad", "all_special"]), min_size=B, max_size=B))
    for b, kind in enumerate(kinds):
        if kind == "all_pad":
            attn[b] = 0
            ids[b] = PAD
        elif kind == "all_special":
            ids[b] = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (L,), generator=g)]
    wid = None
    if draw(st.booleans()):
        wid = torch.randint(-1, max(1, L // 2), (B, L), generator=g)  # non-contiguous words allowed
    return dict(
        ids=ids, attn=attn, wid=wid, seed=seed,
        mode=draw(st.sampled_from(["bernoulli", "exact"])),
        p=draw(st.sampled_from([0.01, 0.15, 0.5, 0.99])),
        P=draw(st.sampled_from([None, 1, 2, 4, 64])),
        dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


@given(_cases())
def test_properties(case):
    ids, attn, wid = case["ids"].to(case["dtype"]), case["attn"], case["wid"]
    B, L = ids.shape
    before = ids.clone()
    out = mask_tokens(ids, MASK, VOCAB, special_token_ids=SPECIAL, attention_mask=attn, word_ids=wid,
                      mlm_probability=case["p"], mode=case["mode"], max_predictions=case["P"], seed=case["seed"])
    assert torch.equal(ids, before)
    P = case["P"] or default_max_predictions(L, case["p"])
    _check_consistent(out, ids, P)
    eligible = (attn == 1) & ~torch.isin(ids.long(), torch.tensor(SPECIAL))
    sel = out.labels != IGNORE_INDEX
    assert not (sel & ~eligible).any()
    assert (out.num_selected[eligible.sum(1) == 0] == 0).all()  # all-pad / all-special rows: nothing
    assert not torch.isin(out.input_ids[sel & (out.input_ids != MASK)].long(), torch.tensor(SPECIAL)).any()
    total = out.num_selected + out.num_dropped  # selection before the capacity cut
    if wid is not None:
        _check_words_whole(out, wid, eligible)
    if case["mode"] == "exact":
        n = eligible.sum(1)
        k = torch.where(n > 0, torch.floor(n.double() * case["p"] + 0.5).long().clamp(min=1), 0)
        if wid is None:
            assert torch.equal(total, k)
        else:
            assert ((total >= 1) == (n > 0)).all()
    if case["P"] is None and (case["mode"] == "exact"):
        assert out.num_overflow == 0  # the default capacity covers exact mode


def test_empty_sequence():
    out = mask_tokens(torch.zeros((2, 0), dtype=torch.long), MASK, VOCAB, seed=0)
    assert out.input_ids.shape == (2, 0) and out.positions.shape == (2, 1)
    assert (out.num_selected == 0).all() and (out.position_labels == IGNORE_INDEX).all()


# ---- bad input ------------------------------------------------------------------------------------------
_IDS = torch.tensor([[CLS, 10, 11, SEP]])
_BAD = {
    "1-D ids": (dict(input_ids=torch.tensor([1, 2, 3])), "2-D"),
    "float ids": (dict(input_ids=_IDS.float()), "dtype"),
    "bool ids": (dict(input_ids=_IDS > 0), "dtype"),
    "list ids": (dict(input_ids=[[1, 2]]), "torch.Tensor"),
    "p = 0": (dict(mlm_probability=0.0), "mlm_probability"),
    "p = 1": (dict(mlm_probability=1.0), "mlm_probability"),
    "p nan": (dict(mlm_probability=float("nan")), "mlm_probability"),
    "mask prob < 0": (dict(mask_replace_prob=-0.1), "mask_replace_prob"),
    "random prob < 0": (dict(random_replace_prob=-0.1), "random_replace_prob"),
    "probs sum > 1": (dict(mask_replace_prob=0.8, random_replace_prob=0.3), "<= 1"),
    "mode": (dict(mode="topk"), "mode"),
    "id >= vocab": (dict(input_ids=torch.tensor([[CLS, VOCAB, SEP]])), "tokenizer does not match the model"),
    "id < 0": (dict(input_ids=torch.tensor([[CLS, -1, SEP]])), "tokenizer does not match the model"),
    "mask id >= vocab": (dict(mask_token_id=VOCAB), "mask_token_id"),
    "mask id < 0": (dict(mask_token_id=-1), "mask_token_id"),
    "vocab 0": (dict(vocab_size=0, mask_token_id=0), "vocab_size"),
    "attention_mask shape": (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
    "special_tokens_mask shape": (dict(special_tokens_mask=torch.ones(2, 4)), "special_tokens_mask"),
    "word_ids shape": (dict(word_ids=torch.zeros(1, 5, dtype=torch.long)), "word_ids"),
    "max_predictions 0": (dict(max_predictions=0), "max_predictions"),
    "seed and generator": (dict(seed=0, generator=torch.Generator()), "not both"),
    "seed not int": (dict(seed=1.5), "seed"),
    "all ids special": (dict(special_token_ids=range(VOCAB)), "every id"),
    "special ids not ints": (dict(special_token_ids=["a"]), "special_token_ids"),
}


@pytest.mark.parametrize("name", list(_BAD))
def test_bad_input_raises_user_error(name):
    overrides, fragment = _BAD[name]
    kw = dict(input_ids=_IDS, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, seed=0)
    kw.update(overrides)
    with pytest.raises(UserError, match=None) as err:
        mask_tokens(kw.pop("input_ids"), kw.pop("mask_token_id"), kw.pop("vocab_size"), **kw)
    assert fragment in str(err.value), str(err.value)


def test_all_special_vocab_ok_without_random_replacement():
    out = mask_tokens(_IDS, MASK, VOCAB, special_token_ids=range(VOCAB), random_replace_prob=0.0, seed=0)
    assert out.num_selected.sum() == 0  # every position is special too: nothing selected, no error
