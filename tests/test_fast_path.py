"""The fast MLM step end to end: BertForMLM path "fast" and `mlmfast.accelerate` on transformers' own models,
against the reference (full logits) with the same targets: the loss and every parameter gradient (fp32, within
1e-4 relative), with padding, awkward lengths, batch 1, all-padding rows, rows with nothing selected."""
import importlib.util

import pytest
import torch

import mlmfast
from mlmfast import fast
from mlmfast.config import ModelConfig
from mlmfast.errors import UserError
from mlmfast.model import BertForMLM
from mlmfast.ops import mask_select

HAS_TRITON = importlib.util.find_spec("triton") is not None
REL = 1e-4  # loss and every gradient: |fast - ref| <= REL * max|ref| + ABS
ABS = 1e-8  # floor for gradients that are 0 in exact arithmetic (e.g. the key bias: softmax is shift-invariant)
V = 97


def tiny_config(**kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=160,
                pad_token_id=0)
    base.update(kw)
    return ModelConfig(**base)


def batch(B, L, seed=0, pad_rows=True):
    """ids (B, L), attention mask with right padding (row 1 short, the last row all padding when B > 2),
    labels at ~30% of the real tokens (row 0 has none when B > 3)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    if pad_rows and B > 1:
        am[1, max(1, L // 2):] = 0
    if pad_rows and B > 2:
        am[-1] = 0
    ids[am == 0] = 0
    labels = torch.where(torch.rand(B, L, generator=g) < 0.3, ids, -100)
    labels[am == 0] = -100
    if B > 3:
        labels[0] = -100
    if (labels != -100).sum() == 0:
        labels[0, 0] = ids[0, 0]
    return ids, am, labels


def run(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(fast_run, ref_run):
    (lf, gf), (lr, gr) = fast_run, ref_run
    assert torch.isfinite(lf)
    assert abs(lf.item() - lr.item()) <= REL * abs(lr.item()) + 1e-7, (lf.item(), lr.item())
    assert set(gf) == set(gr)
    bad = {n: ((gf[n] - gr[n]).abs().max().item(), gr[n].abs().max().item())
           for n in gr if not (gf[n] - gr[n]).abs().max() <= REL * gr[n].abs().max() + ABS}
    assert not bad, bad


@pytest.fixture(params=["exact", "static"])
def selection(request, monkeypatch):
    """exact: nonzero on the CPU (the CPU path); static: the capacity + compaction used on CUDA / under compile."""
    if request.param == "static":
        monkeypatch.setattr(fast, "_compiling", lambda: True)
    return request.param


# ---- BertForMLM -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,L", [(1, 1), (4, 17), (3, 127), (2, 129), (1, 17)])
def test_bertformlm_fast_matches_reference_labels(B, L, selection):
    torch.manual_seed(0)
    model = BertForMLM(tiny_config())
    ids, am, labels = batch(B, L)
    ref = run(model.set_path("reference"), input_ids=ids, attention_mask=am, labels=labels)
    got = run(model.set_path("fast", "torch"), input_ids=ids, attention_mask=am, labels=labels)
    assert_same(got, ref)


@pytest.mark.parametrize("B,L", [(4, 17), (2, 129)])
def test_bertformlm_fast_matches_reference_positions(B, L, selection):
    torch.manual_seed(1)
    model = BertForMLM(tiny_config())
    ids, am, _ = batch(B, L)
    m = mask_select(ids, mask_token_id=4, vocab_size=V, special_token_ids=[0, 1, 2, 3, 4], attention_mask=am, seed=3)
    inputs = dict(input_ids=m.input_ids, attention_mask=am, positions=m.positions, position_labels=m.position_labels)
    ref = run(model.set_path("reference"), **inputs)  # dense labels from the same positions
    ref_labels = run(model, input_ids=m.input_ids, attention_mask=am, labels=m.labels)
    assert_same(ref, ref_labels)
    got = run(model.set_path("fast", "torch"), **inputs)
    assert_same(got, ref)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("B,L", [(3, 17), (2, 129)])
def test_bertformlm_fast_kernels_under_interpreter(B, L):
    # backend "kernel": the Triton attention (layers 1..n-1) and linear-CE kernels, run by Triton's interpreter
    torch.manual_seed(2)
    model = BertForMLM(tiny_config())
    ids, am, labels = batch(B, L, seed=4)
    ref = run(model.set_path("reference"), input_ids=ids, attention_mask=am, labels=labels)
    got = run(model.set_path("fast", "kernel"), input_ids=ids, attention_mask=am, labels=labels)
    assert_same(got, ref)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("B,L", [(3, 17), (4, 33)])
def test_lengths_give_the_kernel_seqlens_and_the_same_step(B, L, monkeypatch):
    """forward(..., lengths=) (right padding, as the trainer's batches): the Triton attention gets seqlens instead
    of a key mask, and the loss and every gradient are those of the masked call (interpreter; rows full, half,
    all padding). Lengths that do not describe the mask, or lengths without a mask: one clear error each."""
    torch.manual_seed(2)
    model = BertForMLM(tiny_config()).set_path("fast", "kernel")
    ids, am, labels = batch(B, L, seed=4)
    lengths = am.sum(1)
    calls = []
    real = fast.attention

    def spy(q, k, v, **kw):
        calls.append(sorted(k_ for k_, v_ in kw.items() if v_ is not None and k_ in ("seqlens", "key_padding_mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(fast, "attention", spy)
    masked = run(model, input_ids=ids, attention_mask=am, labels=labels)
    assert calls and all(c == ["key_padding_mask"] for c in calls)
    calls.clear()
    with_lengths = run(model, input_ids=ids, attention_mask=am, labels=labels, lengths=lengths)
    assert calls and all(c == ["seqlens"] for c in calls)
    assert_same(with_lengths, masked)
    bad = lengths.clone()
    bad[0] -= 1
    with pytest.raises(UserError, match="lengths: the attention_mask is not right padding"):
        model(ids, attention_mask=am, labels=labels, lengths=bad)
    with pytest.raises(UserError, match="lengths: pass it with the attention_mask"):
        model(ids, labels=labels, lengths=lengths)
    with pytest.raises(UserError, match="lengths shape"):
        model(ids, attention_mask=am, labels=labels, lengths=lengths[:1])
    # an accelerated HF model takes them too
    hf = mlmfast.accelerate(hf_model("bert"), backend="kernel")
    ids, am, labels = hf_batch(hf, B, L, seed=4)
    calls.clear()
    masked = run(hf, input_ids=ids, attention_mask=am, labels=labels)
    with_lengths = run(hf, input_ids=ids, attention_mask=am, labels=labels, lengths=am.sum(1))
    assert ["key_padding_mask"] in calls and ["seqlens"] in calls
    assert_same(with_lengths, masked)


def test_bertformlm_return_logits_and_defaults(selection):
    torch.manual_seed(3)
    model = BertForMLM(tiny_config())
    assert model.path == "reference" and model.fast_backend == "auto"
    ids, am, labels = batch(4, 17)
    full = model(ids, attention_mask=am).logits  # reference, (B, L, V)
    model.set_path("fast")
    out = model(ids, attention_mask=am, labels=labels)
    assert out.logits is None
    out = model(ids, attention_mask=am, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, full[labels != -100], rtol=1e-5, atol=1e-5)
    # no targets: the fast path returns the reference's full logits (inference, evaluation)
    torch.testing.assert_close(model(ids, attention_mask=am).logits, full)


def test_bertformlm_untied_and_no_padding_mask():
    torch.manual_seed(4)
    model = BertForMLM(tiny_config(tie_word_embeddings=False, hidden_act="gelu_new"))
    ids, _, labels = batch(3, 17, pad_rows=False)
    ref = run(model.set_path("reference"), input_ids=ids, labels=labels)
    got = run(model.set_path("fast"), input_ids=ids, labels=labels)
    assert_same(got, ref)


def test_bertformlm_all_labels_ignored_gives_zero():
    model = BertForMLM(tiny_config()).set_path("fast")
    ids, am, _ = batch(3, 9)
    loss, grads = run(model, input_ids=ids, attention_mask=am, labels=torch.full_like(ids, -100))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_bertformlm_bad_targets_are_user_errors():
    model = BertForMLM(tiny_config()).set_path("fast")
    ids, am, labels = batch(2, 9)
    with pytest.raises(UserError, match="together"):
        model(ids, attention_mask=am, positions=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(UserError, match="same shape"):
        model(ids, positions=torch.zeros(2, 3, dtype=torch.long), position_labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(UserError, match="labels shape"):
        model(ids, labels=labels[:, :4])
    with pytest.raises(UserError, match="path"):
        model.set_path("turbo")
    with pytest.raises(UserError, match="backend"):
        model.set_path("fast", "cuda")


def test_select_rows_static_equals_exact():
    h = torch.randn(3, 11, 8)
    _, _, labels = batch(3, 11)
    a = fast.select_rows(h, labels=labels, exact=True)
    b = fast.select_rows(h, labels=labels, exact=False)
    n = int(b.num_active)
    assert a.num_active is None and n == int((labels != -100).sum())
    assert torch.equal(a.hidden, b.hidden[:n]) and torch.equal(a.labels, b.labels[:n])
    assert torch.equal(b.hidden[n:], torch.zeros_like(b.hidden[n:])) and (b.labels[n:] == -100).all()
    # gradients: the static compaction's backward (a gather by the inverse permutation) equals the exact path's
    g = torch.randn(n, 8)
    grads = []
    for exact in (True, False):
        x = h.clone().requires_grad_(True)
        out = fast.select_rows(x, labels=labels, exact=exact).hidden
        (out[:n] * g).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    x = h.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fast.select_rows(t, labels=labels, exact=False).hidden, (x,))


# ---- transformers models ----------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def hf_model(kind, **kw):
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=200, pad_token_id=0)
    cfg.update(kw)
    torch.manual_seed(5)
    if kind == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**cfg))
    if kind == "roberta":
        cfg["pad_token_id"] = 1
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**cfg))
    cfg["pad_token_id"] = 1
    return transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(**cfg))


def hf_batch(model, B, L, seed=0, all_pad_row=False):
    ids, am, labels = batch(B, L, seed=seed, pad_rows=False)
    am[min(1, B - 1), max(1, L // 2):] = 0
    if all_pad_row:
        am[-1] = 0
    ids[am == 0] = model.config.pad_token_id
    labels[am == 0] = -100
    if (labels != -100).sum() == 0:
        labels[0, 0] = ids[0, 0]
    return ids, am, labels


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
@pytest.mark.parametrize("B,L", [(3, 17), (1, 1), (2, 129)])
def test_accelerated_hf_matches_hf(kind, B, L, selection):
    model = hf_model(kind)
    ids, am, labels = hf_batch(model, B, L)
    ref = run(model, input_ids=ids, attention_mask=am, labels=labels)
    mlmfast.accelerate(model)
    got = run(model, input_ids=ids, attention_mask=am, labels=labels)
    assert_same(got, ref)
    mlmfast.accelerate(model, path="reference")  # HF's own forward again
    assert_same(run(model, input_ids=ids, attention_mask=am, labels=labels), ref)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_accelerated_hf_all_padding_row_and_positions(kind):
    model = hf_model(kind)
    ids, am, labels = hf_batch(model, 4, 17, seed=1, all_pad_row=True)
    ref = run(model, input_ids=ids, attention_mask=am, labels=labels)
    if not torch.isfinite(ref[0]) or not all(torch.isfinite(g).all() for g in ref[1].values()):
        pytest.skip("this transformers version gives non-finite values on an all-padding row")
    mlmfast.accelerate(model)
    assert_same(run(model, input_ids=ids, attention_mask=am, labels=labels), ref)
    m = mask_select(ids, mask_token_id=4, vocab_size=V, special_token_ids=[0, 1, 2, 3, 4], attention_mask=am, seed=7)
    mlmfast.accelerate(model, path="reference")
    ref = run(model, input_ids=m.input_ids, attention_mask=am, labels=m.labels)
    mlmfast.accelerate(model)
    got = run(model, input_ids=m.input_ids, attention_mask=am, positions=m.positions,
              position_labels=m.position_labels)
    assert_same(got, ref)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gradient_checkpointing_enable's rename in transformers 5.2x
@pytest.mark.filterwarnings("ignore:mlmfast.accelerate. the model was called in training mode without labels")
def test_accelerated_hf_logits_tuple_inference_and_checkpointing():
    model = hf_model("bert")
    ids, am, labels = hf_batch(model, 3, 17)
    full = model(input_ids=ids, attention_mask=am).logits
    ref = run(model, input_ids=ids, attention_mask=am, labels=labels)
    mlmfast.accelerate(model)
    assert mlmfast.hf.is_accelerated(model)
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    assert out.logits is None
    out = model(input_ids=ids, attention_mask=am, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, full[labels != -100], rtol=1e-5, atol=1e-5)
    tup = model(input_ids=ids, attention_mask=am, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].dim() == 0
    torch.testing.assert_close(model(input_ids=ids, attention_mask=am).logits, full)  # no labels: HF's forward
    model.gradient_checkpointing_enable()
    model.train()
    assert_same(run(model, input_ids=ids, attention_mask=am, labels=labels), ref)


def test_accelerated_hf_save_pretrained_roundtrip(tmp_path):
    model = hf_model("bert")
    ids, am, labels = hf_batch(model, 3, 17)
    mlmfast.accelerate(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run(model, input_ids=ids, attention_mask=am, labels=labels)
    opt.step()  # the step updates the HF model's own (tied) parameters
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert_same(run(mlmfast.accelerate(loaded), input_ids=ids, attention_mask=am, labels=labels),
                run(model, input_ids=ids, attention_mask=am, labels=labels))


def test_accelerate_bertformlm_is_set_path():
    model = BertForMLM(tiny_config())
    assert mlmfast.accelerate(model) is model and model.path == "fast"
    mlmfast.accelerate(model, path="reference")
    assert model.path == "reference"


def test_unsupported_models_and_calls_are_reported():
    with pytest.raises(UserError, match="is_decoder"):
        mlmfast.accelerate(hf_model("bert", is_decoder=True))
    cls_model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UserError, match="not supported"):
        mlmfast.accelerate(cls_model)
    with pytest.raises(UserError, match="path"):
        mlmfast.accelerate(hf_model("bert"), path="turbo")
    model = mlmfast.accelerate(hf_model("bert"))
    ids, am, labels = hf_batch(model, 2, 9)
    with pytest.raises(UserError, match="output_attentions"):
        model(input_ids=ids, attention_mask=am, labels=labels, output_attentions=True)
    with pytest.raises(UserError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 9, 32), attention_mask=am, labels=labels)
    with pytest.raises(UserError, match="4-D"):
        model(input_ids=ids, attention_mask=am[:, None, None, :], labels=labels)
    bad = labels.clone()
    bad[am == 0] = 7  # a label at a padded position: HF computes one there, the fast path cannot
    assert (am == 0).any()
    with pytest.raises(UserError, match="padded position"):
        model(input_ids=ids, attention_mask=am, labels=bad)
    model.config.output_hidden_states = True
    with pytest.raises(UserError, match="output_hidden_states"):
        model(input_ids=ids, attention_mask=am, labels=labels)


class _DoubledLoss(transformers.BertForMaskedLM):
    def forward(self, *a, **k):
        out = super().forward(*a, **k)
        out.loss = out.loss * 2
        return out


def test_overrides_and_hooks_the_fast_path_would_skip_are_reported():
    with pytest.raises(UserError, match="overridden by"):
        mlmfast.accelerate(_DoubledLoss(hf_model("bert").config))
    model = hf_model("bert")
    handle = model.cls.register_forward_hook(lambda mod, i, o: o / 2)
    with pytest.raises(UserError, match="cls has forward hooks"):
        mlmfast.accelerate(model)
    handle.remove()
    mlmfast.accelerate(model)
    ids, am, labels = hf_batch(model, 2, 9)
    model(input_ids=ids, attention_mask=am, labels=labels)
    model.bert.encoder.layer[0].attention.self.register_forward_pre_hook(lambda mod, args: None)  # added later
    with pytest.raises(UserError, match="layer.0.attention.self has forward pre hooks"):
        model(input_ids=ids, attention_mask=am, labels=labels)


def test_accelerated_model_in_eval_mode_pickles_and_tuples(tmp_path):
    """eval(): HF's own forward (full logits for HF Trainer's metrics); torch.save / torch.load of the accelerated
    model; return_dict=False gives HF's (loss, logits) order; a train-mode call without labels warns."""
    model = hf_model("bert")
    ids, am, labels = hf_batch(model, 3, 17)
    mlmfast.accelerate(model)
    model.eval()
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    assert out.logits is not None and out.logits.shape == (3, 17, V)
    mlmfast.accelerate(model, path="reference")
    ref = model(input_ids=ids, attention_mask=am, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss)
    mlmfast.accelerate(model).train()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert mlmfast.hf.is_accelerated(loaded)
    a, b = loaded(input_ids=ids, attention_mask=am, labels=labels), model(input_ids=ids, attention_mask=am, labels=labels)
    torch.testing.assert_close(a.loss, b.loss)
    loss, logits = model(input_ids=ids, attention_mask=am, labels=labels, return_dict=False)
    assert loss.dim() == 0 and logits is None
    with pytest.warns(UserWarning, match="without labels"):
        model(input_ids=ids, attention_mask=am)


# ---- the trainer ------------------------------------------------------------------------------------------------
def test_trainer_path_config_and_cli():
    from mlmfast.cli import build_parser
    from mlmfast.trainer import TrainConfig

    assert TrainConfig().path == "fast"
    with pytest.raises(UserError, match="path"):
        TrainConfig(path="turbo").validate()
    args = build_parser().parse_args(["train", "--path", "reference"])
    assert args.path == "reference"
    assert build_parser().parse_args(["train"]).path == "fast"


# ---- GPU ---------------------------------------------------------------------------------------------------------
def _gpu_batch(device, B=8, L=128, V_=1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V_, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, L // 3:] = 0
    am[-1] = 0
    m = mask_select(ids, mask_token_id=4, vocab_size=V_, special_token_ids=[0, 1, 2, 3, 4], attention_mask=am, seed=1)
    return m.input_ids.to(device), am.to(device), m.labels.to(device), m.positions.to(device), \
        m.position_labels.to(device)


# low precision (STYLE): |fast - ref64|.max() <= 2 |ref_lowp - ref64|.max() + FLOOR * scale, per tensor; scale =
# the tensor's max |ref64|, at least 1e-3 of the largest gradient (gradients that are 0 in exact arithmetic)
LOWP_FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _check_low_precision(device, dtype, model_dtype=torch.float32):
    import copy

    cfg = tiny_config(vocab_size=1000, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                      max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForMLM(cfg).to(device)
    ids, am, labels, pos, plab = _gpu_batch(device)
    ref64 = run(copy.deepcopy(model).double().set_path("reference"), input_ids=ids, attention_mask=am, labels=labels)
    with torch.autocast(device.type, dtype=dtype):
        lowp = run(model.set_path("reference"), input_ids=ids, attention_mask=am, labels=labels)
        fast = run(model.set_path("fast"), input_ids=ids, attention_mask=am, positions=pos, position_labels=plab)
        # the same with the host's real-token count: layers 1..n-1 run unpadded (fill 0.79 < UNPAD_MAX_FILL)
        unpadded = run(model, input_ids=ids, attention_mask=am, positions=pos, position_labels=plab,
                       num_tokens=int(am.sum()))
    big = max(g.abs().max().item() for g in ref64[1].values())
    for got in (fast, unpadded):
        assert set(got[1]) == set(ref64[1])
        for name, f, p_, r in [("loss", got[0], lowp[0], ref64[0])] + \
                [(n, got[1][n], lowp[1][n], ref64[1][n]) for n in ref64[1]]:
            r = r.double()
            err, err_pt = (f.double() - r).abs().max().item(), (p_.double() - r).abs().max().item()
            scale = max(r.abs().max().item(), 1e-3 * big) if name != "loss" else abs(r.item())
            assert err <= 2 * err_pt + LOWP_FLOOR[dtype] * scale, (name, err, err_pt, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_low_precision_fast_vs_fp64_reference(cuda_device, dtype):
    """The fast path under autocast (Triton kernels) against fp64, within twice the reference path's own
    low-precision error plus a floor."""
    _check_low_precision(cuda_device, dtype)


@pytest.mark.gpu
def test_gpu_fast_step_has_no_host_sync(cuda_device):
    cfg = tiny_config(vocab_size=1000, hidden_size=128, num_attention_heads=2, intermediate_size=512,
                      max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = BertForMLM(cfg).to(cuda_device).set_path("fast").train()
    ids, am, labels, pos, plab = _gpu_batch(cuda_device)
    n = int(am.sum())  # counted before the guard (the trainer counts the host copy of the batch)
    for inputs in (dict(labels=labels), dict(positions=pos, position_labels=plab),
                   dict(positions=pos, position_labels=plab, num_tokens=n),  # unpadded
                   dict(positions=pos, position_labels=plab, lengths=am.sum(1))):  # seqlens for the kernel
        for guarded in (False, True):  # a warm-up in the guarded dtype (Triton compiles, lazy imports), then the step
            torch.cuda.synchronize()
            if guarded:
                torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(ids, attention_mask=am, **inputs).loss
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["bertformlm", "hf-bert"])
def test_gpu_fast_model_compiles_fullgraph_with_inductor(cuda_device, which):
    """torch.compile(fullgraph=True) with inductor on the GPU under bf16 autocast: no graph break, and the compiled
    loss equals eager's (same weights, same batch, dropout off)."""
    ids, am, labels, pos, plab = _gpu_batch(cuda_device)
    if which == "bertformlm":
        cfg = tiny_config(vocab_size=1000, hidden_size=128, num_attention_heads=2, intermediate_size=512,
                          max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertForMLM(cfg).to(cuda_device).set_path("fast").train()
        inputs = dict(input_ids=ids, attention_mask=am, positions=pos, position_labels=plab)
    else:
        model = mlmfast.accelerate(hf_model("bert", vocab_size=1000, max_position_embeddings=512).to(cuda_device))
        inputs = dict(input_ids=ids, attention_mask=am, labels=labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(**inputs).loss.float()
        loss = torch.compile(model, fullgraph=True)(**inputs).loss.float()
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, eager, rtol=2e-2, atol=0)  # bf16: inductor may fuse / round differently


@pytest.mark.gpu
def test_gpu_compiled_unpadded_step(cuda_device):
    """What `mlmfast train --compile` runs on padded batches: inductor, bf16, the host's real-token count. Three
    batches with three counts: the loss and the gradients equal the eager padded step's (bf16 tolerance), two
    builds in all (the count is a dynamic size), and the third step, after the builds, has no host sync."""
    from torch._dynamo.utils import counters

    cfg = tiny_config(vocab_size=1000, hidden_size=128, num_attention_heads=2, intermediate_size=512,
                      max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForMLM(cfg).to(cuda_device).set_path("fast").train()
    ids, am, labels, pos, plab = _gpu_batch(cuda_device)

    def step(fn, am, guarded=False, **extra):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if guarded:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(ids, attention_mask=am, positions=pos, position_labels=plab, **extra).loss
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(model, fullgraph=True)
        for i, length in enumerate((50, 60, 70)):
            am_i = am.clone()
            am_i[1, :length] = 1  # row 1 (42 real tokens, its labels among them) grows: another count each time
            n = int(am_i.cpu().sum())  # counted before any guard, as the trainer counts the host batch
            assert n <= fast.UNPAD_MAX_FILL * am_i.numel()
            eager = step(model, am_i)
            got = step(compiled, am_i, guarded=i == 2, num_tokens=n)
            torch.testing.assert_close(got[0], eager[0], rtol=2e-2, atol=0)
            for name, g in eager[1].items():
                err = (got[1][name] - g).abs().max().item()
                assert err <= 5e-2 * g.abs().max().item() + 1e-4, (name, err)
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_compiled_hf_model_takes_any_sequence_length(cuda_device):
    """An accelerated HF model under torch.compile(fullgraph=True) with inductor on the GPU, fed batches padded to
    their longest row (three lengths): two builds in all (L becomes dynamic), losses equal eager's (bf16)."""
    from torch._dynamo.utils import counters

    model = mlmfast.accelerate(hf_model("bert", vocab_size=1000, max_position_embeddings=512).to(cuda_device))
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(model, fullgraph=True)
        for L in (96, 128, 200):
            ids, am, labels, _, _ = _gpu_batch(cuda_device, L=L)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                eager = model(input_ids=ids, attention_mask=am, labels=labels).loss.float()
                got = compiled(input_ids=ids, attention_mask=am, labels=labels).loss.float()
            got.backward()
            torch.testing.assert_close(got, eager, rtol=2e-2, atol=0)
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("which", ["bertformlm", "hf-bert", "hf-roberta"])
def test_fast_model_compiles_fullgraph_on_cpu(which):
    """The whole fast step traces into one graph (no graph break: the GPU test's fullgraph compile of the same
    Python would fail on one) and the compiled loss and every gradient equal eager's. aot_eager: dynamo + AOT
    autograd, no code generation, so CI stays fast. Padding, a row with no label, an all-padding row."""
    if which == "bertformlm":
        torch.manual_seed(3)
        model = BertForMLM(tiny_config()).set_path("fast")
        ids, am, labels = batch(4, 33)
    else:
        model = mlmfast.accelerate(hf_model(which.split("-")[1]))
        ids, am, labels = hf_batch(model, 3, 33, all_pad_row=True)
    inputs = dict(input_ids=ids, attention_mask=am, labels=labels)
    ref = run(model, **inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    try:
        model.zero_grad(set_to_none=True)
        loss = compiled(**inputs).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
    got = loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same(got, ref)


# ---- unpadding (CPU, backend "auto") ---------------------------------------------------------------------------
@pytest.mark.parametrize("B,L", [(4, 17), (3, 127), (5, 129), (2, 1)])
def test_unpadded_layers_match_reference(B, L, monkeypatch):
    """Padded enough, the CPU fast path runs the dense ops of layers 1..n-1 on the real tokens only (T, H): the
    loss and every gradient still equal the reference's. Rows: full, half, length 1, all padding."""
    torch.manual_seed(2)
    model = BertForMLM(tiny_config(num_hidden_layers=3))
    ids, am, _ = batch(B, L)
    if B > 2 and L > 1:
        am[2, 1:] = 0  # a row of length 1
        ids[am == 0] = 0
    m = mask_select(ids, mask_token_id=4, vocab_size=V, special_token_ids=[0, 1, 2, 3, 4], attention_mask=am,
                    mlm_probability=0.3, seed=5)
    inputs = dict(input_ids=m.input_ids, attention_mask=am, positions=m.positions, position_labels=m.position_labels)
    plans = []
    real = fast.unpad_plan
    monkeypatch.setattr(fast, "unpad_plan", lambda *a: plans.append(real(*a)) or plans[-1])
    monkeypatch.setattr(fast, "UNPAD_MAX_FILL", 1.0)  # always unpad (also the all-real batch of L = 1)
    ref = run(model.set_path("reference"), input_ids=m.input_ids, attention_mask=am, labels=m.labels)
    got = run(model.set_path("fast", "auto"), **inputs)
    assert plans and plans[-1] is not None and plans[-1].index.numel() == int(am.sum())
    assert_same(got, ref)
    # the host's count (as the trainer passes it): the same plan, and on a GPU the only way to get one
    assert_same(run(model, **inputs, num_tokens=int(am.sum())), got)
    assert plans[-1] is not None and torch.equal(plans[-1].index, fast.real_token_index(am.reshape(-1) != 0,
                                                                                        int(am.sum())))
    monkeypatch.setattr(fast, "UNPAD_MAX_FILL", -1.0)  # never: the padded layout gives the same
    assert_same(run(model, **inputs), got)
    assert plans[-1] is None


def test_unpadding_only_when_it_pays_and_costs_no_sync():
    keep = torch.ones(4, 10, dtype=torch.bool)
    assert fast.unpad_plan(keep, "auto") is None  # full rows: nothing to drop
    keep[1:, 3:] = False
    plan = fast.unpad_plan(keep, "auto")
    assert plan is not None and plan.index.tolist() == list(range(10)) + [10, 11, 12, 20, 21, 22, 30, 31, 32]
    x = torch.randn(4, 10, 6)
    torch.testing.assert_close(plan.unpack(plan.pack(x)), x * keep[..., None])
    assert fast.unpad_plan(keep, "torch") is None and fast.unpad_plan(keep, "kernel") is None
    assert fast.unpad_plan(keep.to("meta"), "auto") is None  # not a CPU tensor (on CUDA counting would sync)
    assert fast.unpad_plan(None, "auto") is None
    # off the CPU the plan needs the count known on the host; the index is then built without reading the mask
    plan = fast.unpad_plan(keep.to("meta"), "auto", num_tokens=19)
    assert plan is not None and plan.index.shape == (19,) and plan.index.device.type == "meta"
    assert fast.unpad_plan(keep.to("meta"), "auto", num_tokens=36) is None  # 90% real: does not pay
    assert fast.unpad_plan(keep, "auto", num_tokens=19).index.tolist() == plan_cpu_index(keep)
    with pytest.raises(UserError, match="num_tokens: expected the number of real .* 19, got 20"):
        fast.unpad_plan(keep, "auto", num_tokens=20)  # on the CPU a wrong count is caught exactly


@pytest.mark.parametrize("which", ["bertformlm", "hf-bert"])
def test_compiled_step_unpads_with_the_host_count(which):
    """Under torch.compile the plan comes from num_tokens only (counting the mask would be a data-dependent shape):
    the traced graph holds the sync-free index (a sort), the loss and every gradient equal eager's, and the count
    is a dynamic size: five batches with five counts build two graphs, not five. Without the count the compiled
    step runs the padded layout (no sort in its graph), as before. BertForMLM and an accelerated HF model."""
    torch.manual_seed(4)
    if which == "bertformlm":
        model = BertForMLM(tiny_config(num_hidden_layers=3)).set_path("fast")
    else:
        model = mlmfast.accelerate(hf_model("bert", num_hidden_layers=3))
    graphs = []

    def backend(gm, example_inputs):  # dynamo's graph, kept for inspection and run as it is (autograd as usual)
        graphs.append(gm)
        return gm.forward

    def step(fn, **inputs):
        model.zero_grad(set_to_none=True)
        loss = fn(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def sorts(gm):
        return sum(n.op == "call_function" and n.target is torch.sort for n in gm.graph.nodes)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        for i in range(5):
            ids, am, labels = batch(4, 33, seed=i)
            am[0, 5 + 3 * i:] = 0  # a different count each time
            ids[am == 0] = 0
            labels[am == 0] = -100
            labels[0, 1] = ids[0, 1]
            inputs = dict(input_ids=ids, attention_mask=am, labels=labels)
            n = int(am.sum())
            assert n <= fast.UNPAD_MAX_FILL * am.numel()
            assert_same(step(compiled, **inputs, num_tokens=n), step(model, **inputs))  # eager: counts itself
        assert len(graphs) == 2 and all(sorts(g) == 1 for g in graphs), [sorts(g) for g in graphs]
        torch._dynamo.reset()
        graphs.clear()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        assert_same(step(compiled, **inputs), step(model, **inputs))
        assert len(graphs) == 1 and sorts(graphs[0]) == 0
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("which", ["bertformlm-kernel", "bertformlm-auto", "hf-bert"])
def test_compiled_step_takes_any_sequence_length(which):
    """Batches padded to their longest row (HF's collators, MLMCollator) change L from call to call, and a short
    last batch changes B: under torch.compile(fullgraph=True) they become dynamic sizes after the second shape,
    so four shapes build two graphs, and every loss and gradient equals eager's. (The argument checks once wrote sizes into their messages
    while tracing, which made dynamo specialise L, or fail on str() of a dynamic size.) The kernel variant runs
    the Triton attention and linear-CE custom ops (their fake shapes) under the interpreter."""
    from torch._dynamo.utils import counters

    torch.manual_seed(6)
    if which.startswith("bertformlm"):
        model = BertForMLM(tiny_config()).set_path("fast", which.split("-")[1])
    else:
        model = mlmfast.accelerate(hf_model("bert"))

    def step(fn, **inputs):
        model.zero_grad(set_to_none=True)
        loss = fn(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        for B, L in ((3, 17), (5, 33), (4, 41), (2, 64)):  # a short last batch changes B too
            ids, am, labels = (batch(B, L, seed=L) if which.startswith("bertformlm") else
                               hf_batch(model, B, L, seed=L))
            inputs = dict(input_ids=ids, attention_mask=am, labels=labels)
            assert_same(step(compiled, **inputs), step(model, **inputs))
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    finally:
        torch._dynamo.reset()


def plan_cpu_index(keep):
    return keep.reshape(-1).nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("B,L", [(1, 1), (1, 17), (4, 127), (3, 129)])
def test_real_token_index_is_nonzero_without_reading_the_count(B, L):
    """The sync-free index (a stable sort, given the count) equals nonzero's, for any mask pattern: random holes,
    all-real and all-padding rows, nothing real at all."""
    g = torch.Generator().manual_seed(B * 1000 + L)
    for keep in (torch.rand(B, L, generator=g) < 0.4, torch.ones(B, L, dtype=torch.bool),
                 torch.zeros(B, L, dtype=torch.bool)):
        if B > 2:
            keep[1] = True
            keep[2] = False
        flat = keep.reshape(-1)
        assert fast.real_token_index(flat, int(flat.sum())).tolist() == plan_cpu_index(keep)


@pytest.mark.parametrize("bad", [-1, 4 * 10 + 1, 2.0, True, torch.tensor(3), "7"])
def test_num_tokens_bad_values_get_one_clear_error(bad):
    model = BertForMLM(tiny_config())
    ids, am, _ = batch(4, 10)
    m = mask_select(ids, mask_token_id=4, vocab_size=V, special_token_ids=[0, 1, 2, 3, 4], attention_mask=am,
                    seed=1)
    with pytest.raises(UserError, match=r"num_tokens: expected None or a Python int in \[0, B \* L\] = \[0, 40\]"):
        model.set_path("fast")(m.input_ids, attention_mask=am, positions=m.positions,
                               position_labels=m.position_labels, num_tokens=bad)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_accelerated_hf_unpadded_layers_match_hf(kind, monkeypatch):
    model = hf_model(kind, num_hidden_layers=3)
    ids, am, labels = hf_batch(model, 4, 33, seed=3, all_pad_row=False)
    ref = run(model, input_ids=ids, attention_mask=am, labels=labels)
    plans = []
    real = fast.unpad_plan
    monkeypatch.setattr(fast, "unpad_plan", lambda *a: plans.append(real(*a)) or plans[-1])
    monkeypatch.setattr(fast, "UNPAD_MAX_FILL", 1.0)
    mlmfast.accelerate(model)
    got = run(model, input_ids=ids, attention_mask=am, labels=labels)
    assert plans and plans[-1] is not None and plans[-1].index.numel() == int(am.sum())
    assert_same(got, ref)


# ---- fused q/k/v projection ------------------------------------------------------------------------------------
def test_project_fuses_plain_linears_exactly_and_keeps_hooks():
    """fast.project: one matmul on the concatenated weights when the layers are plain nn.Linear without hooks —
    the same outputs and gradients as calling each layer; any hook, subclass or bias mismatch calls each module,
    so the hook runs."""
    import torch.nn as nn

    torch.manual_seed(0)
    lins = [nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)]
    x = torch.randn(3, 5, 16, requires_grad=True)

    def grads(outs):
        loss = sum((o * torch.arange(o.numel()).view_as(o).sin()).sum() for o in outs)
        return torch.autograd.grad(loss, [x] + [p for m in lins for p in m.parameters()])

    calls = []
    real_linear = torch.nn.functional.linear
    fused = fast.project(x, *lins)
    assert [tuple(o.shape) for o in fused] == [(3, 5, 16), (3, 5, 16), (3, 5, 8)]
    ref = tuple(m(x) for m in lins)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(fused), grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # one F.linear call when fused; each module called (hooks run) otherwise
    import mlmfast.fast as fm
    orig = fm.F.linear
    try:
        fm.F.linear = lambda *a, **k: calls.append(1) or real_linear(*a, **k)
        fast.project(x, *lins)
        assert calls == [1]
    finally:
        fm.F.linear = orig
    seen = []
    h = lins[1].register_forward_hook(lambda m, i, o: seen.append(m))
    fast.project(x, *lins)
    assert seen == [lins[1]]
    h.remove()

    class MyLinear(nn.Linear):
        pass

    sub = MyLinear(16, 16)
    sub.register_forward_pre_hook(lambda m, i: seen.append("sub"))
    fast.project(x, lins[0], sub)
    assert seen[-1] == "sub"
    nobias = nn.Linear(16, 16, bias=False)
    for a, b in zip(fast.project(x, lins[0], nobias), (lins[0](x), nobias(x))):
        torch.testing.assert_close(a, b)
    g = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append("global"))
    try:
        fast.project(x, *lins)
        assert seen[-3:] == ["global"] * 3
    finally:
        g.remove()


def test_fast_model_runs_query_hooks():
    """A forward hook on a layer's query projection still runs on the fast path (the fused projection steps
    aside), and the loss is the hook-free one."""
    torch.manual_seed(1)
    model = BertForMLM(tiny_config(num_hidden_layers=2)).set_path("fast")
    ids, am, _ = batch(2, 9)
    m = mask_select(ids, mask_token_id=4, vocab_size=V, special_token_ids=[0, 1, 2, 3, 4], attention_mask=am,
                    mlm_probability=0.3, seed=2)
    inputs = dict(input_ids=m.input_ids, attention_mask=am, positions=m.positions, position_labels=m.position_labels)
    base = model(**inputs).loss
    seen = []
    model.bert["encoder"]["layer"][0].attention["self"].query.register_forward_hook(lambda *a: seen.append(1))
    torch.testing.assert_close(model(**inputs).loss, base, rtol=1e-6, atol=0)
    assert seen == [1]
