"""Crash safety: a training process killed with SIGKILL at random moments (at least 5 times) and restarted each
time with `--resume auto` ends with weights bit-identical to an uninterrupted run (CPU, fp32, --deterministic);
corrupt or truncated checkpoints are named and skipped."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from mlmfast.checkpoint import (CorruptCheckpoint, checkpoint_dirs, latest_valid_checkpoint, save_checkpoint,
                                verify_checkpoint)

STEPS = 100


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_file):
    from mlmfast.data import read_corpus
    from mlmfast.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(read_corpus(str(corpus_file)), vocab_size=400).save(str(d))
    return d


def _cmd(corpus_file, tok_dir, out):
    return [sys.executable, "-m", "mlmfast", "train", "--data", str(corpus_file), "--tokenizer", str(tok_dir),
            "--model", "bert-tiny", "--seq-len", "32", "--batch-size", "8", "--max-steps", str(STEPS),
            "--save-every", "4", "--keep-checkpoints", "2", "--eval-every", "25", "--eval-batches", "2",
            "--log-every", "1", "--lr", "2e-3", "--device", "cpu", "--deterministic", "--no-progress",
            "--resume", "auto", "--out", str(out)]


ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _progress(run) -> int:
    """The newest checkpoint's step (0 if none)."""
    ckpts = checkpoint_dirs(str(run))
    return int(os.path.basename(ckpts[-1])[5:]) if ckpts else 0


def test_kill9_at_random_points_then_resume_is_bit_exact(corpus_file, tok_dir, tmp_path):
    ref = tmp_path / "uninterrupted"
    p = subprocess.run(_cmd(corpus_file, tok_dir, ref), env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills, launches, seen = 0, 0, []
    while True:
        launches += 1
        assert launches <= 20, f"no progress after {launches} launches (killed {kills} times at {seen})"
        proc = subprocess.Popen(_cmd(corpus_file, tok_dir, run), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if kills < 5:
            # Wait until this launch has made progress (a new checkpoint), then kill it a random moment later:
            # inside a step, during evaluation, or while a checkpoint is being written.
            start = _progress(run)
            deadline = time.time() + 300
            while _progress(run) <= start and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.25))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                seen.append(_progress(run))
                continue
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        if _progress(run) >= STEPS:
            break
    assert kills >= 5, seen
    assert seen == sorted(seen) and len(set(seen)) >= 4  # killed at different points

    a = _weights(ref)
    b = _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after {kills} kills at checkpoints {seen}"
    # the loss curves agree step for step, and the metrics log has every step once
    assert _train_losses(run) == _train_losses(ref)
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp")]


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _train_losses(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows if r["split"] == "train"]


# ---- checkpoints on their own ----------------------------------------------------------------------------


def _write(files):
    def write(tmp):
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
    return write


PAYLOAD = {"trainer_state.pt": b"state" * 100, "model.safetensors": b"w" * 1000, "tokenizer/vocab.txt": b"a\nb\n"}


def test_checkpoint_is_checksummed_and_rotated(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(str(tmp_path), step, _write(PAYLOAD), keep=3)
    names = [os.path.basename(p) for p in checkpoint_dirs(str(tmp_path))]
    assert names == ["step-000004", "step-000006", "step-000008"]
    for p in checkpoint_dirs(str(tmp_path)):
        verify_checkpoint(p)
    # a leftover of a killed save is ignored by readers and removed by the next save
    os.makedirs(tmp_path / "checkpoints" / ".tmp-step-000010-99999")
    assert len(checkpoint_dirs(str(tmp_path))) == 3
    save_checkpoint(str(tmp_path), 10, _write(PAYLOAD), keep=1)
    assert os.listdir(tmp_path / "checkpoints") == ["step-000010"]


@pytest.mark.parametrize("damage,message", [
    ("flip", "does not match its sha256"),
    ("truncate", "truncated"),
    ("delete", "missing"),
    ("no_sums", "incomplete"),
    ("extra", "not written with it"),
])
def test_corrupt_checkpoint_is_named_and_skipped(tmp_path, damage, message):
    good = save_checkpoint(str(tmp_path), 2, _write(PAYLOAD), keep=5)
    bad = save_checkpoint(str(tmp_path), 4, _write(PAYLOAD), keep=5)
    target = os.path.join(bad, "model.safetensors")
    if damage == "flip":
        data = bytearray(open(target, "rb").read())
        data[500] ^= 1
        open(target, "wb").write(bytes(data))
    elif damage == "truncate":
        open(target, "r+b").truncate(10)
    elif damage == "delete":
        os.remove(target)
    elif damage == "no_sums":
        os.remove(os.path.join(bad, "checksums.json"))
    else:
        open(os.path.join(bad, "stray.bin"), "wb").write(b"x")
    with pytest.raises(CorruptCheckpoint, match=message):
        verify_checkpoint(bad)
    lines = []
    assert latest_valid_checkpoint(str(tmp_path), lines.append, set_aside_corrupt=True) == good
    assert len(lines) == 1 and "step-000004" in lines[0] and message in lines[0]
    assert [os.path.basename(p) for p in checkpoint_dirs(str(tmp_path))] == ["step-000002"]
    assert "corrupt-step-000004" in os.listdir(tmp_path / "checkpoints")


def test_resume_auto_skips_a_corrupt_newest_checkpoint(corpus_file, tok_dir, tmp_path):
    """A run stopped at step 6 whose newest checkpoint is then corrupted resumes from step 4, names the corrupt
    one, and still ends equal to an uninterrupted run."""
    from mlmfast.trainer import TrainConfig, train

    def cfg(out, **kw):
        return TrainConfig(data=[str(corpus_file)], tokenizer=str(tok_dir), out_dir=str(out), model="bert-tiny",
                           seq_len=32, batch_size=8, max_steps=8, save_every=2, keep_checkpoints=3, eval_every=4,
                           eval_batches=2, log_every=1, lr=2e-3, seed=5, progress=False, **kw)

    ref = train(cfg(tmp_path / "ref"), log=lambda m: None)
    run = tmp_path / "run"
    train(cfg(run), stop_after=6, log=lambda m: None)
    state = run / "checkpoints" / "step-000006" / "trainer_state.pt"
    open(state, "r+b").truncate(100)
    lines = []
    r = train(cfg(run), resume="auto", log=lines.append)
    assert any("step-000006" in l and "truncated" in l for l in lines), lines
    assert any("resumed from" in l and "step-000004" in l for l in lines), lines
    assert r.train_losses == ref.train_losses[4:]
    a, b = _weights(tmp_path / "ref"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_named_checkpoint_must_verify(corpus_file, tok_dir, tmp_path):
    from mlmfast.errors import UserError
    from mlmfast.trainer import TrainConfig, train

    out = tmp_path / "run"
    c = TrainConfig(data=[str(corpus_file)], tokenizer=str(tok_dir), out_dir=str(out), model="bert-tiny",
                    seq_len=32, batch_size=8, max_steps=4, save_every=2, eval_every=4, eval_batches=1,
                    progress=False)
    train(c, stop_after=2, log=lambda m: None)
    ckpt = out / "checkpoints" / "step-000002"
    open(ckpt / "model.safetensors", "r+b").truncate(50)
    with pytest.raises(UserError, match="step-000002 is corrupt: model.safetensors"):
        train(c, resume=str(ckpt), log=lambda m: None)
    with pytest.raises(UserError, match="not a checkpoint directory"):
        train(c, resume=str(out), log=lambda m: None)


def test_killed_before_the_first_checkpoint_restarts_cleanly(corpus_file, tok_dir, tmp_path):
    """Config and metrics written, no checkpoint yet (a kill in the first interval), a stale model temp dir:
    --resume auto starts again at step 0 with a fresh log (no duplicate rows) and removes the leftovers."""
    import shutil

    from mlmfast.trainer import TrainConfig, train

    c = TrainConfig(data=[str(corpus_file)], tokenizer=str(tok_dir), out_dir=str(tmp_path / "run"),
                    model="bert-tiny", seq_len=32, batch_size=8, max_steps=4, save_every=4, eval_every=2,
                    eval_batches=1, log_every=1, progress=False)
    train(c, stop_after=3, log=lambda m: None)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "model.tmp-12345").mkdir()
    lines = []
    r = train(c, resume="auto", log=lines.append)
    assert r.steps == 4 and any("starting from step 0" in l for l in lines)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in rows if x["split"] == "train"] == [1, 2, 3, 4]
    assert [x["step"] for x in rows if x["split"] == "val"] == [0, 2, 4]
    assert not (tmp_path / "run" / "model.tmp-12345").exists()


def test_prepare_killed_midway_leaves_no_prepared_dir_and_reruns_cleanly(corpus_file, tok_dir, tmp_path):
    """SIGKILL a running `mlmfast prepare`: --out is never half-written (the work is a hidden sibling until the
    final rename); the rerun removes the dead process's leftovers and writes what an uninterrupted run writes."""
    big = tmp_path / "big.txt"
    text = corpus_file.read_text()
    big.write_text("\n\n".join([text] * 30))
    cmd = [sys.executable, "-m", "mlmfast", "prepare", "--data", str(big), "--tokenizer", str(tok_dir),
           "--workers", "2", "--shard-tokens", "50000", "--no-progress"]
    out = tmp_path / "prepared"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".prepared.tmp-*/train-00001.bin")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "prepare finished before it could be killed: use a larger corpus"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".prepared.tmp-*"))
    subprocess.run(cmd + ["--out", str(out)], env=ENV, check=True, capture_output=True, timeout=300)
    assert not list(tmp_path.glob(".prepared.*"))  # the killed run's leftovers are gone
    ref = tmp_path / "ref"
    subprocess.run(cmd + ["--out", str(ref)], env=ENV, check=True, capture_output=True, timeout=300)
    names = sorted(p.name for p in ref.iterdir() if p.is_file())
    assert names == sorted(p.name for p in out.iterdir() if p.is_file()) and "train-00001.bin" in names
    for n in names:
        if n != "manifest.json":
            assert (ref / n).read_bytes() == (out / n).read_bytes(), n
    strip = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert strip(json.loads((ref / "manifest.json").read_text())) == strip(json.loads((out / "manifest.json").read_text()))
