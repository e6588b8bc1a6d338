"""A night's run survives bad steps and bad data: non-finite steps are skipped and counted (and too many in a row
stop the run with the last good checkpoint kept), out-of-memory says what to change, and bad corpora, tokenizers
and prepared directories each get one clear error."""
import json
import os

import pytest
import torch

import mlmfast.trainer as trainer
from mlmfast.checkpoint import checkpoint_dirs, verify_checkpoint
from mlmfast.errors import UserError
from mlmfast.trainer import NonFiniteError, TrainConfig, train


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_file):
    from mlmfast.data import read_corpus
    from mlmfast.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(read_corpus(str(corpus_file)), vocab_size=400).save(str(d))
    return d


def cfg(corpus_file, tok_dir, out, **kw):
    base = dict(data=[str(corpus_file)], tokenizer=str(tok_dir), out_dir=str(out), model="bert-tiny", seq_len=32,
                batch_size=8, max_steps=8, save_every=1, keep_checkpoints=20, eval_every=100, eval_batches=1,
                log_every=1, lr=2e-3, seed=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _poison(monkeypatch, bad_calls):
    """Make the training forward return a NaN loss on the given (0-based) calls."""
    real = trainer.train_forward
    calls = {"n": 0}

    def forward(model, path, masked, attention_mask, num_tokens=None, lengths=None):
        out = real(model, path, masked, attention_mask, num_tokens, lengths)
        i = calls["n"]
        calls["n"] += 1
        if i in bad_calls or ("all_from" in bad_calls and i >= bad_calls["all_from"]):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer, "train_forward", forward)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_steps_are_skipped_and_counted(corpus_file, tok_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, {3: 1, 4: 1})  # steps 4 and 5
    lines = []
    r = train(cfg(corpus_file, tok_dir, tmp_path / "run"), log=lines.append)
    assert r.steps == 8
    ck = {int(os.path.basename(p)[5:]): p for p in checkpoint_dirs(str(tmp_path / "run"))}
    # skipped steps leave weights and optimizer state as they were; the steps around them change both
    assert _same(_weights(ck[3]), _weights(ck[4])) and _same(_weights(ck[4]), _weights(ck[5]))
    assert not _same(_weights(ck[2]), _weights(ck[3])) and not _same(_weights(ck[5]), _weights(ck[6]))
    s3, s5 = (torch.load(os.path.join(ck[k], "trainer_state.pt"), weights_only=False) for k in (3, 5))
    assert all(torch.equal(s3["optimizer"]["state"][i]["exp_avg"], s5["optimizer"]["state"][i]["exp_avg"])
               for i in s3["optimizer"]["state"])
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    train_rows = {x["step"]: x for x in rows if x["split"] == "train"}
    assert train_rows[3]["skipped_steps"] == 0 and train_rows[5]["skipped_steps"] == 2
    assert train_rows[8]["skipped_steps"] == 2
    assert any("skipped 1 step(s)" in l for l in lines)
    assert all(torch.isfinite(v).all() for v in _weights(os.path.join(r.run_dir, "model")).values())


def test_too_many_bad_steps_in_a_row_stop_the_run_and_keep_the_good_checkpoint(corpus_file, tok_dir, tmp_path,
                                                                                 monkeypatch):
    _poison(monkeypatch, {"all_from": 3})  # from step 4 on
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row .*step-000003") as info:
        train(cfg(corpus_file, tok_dir, out, max_bad_steps=3, save_every=3), log=lambda m: None)
    assert "--lr" in str(info.value) and "--resume auto" in str(info.value)
    ckpts = checkpoint_dirs(str(out))
    assert [os.path.basename(p) for p in ckpts] == ["step-000003"]
    verify_checkpoint(ckpts[-1])
    assert not (out / "model").exists()


def test_out_of_memory_says_what_to_change(corpus_file, tok_dir, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer, "train_forward", oom)
    with pytest.raises(UserError, match=r"out of CPU memory at --batch-size 8.*--batch-size 4 --grad-accum 2"):
        train(cfg(corpus_file, tok_dir, tmp_path / "run"), log=lambda m: None)


def test_out_of_memory_is_one_line_in_the_cli(corpus_file, tok_dir, tmp_path, monkeypatch, capsys):
    from mlmfast.cli import main

    monkeypatch.setattr(trainer, "train_forward",
                        lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    code = main(["train", "--data", str(corpus_file), "--tokenizer", str(tok_dir), "--model", "bert-tiny",
                 "--seq-len", "32", "--max-steps", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: out of CPU memory") and "--grad-accum" in err[0]


# ---- bad data ----------------------------------------------------------------------------------------------


def test_non_utf8_bytes_are_replaced_and_reported(corpus_file, tok_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    text = corpus_file.read_bytes()
    (data / "a.txt").write_bytes(text[:20000] + b"\n\nbroken \xff\xfe bytes \xc3 here\n\n" + text[20000:40000])
    (data / "empty.txt").write_bytes(b"")
    (data / "blank.txt").write_bytes(b"\n\n   \n\n")
    lines = []
    r = train(cfg(corpus_file, tok_dir, tmp_path / "run", data=[str(data)], max_steps=2, save_every=2),
              log=lines.append)
    assert r.steps == 2
    assert any("3 invalid UTF-8 sequence(s) replaced" in l for l in lines), lines


def test_empty_corpus_is_one_clear_error(tmp_path, tok_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.txt").write_bytes(b"")
    (data / "blank.txt").write_bytes(b"\n  \n\n")
    with pytest.raises(UserError, match="is empty: no text found in 2 file"):
        train(cfg(data, tok_dir, tmp_path / "run", data=[str(data)]), log=lambda m: None)


def test_tokenizer_larger_than_the_model_vocabulary(corpus_file, tok_dir, tmp_path):
    from mlmfast.config import ModelConfig
    from mlmfast.model import BertForMLM

    small = tmp_path / "small-model"
    BertForMLM(ModelConfig.from_preset("bert-tiny", vocab_size=100)).save_pretrained(str(small))
    with pytest.raises(UserError, match="the tokenizer has 400 tokens but the model .* has vocab_size=100"):
        train(cfg(corpus_file, tok_dir, tmp_path / "run", model=str(small)), log=lambda m: None)


# ---- prepared shards in the trainer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_file, tok_dir):
    from mlmfast.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare_corpus([str(corpus_file)], str(tok_dir), str(out), workers=2, shard_tokens=20000, val_fraction=0.05,
                   progress=False)
    return out


def test_train_streams_prepared_shards_and_resumes_exactly(prepared, tmp_path):
    def c(out, **kw):
        return TrainConfig(data=[str(prepared)], out_dir=str(out), model="bert-tiny", seq_len=32, batch_size=8,
                           max_steps=10, save_every=5, eval_every=5, eval_batches=2, log_every=1, lr=2e-3,
                           progress=False, **kw)

    lines = []
    ref = train(c(tmp_path / "ref", val_fraction=0.2), log=lines.append)
    assert any("prepared shards" in l for l in lines)
    assert any("--val-fraction 0.2 has no effect on prepared shards" in l for l in lines)
    assert ref.last_val["val_loss"] < ref.first_val["val_loss"]
    run = tmp_path / "run"
    train(c(run), stop_after=5, log=lambda m: None)
    r = train(c(run), resume="auto", log=lambda m: None)
    assert r.train_losses == ref.train_losses[5:]
    assert _same(_weights(tmp_path / "ref" / "model"), _weights(run / "model"))


@pytest.mark.parametrize("vocab,lowercase,message", [
    (400, False, "prepared with tokenizer"),  # same size, other vocabulary (cased)
    (300, True, "token ids out of range"),  # the shards hold ids the tokenizer does not have
])
def test_prepared_directory_from_another_tokenizer_is_refused(prepared, corpus_file, tmp_path, vocab, lowercase,
                                                             message):
    from mlmfast.data import read_corpus
    from mlmfast.tokenizer import train_tokenizer

    other = tmp_path / "other-tok"
    train_tokenizer(read_corpus(str(corpus_file)), vocab_size=vocab, lowercase=lowercase).save(str(other))
    c = TrainConfig(data=[str(prepared)], tokenizer=str(other), out_dir=str(tmp_path / "run"), model="bert-tiny",
                    seq_len=32, batch_size=8, max_steps=2, progress=False)
    with pytest.raises(UserError, match=message):
        train(c, log=lambda m: None)


def test_whole_word_masking_needs_text_not_prepared_shards(prepared, tmp_path):
    c = TrainConfig(data=[str(prepared)], out_dir=str(tmp_path / "run"), model="bert-tiny", seq_len=32,
                    batch_size=8, max_steps=2, whole_word=True, progress=False)
    with pytest.raises(UserError, match="--whole-word needs word boundaries"):
        train(c, log=lambda m: None)


@pytest.mark.gpu
def test_cuda_run_with_the_guard_learns_and_resumes_exactly(corpus_file, tok_dir, tmp_path, cuda_device):
    """On a GPU: bf16 autocast, fast path, the device-side non-finite guard; a stopped and resumed run (with
    --deterministic) equals an uninterrupted one."""
    def c(out):
        return cfg(corpus_file, tok_dir, out, max_steps=30, save_every=10, eval_every=15, eval_batches=4,
                   log_every=5, device="cuda", precision="bf16", deterministic=True, seq_len=64, batch_size=16)

    ref = train(c(tmp_path / "ref"), log=lambda m: None)
    assert ref.last_val["val_loss"] < ref.first_val["val_loss"] - 0.3
    train(c(tmp_path / "run"), stop_after=10, log=lambda m: None)
    r = train(c(tmp_path / "run"), resume="auto", log=lambda m: None)
    assert r.train_losses == ref.train_losses[10:]
    assert _same(_weights(tmp_path / "ref" / "model"), _weights(tmp_path / "run" / "model"))


@pytest.mark.gpu
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_cuda_compiled_run_learns(corpus_file, tok_dir, tmp_path, cuda_device, pack):
    """--compile on a GPU (inductor, bf16 autocast, fast path with the Triton kernels as custom ops): the run
    builds, learns, and its first loss is the eager run's (same weights and batch; dropout off). Padded rows (one
    document per row): the compiled step gets each batch's real-token count and unpads (a dynamic size)."""
    data = corpus_file
    if not pack:  # one line per document: short documents, rows mostly padding
        data = tmp_path / "short.txt"
        lines = [ln.strip() for ln in corpus_file.read_text().splitlines() if ln.strip()]
        data.write_text("\n\n".join(lines[:3000]) + "\n")

    def c(out, compile):
        return cfg(data, tok_dir, out, max_steps=20, save_every=20, eval_every=20, eval_batches=4,
                   log_every=5, device="cuda", precision="bf16", seq_len=64, batch_size=16, dropout=0.0,
                   compile=compile, pack=pack)

    torch._dynamo.reset()
    try:
        comp = train(c(tmp_path / "compiled", True), log=lambda m: None)
    finally:
        torch._dynamo.reset()
    eager = train(c(tmp_path / "eager", False), log=lambda m: None)
    assert comp.last_val["val_loss"] < comp.first_val["val_loss"] - 0.3
    assert abs(comp.train_losses[0] - eager.train_losses[0]) <= 2e-2 * abs(eager.train_losses[0])


@pytest.mark.gpu
@pytest.mark.parametrize("accum", [1, 2])
def test_training_step_has_no_host_sync(cuda_device, accum):
    """Masking + trainer.train_step (fast path, bf16 autocast, clipping, the non-finite guard, fused AdamW) with
    torch.cuda.set_sync_debug_mode("error"): any device->host sync raises."""
    from mlmfast.config import ModelConfig
    from mlmfast.model import BertForMLM
    from mlmfast.trainer import MaskingSpec, make_optimizer, train_step

    torch.manual_seed(0)
    V, B, L = 1000, 8, 128
    model = BertForMLM(ModelConfig.from_preset("bert-mini", vocab_size=V)).to(cuda_device).set_path("fast")
    opt = make_optimizer(model, TrainConfig(), cuda_device)
    spec = MaskingSpec(mask_token_id=4, vocab_size=V, special_token_ids=[0, 1, 2, 3, 4])
    keep = torch.ones(B, L, dtype=torch.long, device=cuda_device)
    keep[1, 50:] = 0
    keep[2, 1:] = 0
    batch = {"input_ids": torch.randint(5, V, (B, L), device=cuda_device) * keep, "attention_mask": keep,
             "lengths": keep.sum(1)}  # right padding: the trainer passes the lengths (the kernel takes seqlens)

    def step(seed):
        mbs = [(batch, spec.apply(batch, seed=seed, row_offset=i * B)) for i in range(accum)]
        return train_step(model, opt, None, mbs, "fast", 1.0, torch.bfloat16)

    step(0)  # warm-up: kernel compilation and allocator growth may sync
    torch.cuda.synchronize()
    before = model.bert["embeddings"].word_embeddings.weight.detach().clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, gnorm, bad = step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert float(bad) == 0.0 and torch.isfinite(loss) and float(gnorm) > 0
    assert not torch.equal(before, model.bert["embeddings"].word_embeddings.weight)


def test_prepared_directory_is_not_read_as_text(prepared, corpus_file, tmp_path):
    from mlmfast.data import read_corpus

    with pytest.raises(UserError, match="holds prepared shards"):
        read_corpus([str(prepared), str(corpus_file)])
    # inside a text directory, a prepared directory (its tokenizer/vocab.txt) is skipped by the walk
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data / "prepared")
    (data / "a.txt").write_text("One document here.\n\nAnother one.\n")
    assert read_corpus(str(data)) == ["One document here.", "Another one."]
