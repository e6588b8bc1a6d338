"""Every public op rejects a bad argument with ONE `UserError` whose message names the argument and says what is
expected (mlmfast/_checks.py): wrong dtype, wrong rank / shape, a tensor on another device (a `meta` tensor beside
CPU tensors: no GPU needed), token ids / labels out of range. Ops: mask_tokens, ops.mask_select, ops.gather_rows,
attention, linear_cross_entropy, BertForMLM.forward (reference and fast path).

Also: non-contiguous inputs are accepted (every op copies where its kernel needs it), value checks run as
`torch._assert_async` while compiling (no `.item()` in the graph) and never synchronise a CUDA device (-m gpu).
"""
from __future__ import annotations

import pytest
import torch

from mlmfast import ModelConfig, ops
from mlmfast._checks import check_range, check_tensor
from mlmfast.attention import attention
from mlmfast.errors import UserError
from mlmfast.linear_ce import linear_cross_entropy
from mlmfast.masking import mask_tokens
from mlmfast.model import BertForMLM

V, B, L = 30, 2, 6  # vocab, batch, sequence length of every baseline call
MASK, SPECIAL = 4, [0, 1, 2, 3, 4]
META = "meta"  # a tensor "on another device" without a GPU


def _ids(b=B, l=L, seed=0):
    return torch.randint(len(SPECIAL), V, (b, l), generator=torch.Generator().manual_seed(seed))


def _with(t, **at):
    """A copy of t with t[index] = value for each (index, value) in at.values()."""
    t = t.clone()
    for idx, val in at.values():
        t[idx] = val
    return t


# ---- one baseline call per op; a case overrides some of its arguments -------------------------------------------
def _mask_tokens(**over):
    kw = dict(input_ids=_ids(), mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL,
              attention_mask=torch.ones(B, L, dtype=torch.long), seed=0)
    kw.update(over)
    return mask_tokens(kw.pop("input_ids"), **kw)


def _mask_select(**over):
    kw = dict(input_ids=_ids(), mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL,
              attention_mask=torch.ones(B, L, dtype=torch.long), seed=0)
    kw.update(over)
    return ops.mask_select(kw.pop("input_ids"), **kw)


def _gather_rows(**over):
    kw = dict(hidden=torch.randn(B, L, 8), positions=torch.zeros(B, 3, dtype=torch.long))
    kw.update(over)
    return ops.gather_rows(kw["hidden"], kw["positions"])


def _attention(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(q=torch.randn(B, 2, 8, 16, generator=g), k=torch.randn(B, 2, 8, 16, generator=g),
              v=torch.randn(B, 2, 8, 16, generator=g), seqlens=torch.tensor([8, 5]),
              key_padding_mask=torch.ones(B, 8, dtype=torch.bool))
    kw.update(over)
    return attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


def _linear_ce(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(x=torch.randn(5, 8, generator=g), weight=torch.randn(10, 8, generator=g), bias=torch.zeros(10),
              labels=torch.tensor([1, -100, 9, 0, 3]), num_active=None)
    kw.update(over)
    return linear_cross_entropy(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("labels"), **kw)


_MODEL = {}


def _model(path: str) -> BertForMLM:
    if path not in _MODEL:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=16, type_vocab_size=2,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        _MODEL[path] = BertForMLM(cfg).set_path(path).eval()
    return _MODEL[path]


def _forward(path: str, **over):
    kw = dict(input_ids=_ids(), attention_mask=torch.ones(B, L, dtype=torch.long))
    if "positions" not in over and "position_labels" not in over:
        kw["labels"] = _with(torch.full((B, L), -100), a=((0, 1), 7), b=((1, 2), 9))
    kw.update(over)
    return _model(path)(**kw)


OPS = {
    "mask_tokens": _mask_tokens,
    "mask_select": _mask_select,
    "gather_rows": _gather_rows,
    "attention": _attention,
    "linear_cross_entropy": _linear_ce,
    "forward[reference]": lambda **kw: _forward("reference", **kw),
    "forward[fast]": lambda **kw: _forward("fast", **kw),
}

# (op, the argument the message must name, what is wrong, overrides built lazily)
_MASKING_CASES = [  # shared by mask_tokens and mask_select
    ("input_ids", "float dtype", lambda: dict(input_ids=_ids().float())),
    ("input_ids", "1-D", lambda: dict(input_ids=_ids()[0])),
    ("input_ids", "not a tensor", lambda: dict(input_ids=[[5, 6]])),
    ("attention_mask", "float dtype", lambda: dict(attention_mask=torch.ones(B, L))),
    ("attention_mask", "shape [B, L + 1]", lambda: dict(attention_mask=torch.ones(B, L + 1, dtype=torch.long))),
    ("attention_mask", "on meta", lambda: dict(attention_mask=torch.ones(B, L, dtype=torch.long, device=META))),
    ("attention_mask", "input_ids on meta", lambda: dict(input_ids=_ids().to(META))),
    ("special_tokens_mask", "shape [B + 1, L]",
     lambda: dict(special_tokens_mask=torch.zeros(B + 1, L, dtype=torch.long))),
    ("special_tokens_mask", "float dtype", lambda: dict(special_tokens_mask=torch.zeros(B, L))),
    ("special_tokens_mask", "on meta",
     lambda: dict(special_tokens_mask=torch.zeros(B, L, dtype=torch.long, device=META))),
    ("word_ids", "bool dtype", lambda: dict(word_ids=torch.zeros(B, L, dtype=torch.bool))),
    ("word_ids", "shape [B, L - 1]", lambda: dict(word_ids=torch.zeros(B, L - 1, dtype=torch.long))),
    ("word_ids", "on meta", lambda: dict(word_ids=torch.zeros(B, L, dtype=torch.long, device=META))),
    ("row_offset", "negative", lambda: dict(row_offset=-1)),
    ("row_offset", "rows past 2^32", lambda: dict(row_offset=2**32 - 1)),
    ("row_offset", "a float", lambda: dict(row_offset=1.0)),
]
_MODEL_CASES = [
    ("input_ids", "float dtype", lambda: dict(input_ids=_ids().float())),
    ("input_ids", "1-D", lambda: dict(input_ids=_ids()[0])),
    ("input_ids", "id >= vocab_size", lambda: dict(input_ids=_with(_ids(), a=((1, 3), V)))),
    ("input_ids", "id < 0", lambda: dict(input_ids=_with(_ids(), a=((0, 0), -1)))),
    ("attention_mask", "shape [B, L - 1]", lambda: dict(attention_mask=torch.ones(B, L - 1))),
    ("attention_mask", "complex dtype", lambda: dict(attention_mask=torch.ones(B, L, dtype=torch.complex64))),
    ("attention_mask", "on meta", lambda: dict(attention_mask=torch.ones(B, L, device=META))),
    ("token_type_ids", "float dtype", lambda: dict(token_type_ids=torch.zeros(B, L))),
    ("token_type_ids", "shape [B, L + 1]", lambda: dict(token_type_ids=torch.zeros(B, L + 1, dtype=torch.long))),
    ("token_type_ids", "id >= type_vocab_size", lambda: dict(token_type_ids=torch.full((B, L), 2))),
    ("token_type_ids", "on meta", lambda: dict(token_type_ids=torch.zeros(B, L, dtype=torch.long, device=META))),
    ("labels", "float dtype", lambda: dict(labels=torch.zeros(B, L))),
    ("labels", "shape [B, L + 1]", lambda: dict(labels=torch.zeros(B, L + 1, dtype=torch.long))),
    ("labels", "label >= vocab_size", lambda: dict(labels=torch.full((B, L), V))),
    ("labels", "label -5 (not -100)", lambda: dict(labels=torch.full((B, L), -5))),
    ("labels", "on meta", lambda: dict(labels=torch.zeros(B, L, dtype=torch.long, device=META))),
    ("positions", "float dtype", lambda: dict(positions=torch.zeros(B, 3), position_labels=torch.zeros(B, 3).long())),
    ("positions", "batch B + 1", lambda: dict(positions=torch.zeros(B + 1, 3, dtype=torch.long),
                                               position_labels=torch.zeros(B + 1, 3, dtype=torch.long))),
    ("positions", "on meta", lambda: dict(positions=torch.zeros(B, 3, dtype=torch.long, device=META),
                                           position_labels=torch.zeros(B, 3, dtype=torch.long))),
    ("positions", "missing", lambda: dict(position_labels=torch.zeros(B, 3, dtype=torch.long))),
    ("position_labels", "missing", lambda: dict(positions=torch.zeros(B, 3, dtype=torch.long))),
    ("position_labels", "shape [B, P + 1]", lambda: dict(positions=torch.zeros(B, 3, dtype=torch.long),
                                                         position_labels=torch.zeros(B, 4, dtype=torch.long))),
    ("position_labels", "label >= vocab_size", lambda: dict(positions=torch.zeros(B, 3, dtype=torch.long),
                                                            position_labels=torch.full((B, 3), V))),
]
CASES = (
    [("mask_tokens",) + c for c in _MASKING_CASES]
    + [
        ("mask_tokens", "input_ids", "id >= vocab_size", lambda: dict(input_ids=_with(_ids(), a=((1, 3), V)))),
        ("mask_tokens", "input_ids", "id < 0", lambda: dict(input_ids=_with(_ids(), a=((0, 0), -1)))),
        ("mask_tokens", "row_offset", "backend='reference'", lambda: dict(row_offset=2, backend="reference")),
        ("mask_tokens", "row_offset", "with a generator", lambda: dict(row_offset=2, seed=None,
                                                                         generator=torch.Generator())),
    ]
    + [("mask_select",) + c for c in _MASKING_CASES]
    + [
        ("mask_select", "input_ids", "int16 dtype", lambda: dict(input_ids=_ids().to(torch.int16))),
        ("mask_select", "lengths", "float dtype", lambda: dict(lengths=torch.full((B,), 3.0))),
        ("mask_select", "lengths", "shape [B + 1]", lambda: dict(lengths=torch.full((B + 1,), 3))),
        ("mask_select", "lengths", "on meta", lambda: dict(lengths=torch.full((B,), 3, device=META))),
        ("gather_rows", "hidden", "integer dtype", lambda: dict(hidden=torch.zeros(B, L, 8, dtype=torch.long))),
        ("gather_rows", "hidden", "2-D", lambda: dict(hidden=torch.zeros(B, 8))),
        ("gather_rows", "hidden", "not a tensor", lambda: dict(hidden=[[0.0]])),
        ("gather_rows", "positions", "float dtype", lambda: dict(positions=torch.zeros(B, 3))),
        ("gather_rows", "positions", "1-D", lambda: dict(positions=torch.zeros(3, dtype=torch.long))),
        ("gather_rows", "positions", "batch B + 1", lambda: dict(positions=torch.zeros(B + 1, 3, dtype=torch.long))),
        ("gather_rows", "positions", "on meta", lambda: dict(positions=torch.zeros(B, 3, dtype=torch.long,
                                                                                   device=META))),
        ("attention", "q", "integer dtype", lambda: dict(q=torch.zeros(B, 2, 8, 16, dtype=torch.int32))),
        ("attention", "q", "3-D", lambda: dict(q=torch.zeros(B, 8, 16))),
        ("attention", "k", "L differs from q", lambda: dict(k=torch.zeros(B, 2, 7, 16))),
        ("attention", "k", "dtype differs from q", lambda: dict(k=torch.zeros(B, 2, 8, 16, dtype=torch.float16))),
        ("attention", "k", "on meta", lambda: dict(k=torch.zeros(B, 2, 8, 16, device=META))),
        ("attention", "v", "D differs from q", lambda: dict(v=torch.zeros(B, 2, 8, 8))),
        ("attention", "v", "on meta", lambda: dict(v=torch.zeros(B, 2, 8, 16, device=META))),
        ("attention", "seqlens", "float dtype", lambda: dict(seqlens=torch.tensor([8.0, 5.0]))),
        ("attention", "seqlens", "shape [B + 1]", lambda: dict(seqlens=torch.tensor([8, 5, 1]))),
        ("attention", "seqlens", "on meta", lambda: dict(seqlens=torch.tensor([8, 5], device=META))),
        ("attention", "key_padding_mask", "float dtype", lambda: dict(key_padding_mask=torch.ones(B, 8))),
        ("attention", "key_padding_mask", "shape [B, L + 1]",
         lambda: dict(key_padding_mask=torch.ones(B, 9, dtype=torch.bool))),
        ("attention", "key_padding_mask", "on meta",
         lambda: dict(key_padding_mask=torch.ones(B, 8, dtype=torch.bool, device=META))),
        ("attention", "dropout_p", "1.0", lambda: dict(dropout_p=1.0)),
        ("linear_cross_entropy", "x", "integer dtype", lambda: dict(x=torch.zeros(5, 8, dtype=torch.long))),
        ("linear_cross_entropy", "x", "3-D", lambda: dict(x=torch.zeros(1, 5, 8))),
        ("linear_cross_entropy", "weight", "H differs from x", lambda: dict(weight=torch.zeros(10, 4))),
        ("linear_cross_entropy", "weight", "integer dtype", lambda: dict(weight=torch.zeros(10, 8, dtype=torch.long))),
        ("linear_cross_entropy", "weight", "on meta", lambda: dict(weight=torch.zeros(10, 8, device=META))),
        ("linear_cross_entropy", "bias", "shape [V + 1]", lambda: dict(bias=torch.zeros(11))),
        ("linear_cross_entropy", "bias", "on meta", lambda: dict(bias=torch.zeros(10, device=META))),
        ("linear_cross_entropy", "labels", "float dtype", lambda: dict(labels=torch.zeros(5))),
        ("linear_cross_entropy", "labels", "shape [N - 1]", lambda: dict(labels=torch.zeros(4, dtype=torch.long))),
        ("linear_cross_entropy", "labels", "label >= V", lambda: dict(labels=torch.tensor([1, -100, 10, 0, 3]))),
        ("linear_cross_entropy", "labels", "label -1 (not ignore_index)",
         lambda: dict(labels=torch.tensor([1, -100, -1, 0, 3]))),
        ("linear_cross_entropy", "labels", "on meta", lambda: dict(labels=torch.zeros(5, dtype=torch.long,
                                                                                       device=META))),
        ("linear_cross_entropy", "num_active", "float dtype", lambda: dict(num_active=torch.tensor([3.0]))),
        ("linear_cross_entropy", "num_active", "two elements", lambda: dict(num_active=torch.tensor([3, 4]))),
        ("linear_cross_entropy", "num_active", "on meta", lambda: dict(num_active=torch.tensor([3], device=META))),
    ]
    + [("forward[reference]",) + c for c in _MODEL_CASES]
    + [("forward[fast]",) + c for c in _MODEL_CASES]
)


@pytest.mark.parametrize("op", list(OPS))
def test_baseline_call_is_valid(op):
    """The unmodified call of each op runs: every failure below is the bad argument's doing."""
    OPS[op]()


@pytest.mark.parametrize("op,arg,why,over", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_bad_argument_is_one_user_error_naming_it(op, arg, why, over):
    with pytest.raises(UserError, match=rf"^(\w+: )?{arg}\b") as err:
        OPS[op](**over())
    assert "expected" in str(err.value), str(err.value)


def test_message_format():
    with pytest.raises(UserError) as err:
        _mask_select(input_ids=torch.zeros(2, 3))
    assert str(err.value) == ("input_ids dtype: expected a 2-D torch.Tensor of int32 or int64 token ids [B, L], "
                              "got torch.float32 [2, 3]")
    with pytest.raises(UserError) as err:
        _forward("fast", input_ids=_with(_ids(), a=((1, 3), V)))
    assert str(err.value).startswith(f"input_ids: token id {V} >= vocab_size {V}: the tokenizer does not match")
    assert str(err.value).endswith(f"(expected token ids in [0, {V}))")
    with pytest.raises(UserError) as err:
        _gather_rows(positions=torch.zeros(B, 3, dtype=torch.long, device=META))
    assert str(err.value).startswith("positions device: expected a tensor on cpu (hidden's device), got one on meta")


# ---- what the checks must not reject, and what they must not cost ---------------------------------------------
def test_non_contiguous_inputs_are_accepted():
    """No op needs contiguous inputs from its caller: each copies (or honours strides) where its kernel needs it."""
    ids = _ids(L, B).t()  # (B, L) view, not contiguous
    attn = torch.ones(L, B, dtype=torch.long).t()
    assert not ids.is_contiguous() and not attn.is_contiguous()
    kw = dict(mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, seed=3)
    for fn in (ops.mask_select, mask_tokens):
        a, b = fn(ids, attention_mask=attn, **kw), fn(ids.contiguous(), attention_mask=attn.contiguous(), **kw)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)
    hidden = torch.randn(8, L, B).permute(2, 1, 0)  # (B, L, 8), not contiguous
    pos = torch.tensor([[0, 5, 2], [1, 1, 4]])
    assert torch.equal(ops.gather_rows(hidden, pos), ops.gather_rows(hidden.contiguous(), pos))
    x, w = torch.randn(8, 5).t(), torch.randn(8, 10).t()  # (5, 8), (10, 8)
    labels = torch.tensor([1, 0, -100, 0, 9, 0, 0, 0, 3, 0])[::2]  # stride 2
    torch.testing.assert_close(linear_cross_entropy(x, w, None, labels),
                               linear_cross_entropy(x.contiguous(), w.contiguous(), None, labels.contiguous()))


def test_labels_past_num_active_are_not_checked():
    """Rows at or past num_active are ignored by linear_cross_entropy, so their labels may hold anything."""
    tail = torch.tensor([1, -100, 9, 12345, -7])
    loss = _linear_ce(labels=tail, num_active=torch.tensor([3]))
    torch.testing.assert_close(loss, _linear_ce(labels=torch.tensor([1, -100, 9, -100, -100])))
    with pytest.raises(UserError, match="^linear_cross_entropy: labels: label 12345"):
        _linear_ce(labels=tail, num_active=torch.tensor([4]))


def test_value_checks_are_async_asserts_when_compiling():
    """Under torch.compile a value check is a torch._assert_async (no .item(), no graph break), so fullgraph=True
    traces it; a bad value then fails at run time as a RuntimeError naming the argument."""
    def loss(x, w, labels):
        return linear_cross_entropy(x, w, None, labels)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x, w = torch.randn(5, 8), torch.randn(10, 8)
    good = torch.tensor([1, -100, 9, 0, 3])
    torch.testing.assert_close(compiled(x, w, good), loss(x, w, good))
    with pytest.raises(RuntimeError, match="labels"):
        compiled(x, w, torch.tensor([1, -100, 10, 0, 3]))


def test_meta_tensors_skip_value_checks():
    """Values of a meta tensor cannot be read: shape / dtype / device checks still run, the range check does not."""
    t = torch.full((2, 3), 10**6, device=META)
    check_tensor("t", t, "an integer tensor [2, 3]", shape=(2, 3), device=torch.device(META))
    check_range("t", t.long(), 0, 5)  # no error, no read


@pytest.mark.gpu
def test_checks_do_not_synchronise_cuda(cuda_device):
    """Shape / dtype / device checks and the id-range asserts of the hot path never wait for the GPU."""
    ids = _ids().to(cuda_device)
    labels = torch.tensor([1, -100, 9, 0, 3], device=cuda_device)
    x, w = torch.randn(5, 8, device=cuda_device), torch.randn(10, 8, device=cuda_device)
    attn = torch.ones(B, L, dtype=torch.long, device=cuda_device)
    n_act = torch.full((1,), 4, dtype=torch.long, device=cuda_device)  # torch.tensor(..., device=) would sync
    mask_tokens(ids, MASK, V, special_token_ids=SPECIAL, attention_mask=attn, seed=1)  # warm-up (lazy init)
    linear_cross_entropy(x, w, None, labels, num_active=n_act)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        check_range("input_ids", ids, 0, V, what="token id")
        check_range("labels", labels, 0, 10, ignore=-100, where=torch.arange(5, device=cuda_device) < 4)
        mask_tokens(ids, MASK, V, special_token_ids=SPECIAL, attention_mask=attn, seed=1, row_offset=2)
        linear_cross_entropy(x, w, None, labels, num_active=n_act)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()  # and the asserts passed
