"""BertForMLM against transformers' BertForMaskedLM: keys, logits, loss, gradients, checkpoints, input errors."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from mlmfast.config import ModelConfig  # noqa: E402
from mlmfast.errors import UserError  # noqa: E402
from mlmfast.model import BertForMLM, MLMOutput  # noqa: E402

transformers.logging.set_verbosity_error()

# One table of tolerances (fp32 on CPU).
TOL = {
    "logits": 1e-5,  # ours vs HF, eager vs sdpa (max abs diff)
    "loss": 1e-5,  # ours vs HF (abs)
    "grad_atol": 1e-5,  # ours vs HF parameter gradients
    "grad_rtol": 1e-4,
}

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, type_vocab_size=2)


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def hf_twin(model: BertForMLM, attn: str | None = None) -> BertForMaskedLM:
    """An HF BertForMaskedLM with the same config and weights (eval mode)."""
    cfg = model.config
    hf = BertForMaskedLM._from_config(BertConfig(**cfg.to_dict()), attn_implementation=attn or cfg.attn_implementation)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def batch(B: int, L: int, V: int = TINY["vocab_size"], seed: int = 0, pad: bool = True):
    """Random ids, a padding mask with per-row lengths (incl. 1 and L), token types, and sparse labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    if B > 1:
        lengths[1] = 1
    if not pad:
        lengths[:] = L
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L)
    ids = ids.masked_fill(mask == 0, 0)
    tt = torch.randint(0, 2, (B, L), generator=g) * mask
    labels = torch.where((torch.rand(B, L, generator=g) < 0.3) & (mask == 1), ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]  # at least one labelled position
    return ids, mask, tt, labels


def maxdiff(a, b, mask=None):
    d = (a - b).abs()
    if mask is not None:
        d = d[mask.bool()]
    return d.max().item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BertForMLM(tiny_config()).eval()


# ---- structure -------------------------------------------------------------------------------------------

def test_state_dict_matches_hf_keys_and_shapes(model):
    hf = BertForMaskedLM(BertConfig(**model.config.to_dict()))
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k, tuple(v.shape)) for k, v in hf.state_dict().items()]
    assert ours == theirs, "\n".join(map(str, sorted(set(ours) ^ set(theirs))))
    assert list(dict(model.named_buffers())) == []  # HF's position_ids/token_type_ids are non-persistent
    assert model.num_parameters() == hf.num_parameters()
    # both directions, strict
    hf.load_state_dict(model.state_dict(), strict=True)
    other = BertForMLM(model.config)
    other.load_state_dict(hf.state_dict(), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_ties_and_init(model):
    emb = model.bert["embeddings"].word_embeddings
    pred = model.cls["predictions"]
    assert pred.decoder.weight is emb.weight and pred.decoder.bias is pred.bias
    assert torch.all(emb.weight[model.config.pad_token_id] == 0)
    assert torch.all(pred.bias == 0)
    std = model.bert["encoder"]["layer"][0].attention["self"].query.weight.std().item()
    assert 0.5 * model.config.initializer_range < std < 1.5 * model.config.initializer_range
    ln = model.bert["embeddings"].LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    # the tie survives dtype/device moves and assign=True loads
    m = BertForMLM(model.config).to(torch.float64)
    assert m.cls["predictions"].decoder.weight is m.bert["embeddings"].word_embeddings.weight
    m.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert m.cls["predictions"].decoder.weight is m.bert["embeddings"].word_embeddings.weight
    assert m.cls["predictions"].decoder.bias is m.cls["predictions"].bias


# ---- numerics vs HF --------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("L", [1, 17, 127])
def test_logits_match_hf(model, attn, L):
    model.set_attn_implementation(attn)
    hf = hf_twin(model, attn)
    ids, mask, tt, _ = batch(4, L, seed=L)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=tt).logits
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    assert maxdiff(ours, ref, mask) <= TOL["logits"]
    with torch.no_grad():  # no mask, no token types
        assert maxdiff(model(ids).logits, hf(input_ids=ids).logits) <= TOL["logits"]
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_activations_match_hf(act):
    torch.manual_seed(1)
    m = BertForMLM(tiny_config(hidden_act=act, num_hidden_layers=1)).eval()
    hf = hf_twin(m)
    ids, mask, tt, _ = batch(2, 17)
    with torch.no_grad():
        assert maxdiff(m(ids, mask, tt).logits, hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits,
                       mask) <= TOL["logits"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_loss_and_grads_match_hf(model, attn):
    torch.manual_seed(2)
    m = BertForMLM(tiny_config(attn_implementation=attn)).eval()
    hf = hf_twin(m, attn)
    ids, mask, tt, labels = batch(3, 17, seed=5)
    ids[0, 3] = m.config.pad_token_id  # a [PAD] id on a real position: its embedding row gets no lookup gradient
    out = m(ids, mask, tt, labels=labels)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.loss.item()) <= TOL["loss"]
    out.loss.backward()
    ref.loss.backward()
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    for name, p in m.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=TOL["grad_atol"], rtol=TOL["grad_rtol"],
                                   msg=lambda s, n=name: f"{n}: {s}")


def test_eager_and_sdpa_agree_and_mask_none(model):
    ids, mask, tt, _ = batch(3, 33, seed=7)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(ids, mask, tt).logits
        eager_nomask = model(ids).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(ids, mask, tt).logits
        assert maxdiff(eager, sdpa, mask) <= TOL["logits"]
        assert maxdiff(eager_nomask, model(ids, torch.ones_like(ids)).logits) <= TOL["logits"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_all_padding_row_is_finite(model, attn):
    model.set_attn_implementation(attn)
    ids, mask, tt, _ = batch(2, 9)
    mask[1] = 0
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask, tt).logits).all()
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dropout_train_vs_eval(attn):
    torch.manual_seed(3)
    m = BertForMLM(tiny_config(attn_implementation=attn, hidden_dropout_prob=0.0))  # attention dropout only
    ids, mask, tt, _ = batch(2, 17)
    m.train()
    assert not torch.equal(m(ids, mask, tt).logits, m(ids, mask, tt).logits)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(ids, mask, tt).logits, m(ids, mask, tt).logits)


def test_loss_no_labels_and_no_selected(model):
    ids, mask, tt, labels = batch(2, 9)
    out = model(ids, mask)
    assert out.loss is None and isinstance(out, MLMOutput)
    assert out["logits"] is out.logits and out[0] is out.logits
    m = BertForMLM(model.config)
    out = m(ids, mask, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()  # well defined: zero gradients, no NaN
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert out["loss"] is out.loss and out[0] is out.loss


def test_loss_fp32_with_bf16_logits(model):
    m = BertForMLM(model.config).to(torch.bfloat16)
    ids, mask, tt, labels = batch(2, 9)
    out = m(ids, mask, tt, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


# ---- checkpoints -----------------------------------------------------------------------------------------

class FakeTokenizer:
    def save(self, directory):
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            f.write("{}")


def test_save_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path, tokenizer=FakeTokenizer())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]  # no temp left
    loaded = BertForMLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert loaded.config.attn_implementation == "eager"
    assert loaded.cls["predictions"].decoder.weight is loaded.bert["embeddings"].word_embeddings.weight
    assert loaded.cls["predictions"].decoder.bias is loaded.cls["predictions"].bias
    ids, mask, tt, _ = batch(3, 17)
    with torch.no_grad():
        assert maxdiff(model(ids, mask, tt).logits, loaded.eval()(ids, mask, tt).logits, mask) <= TOL["logits"]
        loaded.set_attn_implementation(model.config.attn_implementation)
        assert torch.equal(model(ids, mask, tt).logits, loaded(ids, mask, tt).logits)  # same weights, bit-exact
    assert BertForMLM.from_pretrained(tmp_path).config.attn_implementation == model.config.attn_implementation


def test_hf_save_our_load_and_our_save_hf_load(model, tmp_path):
    ids, mask, tt, _ = batch(3, 17)
    # HF -> ours
    torch.manual_seed(4)
    hf = BertForMaskedLM(BertConfig(**TINY)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = BertForMLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        assert maxdiff(ours(ids, mask, tt).logits, ref, mask) <= TOL["logits"]
    # ours -> HF (re-saving an HF config keeps its extra keys)
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and "use_cache" in cfg
    back, info = BertForMaskedLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert maxdiff(back.eval()(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, ref,
                       mask) <= TOL["logits"]


def test_untied_checkpoint_roundtrip_with_hf(tmp_path):
    torch.manual_seed(6)
    m = BertForMLM(tiny_config(tie_word_embeddings=False, num_hidden_layers=1)).eval()
    pred = m.cls["predictions"]
    assert pred.decoder.weight is not m.bert["embeddings"].word_embeddings.weight
    assert pred.decoder.bias is not pred.bias  # HF unties both
    with torch.no_grad():
        pred.decoder.bias.normal_()
    ours_keys = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    hf = hf_twin(m)
    assert ours_keys == [(k, tuple(v.shape)) for k, v in hf.state_dict().items()]
    m.save_pretrained(tmp_path)
    back, info = BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    again = BertForMLM.from_pretrained(tmp_path).eval()
    ids, mask, tt, _ = batch(2, 9)
    with torch.no_grad():
        ref = m(ids, mask, tt).logits
        assert maxdiff(back.eval()(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, ref,
                       mask) <= TOL["logits"]
        assert torch.equal(again(ids, mask, tt).logits, ref)


def test_pytorch_model_bin_fallback(model, tmp_path):
    model.config.save(tmp_path)
    state = dict(model.state_dict())
    state["bert.embeddings.position_ids"] = torch.arange(128)[None]  # old persistent buffer: ignored
    state["bert.pooler.dense.weight"] = torch.zeros(32, 32)  # pre-training head: ignored
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = BertForMLM.from_pretrained(tmp_path)
    ids, mask, tt, _ = batch(2, 9)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, tt).logits, loaded.eval()(ids, mask, tt).logits)


def test_checkpoint_errors(model, tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        BertForMLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        BertForMLM.from_pretrained(tmp_path / "empty")
    model.config.save(tmp_path / "noweights")
    with pytest.raises(UserError, match="no weights"):
        BertForMLM.from_pretrained(tmp_path / "noweights")
    # config / weights shape mismatch names the key
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"intermediate\.dense\.(weight|bias).* has shape"):
        BertForMLM.from_pretrained(tmp_path / "m")
    # a missing key is named
    model.save_pretrained(tmp_path / "m2")
    st = load_file(tmp_path / "m2" / "model.safetensors")
    del st["bert.encoder.layer.1.output.dense.bias"]
    save_file(st, tmp_path / "m2" / "model.safetensors")
    with pytest.raises(UserError, match=r"missing .*layer\.1\.output\.dense\.bias"):
        BertForMLM.from_pretrained(tmp_path / "m2")


# ---- input validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, pattern", [
    ("float_ids", "integer token ids"),
    ("one_d", "2-D"),
    ("empty", "empty"),
    ("id_too_big", "token id 97 >= vocab_size 97: the tokenizer does not match"),
    ("negative_id", "token id -1 < 0"),
    ("too_long", "sequence length 129 > max_position_embeddings 128; use --seq-len <= 128"),
    ("mask_shape", "attention_mask shape"),
    ("token_type", "token_type_id 2"),
    ("labels_shape", "labels shape"),
    ("labels_range", "label 97"),
])
def test_bad_inputs(model, case, pattern):
    ids = torch.randint(1, 97, (2, 5))
    kw = {}
    if case == "float_ids":
        ids = ids.float()
    elif case == "one_d":
        ids = ids[0]
    elif case == "empty":
        ids = ids[:, :0]
    elif case == "id_too_big":
        ids[1, 2] = 97
    elif case == "negative_id":
        ids[0, 0] = -1
    elif case == "too_long":
        ids = torch.ones(1, 129, dtype=torch.long)
    elif case == "mask_shape":
        kw["attention_mask"] = torch.ones(2, 4)
    elif case == "token_type":
        kw["token_type_ids"] = torch.full_like(ids, 2)
    elif case == "labels_shape":
        kw["labels"] = torch.zeros(2, 6, dtype=torch.long)
    elif case == "labels_range":
        kw["labels"] = torch.full_like(ids, 97)
    with pytest.raises(UserError, match=pattern):
        model(ids, **kw)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_head_at_labels_only_is_the_reference_at_those_rows(path):
    """forward(..., head_at_labels_only=True) (what evaluation calls): the reference computation on either path,
    the head on the labelled rows only: the full reference's loss and its logits[labels != -100], row by row;
    positions / position_labels give the same; no labels is one clear error."""
    from mlmfast.masking import mask_tokens

    torch.manual_seed(1)
    m = BertForMLM(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    ids, mask, tt, _ = batch(4, 33, seed=2)
    masked = mask_tokens(ids, 4, TINY["vocab_size"], special_token_ids=[0, 4], attention_mask=mask, seed=3)
    with torch.no_grad():
        full = m.set_path("reference")(masked.input_ids, mask, tt, labels=masked.labels)
        m.set_path(path)
        got = m(masked.input_ids, mask, tt, labels=masked.labels, head_at_labels_only=True)
        by_pos = m(masked.input_ids, mask, tt, positions=masked.positions, position_labels=masked.position_labels,
                   head_at_labels_only=True)
    rows = masked.labels != -100
    assert got.logits.shape == (int(rows.sum()), TINY["vocab_size"])
    torch.testing.assert_close(got.logits, full.logits[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, full.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(by_pos.logits, got.logits, rtol=0, atol=0)
    with pytest.raises(UserError, match="head_at_labels_only=True needs labels"):
        m(masked.input_ids, mask, head_at_labels_only=True)
