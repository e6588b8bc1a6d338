"""Trainer: a short run learns, writes everything it promises, and a resumed run equals an uninterrupted one."""
import json
import math
import os

import pytest
import torch

from mlmfast.errors import UserError
from mlmfast.trainer import TrainConfig, checkpoint_dirs, lr_lambda, train

QUIET = dict(progress=False)


def tiny_cfg(corpus_file, out_dir, **kw):
    base = dict(data=[str(corpus_file)], out_dir=str(out_dir), model="bert-tiny", seq_len=32, batch_size=8,
                vocab_size=400, max_steps=20, eval_every=10, eval_batches=4, log_every=2, save_every=10,
                lr=2e-3, seed=3, **QUIET)
    base.update(kw)
    return TrainConfig(**base)


def _silent(msg):
    pass


def test_short_run_learns_and_writes_run_directory(corpus_file, tmp_path):
    cfg = tiny_cfg(corpus_file, tmp_path / "run", max_steps=40, eval_every=20, vocab_size=1000, seq_len=64,
                   batch_size=16, lr=3e-3)
    r = train(cfg, log=_silent)
    assert r.steps == 40 and len(r.train_losses) == 40
    assert all(math.isfinite(x) for x in r.train_losses)
    # learning: the validation loss falls clearly below its value at step 0 (about ln 1000 = 6.9 at init)
    assert r.first_val["val_loss"] > 6.0
    assert r.last_val["val_loss"] < r.first_val["val_loss"] - 0.5
    run = tmp_path / "run"
    for name in ("train_config.json", "metrics.jsonl", "loss.png", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/vocab.txt", "tokenizer/tokenizer.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 20, 40]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(2, 41, 2))
    assert all(r["tokens_per_s"] > 0 for r in rows if r["split"] == "train")
    assert (run / "loss.png").stat().st_size > 10_000
    # only the newest `keep_checkpoints` checkpoints are kept, each complete
    ckpts = checkpoint_dirs(str(run))
    assert [os.path.basename(c) for c in ckpts] == ["step-000030", "step-000040"]
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp")]


def test_resume_continues_exactly(corpus_file, tmp_path):
    """Stop at step 7, resume to 16: the losses of steps 8..16 and the final weights equal an uninterrupted run.

    Both runs share one tokenizer: `tokenizers`' WordPiece trainer breaks ties between equally frequent merges
    differently from run to run, so two fresh runs may learn slightly different vocabularies (a run keeps its
    own tokenizer in RUN/tokenizer, so its resume always uses the same one)."""
    from mlmfast.data import read_corpus
    from mlmfast.tokenizer import train_tokenizer

    tok_dir = tmp_path / "tok"
    train_tokenizer(read_corpus([str(corpus_file)]), vocab_size=400).save(str(tok_dir))
    kw = dict(max_steps=16, save_every=5, grad_accum=2, tokenizer=str(tok_dir))
    full = train(tiny_cfg(corpus_file, tmp_path / "full", **kw), log=_silent)
    first = train(tiny_cfg(corpus_file, tmp_path / "part", **kw), log=_silent, stop_after=7)
    assert first.steps == 7
    assert first.train_losses == full.train_losses[:7]
    second = train(tiny_cfg(corpus_file, tmp_path / "part", **kw), resume=True, log=_silent)
    assert second.steps == 16
    assert second.train_losses == full.train_losses[7:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in open(tmp_path / "part" / "metrics.jsonl")
             if json.loads(l)["split"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated log lines after the resume


def test_new_run_refuses_existing_run_dir(corpus_file, tmp_path):
    train(tiny_cfg(corpus_file, tmp_path / "run", max_steps=2), log=_silent)
    with pytest.raises(UserError, match="--resume"):
        train(tiny_cfg(corpus_file, tmp_path / "run", max_steps=2), log=_silent)


def test_deterministic_mode_is_put_back(corpus_file, tmp_path, monkeypatch):
    """--deterministic is process-wide in torch: train() restores the caller's mode (and CUBLAS_WORKSPACE_CONFIG)."""
    import os

    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    train(tiny_cfg(corpus_file, tmp_path / "run", max_steps=2, deterministic=True), log=_silent)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_continue_from_pretrained_model_dir(corpus_file, tmp_path):
    """Domain adaptation: --model DIR starts from those weights and that directory's tokenizer."""
    a = train(tiny_cfg(corpus_file, tmp_path / "a", max_steps=10), log=_silent)
    b = train(tiny_cfg(corpus_file, tmp_path / "b", max_steps=4, model=str(tmp_path / "a" / "model")), log=_silent)
    # same split, same tokenizer, same validation masks: b starts exactly where a ended
    assert b.first_val["val_loss"] == pytest.approx(a.last_val["val_loss"], rel=1e-6)
    assert b.first_val["val_loss"] < a.first_val["val_loss"] - 0.1


@pytest.mark.parametrize("kw, match", [
    (dict(mlm_probability=1.5), "mlm_probability"),
    (dict(mlm_probability=0.0), "mlm_probability"),
    (dict(mask_replace_prob=0.8, random_replace_prob=0.3), "> 1"),
    (dict(seq_len=2), "seq-len"),
    (dict(batch_size=0), "batch-size"),
    (dict(schedule="step"), "schedule"),
])
def test_bad_config(corpus_file, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        train(tiny_cfg(corpus_file, tmp_path / "run", **kw), log=_silent)


def test_warmup_then_decay():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, schedule="linear")
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == 0.0
    g = lr_lambda(TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine"))
    assert g(10) == pytest.approx(1.0) and g(55) == pytest.approx(0.5) and g(100) == pytest.approx(0.0, abs=1e-12)


def test_compile_trains_the_same_steps(corpus_file, tmp_path, monkeypatch):
    """--compile sends the training forward through torch.compile (aot_eager here: the same traced graphs
    without generated code): the same losses as the eager run (dropout off: compiled RNG may draw in another
    order), plain state-dict keys in the saved model, and a resume may switch it off. One document per row
    (padded rows): the compiled forward gets each batch's real-token count from the host (what lets it run the
    dense ops on the real tokens; the eager one counts for itself on the CPU and gets none)."""
    import mlmfast.trainer as trainer_mod
    from mlmfast.data import read_corpus
    from mlmfast.tokenizer import train_tokenizer
    from mlmfast.trainer import COMPILE_BACKEND_ENV

    tok_dir = tmp_path / "tok"
    train_tokenizer(read_corpus([str(corpus_file)]), vocab_size=400).save(str(tok_dir))
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    counts = []  # (compiled?, num_tokens given, real tokens of the batch)
    real_forward = trainer_mod.train_forward

    def spy(model, path, masked, attention_mask, num_tokens=None, lengths=None):
        counts.append((model is not None and hasattr(model, "_orig_mod"), num_tokens, int(attention_mask.sum())))
        assert lengths is not None and int(lengths.sum()) == int(attention_mask.sum())  # right padding: the kernel
        return real_forward(model, path, masked, attention_mask, num_tokens, lengths)  # takes lengths, not a mask

    monkeypatch.setattr(trainer_mod, "train_forward", spy)
    short = tmp_path / "short.txt"  # one line per document: short documents, padded rows
    lines = [ln.strip() for ln in corpus_file.read_text().splitlines() if ln.strip()]
    short.write_text("\n\n".join(lines[:800]) + "\n")
    kw = dict(max_steps=6, save_every=3, tokenizer=str(tok_dir), dropout=0.0, pack=False, data=[str(short)])
    torch._dynamo.reset()
    try:
        logs = []
        eager = train(tiny_cfg(corpus_file, tmp_path / "eager", **kw), log=_silent)
        compiled = train(tiny_cfg(corpus_file, tmp_path / "compiled", compile=True, **kw), log=logs.append,
                         stop_after=3)
        assert any("torch.compile: on (backend aot_eager)" in m for m in logs)
        assert any(m.startswith("note: on a CPU the compiled fast step measured slower") for m in logs)
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] >= 1  # the forward really went through dynamo
        resumed = train(tiny_cfg(corpus_file, tmp_path / "compiled", compile=False, **kw), resume=True,
                        log=_silent)
    finally:
        torch._dynamo.reset()
    got = compiled.train_losses + resumed.train_losses
    assert len(got) == 6
    assert [c[0] for c in counts] == [False] * 6 + [True] * 3 + [False] * 3
    # compiled: the count of every batch that unpads (a fuller one gets none: no value to guard a graph on)
    assert all(n == (real if was_compiled and real <= 0.85 * 8 * 32 else None) for was_compiled, n, real in counts)
    assert any(real <= 0.85 * 8 * 32 for _, _, real in counts)  # padded enough to unpad
    for a, b in zip(got, eager.train_losses):
        assert abs(a - b) <= 1e-4 * abs(b), (got, eager.train_losses)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "compiled" / "model" / "model.safetensors")).keys()
    assert keys == load_file(str(tmp_path / "eager" / "model" / "model.safetensors")).keys()


def test_eager_gpu_run_suggests_compile():
    """Without --compile, a fast-path run on a GPU says that --compile is faster there (its eager step waits on
    kernel launches); a CPU run and a reference-path run do not."""
    from types import SimpleNamespace

    from mlmfast.trainer import compile_for_training

    class OnCuda(torch.nn.Module):  # stands in for a model on a GPU (no GPU here)
        def parameters(self, recurse=True):
            yield SimpleNamespace(device=torch.device("cuda"))

    for model, cfg, tip in ((OnCuda(), TrainConfig(), True), (OnCuda(), TrainConfig(path="reference"), False),
                            (torch.nn.Linear(2, 2), TrainConfig(), False)):
        logs = []
        assert compile_for_training(model, cfg, logs.append) is model
        assert any(m.startswith("tip: --compile") for m in logs) == tip, (cfg.path, logs)


def test_compile_with_fsdp_is_refused(monkeypatch):
    import mlmfast.distributed as dist
    from mlmfast.trainer import compile_for_training

    model = torch.nn.Linear(2, 2)
    assert compile_for_training(model, TrainConfig(compile=False), _silent) is model
    monkeypatch.setattr(dist, "is_fsdp", lambda m: True)
    with pytest.raises(UserError, match="--compile with --strategy fsdp is not supported"):
        compile_for_training(model, TrainConfig(compile=True), _silent)


def test_evaluation_equals_full_logits():
    """evaluate() runs the head on the masked rows only (head_at_labels_only) and still gives the numbers of the
    full-logits reference: loss sum, masked-token count and correct predictions over every batch."""
    from mlmfast.config import ModelConfig
    from mlmfast.data import MLMDataset, make_loader
    from mlmfast.model import BertForMLM
    from mlmfast.trainer import EVAL_MASK_SEED, MaskingSpec, evaluate, mlm_loss_sum

    torch.manual_seed(0)
    V, L = 120, 24
    model = BertForMLM(ModelConfig.from_preset("bert-tiny", vocab_size=V, max_position_embeddings=64)).set_path("fast")
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, L + 1, (10,), generator=g)
    ids = torch.randint(5, V, (10, L), generator=g) * (torch.arange(L)[None, :] < lengths[:, None])
    ds = MLMDataset(ids.int(), lengths.int())
    spec = MaskingSpec(mask_token_id=4, vocab_size=V, special_token_ids=[0, 1, 2, 3, 4], mlm_probability=0.3)
    loader = make_loader(ds, 4, shuffle=False, drop_last=False)
    got = evaluate(model, loader, spec, torch.device("cpu"))
    tot, n, ok, row0 = 0.0, 0, 0, 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            masked = spec.apply(batch, seed=EVAL_MASK_SEED, row_offset=row0)
            row0 += batch["input_ids"].shape[0]
            logits = model.set_path("reference")(masked.input_ids, attention_mask=batch["attention_mask"]).logits
            s, c, k = mlm_loss_sum(logits, masked.labels)
            tot, n, ok = tot + float(s), n + int(c), ok + int(k)
    assert got["val_tokens"] == n > 0
    assert abs(got["val_loss"] - tot / n) <= 1e-6 * tot / n and got["val_acc"] == ok / n
