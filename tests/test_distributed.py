"""Data parallelism on CPU: `torchrun --nproc_per_node 2` with gloo (DDP and FSDP2) trains like one process with
the same global batch, and so does gradient accumulation: same data, same masks, same loss normalisation.

The command the tests run (README, "Several GPUs"):
    torchrun --standalone --nproc_per_node 2 -m mlmfast train --device cpu --batch-size 4 ...
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from mlmfast.data import MLMDataset, make_loader

TIMEOUT = 300


@pytest.fixture(scope="module")
def shared(tmp_path_factory, corpus_file):
    """One tokenizer for every run (WordPiece training is not deterministic in ties across processes)."""
    from mlmfast.data import read_corpus
    from mlmfast.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ddp")
    train_tokenizer(read_corpus(str(corpus_file)), vocab_size=400).save(str(root / "tok"))
    return root


def _args(shared, corpus_file, out, *extra):
    return ["train", "--data", str(corpus_file), "--tokenizer", str(shared / "tok"), "--model", "bert-tiny",
            "--seq-len", "32", "--max-steps", "6", "--eval-every", "3", "--eval-batches", "2", "--log-every", "1",
            "--save-every", "3", "--lr", "2e-3", "--dropout", "0", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert p.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return p


def _torchrun(nproc, args):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 "-m", "mlmfast", *args])


def _metrics(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return ([r["loss"] for r in rows if r["split"] == "train"], [r["val_loss"] for r in rows if r["split"] == "val"])


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(shared, corpus_file):
    """The reference: one process, global batch 8."""
    out = shared / "single"
    _run([sys.executable, "-m", "mlmfast", *_args(shared, corpus_file, out, "--batch-size", "8")])
    return out


@pytest.fixture(scope="module")
def accum(shared, corpus_file):
    """One process, 2 micro-batches of 4 (validation batches of 4 rows, as the 2-process runs of batch 4)."""
    out = shared / "accum"
    _run([sys.executable, "-m", "mlmfast", *_args(shared, corpus_file, out, "--batch-size", "4", "--grad-accum", "2")])
    return out


def _assert_same_training(run, ref, val_ref=None):
    losses, val = _metrics(run)
    ref_losses, ref_val = _metrics(ref)
    assert len(losses) == len(ref_losses) == 6
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    if val_ref is not None:
        torch.testing.assert_close(torch.tensor(val), torch.tensor(_metrics(val_ref)[1]), rtol=1e-5, atol=0)
    w, w_ref = _weights(run), _weights(ref)
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=2e-5, msg=k)
    assert not torch.equal(w_ref["bert.embeddings.word_embeddings.weight"],
                           _weights_at_step3(ref)["bert.embeddings.word_embeddings.weight"])


def _weights_at_step3(run):
    """The weights of the step-3 checkpoint: training moved them by step 6, so the comparison is not vacuous."""
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "step-000003" / "model.safetensors"))


def test_grad_accumulation_equals_one_big_batch(single, accum):
    _assert_same_training(accum, single)


@pytest.mark.parametrize("strategy,batch", [("ddp", 4), ("fsdp", 4), ("ddp", 2), ("fsdp", 2)])  # batch 2: + accumulation 2
def test_torchrun_two_processes_equal_one_process(shared, corpus_file, single, accum, strategy, batch):
    out = shared / f"{strategy}-b{batch}"
    p = _torchrun(2, _args(shared, corpus_file, out, "--batch-size", str(batch), "--grad-accum", str(8 // (2 * batch)),
                           "--strategy", strategy))
    assert f"2 processes ({strategy}, gloo)" in p.stdout
    assert p.stdout.count("done: 6 steps") == 1  # only rank 0 reports
    assert "view tensor" not in p.stderr  # FSDP2 warns when a sharded module returns a view (the last layer did)
    # validation batches have --batch-size rows: comparable with the 1-process run of batch 4
    _assert_same_training(out, single, val_ref=accum if batch == 4 else None)
    state = torch.load(out / "checkpoints" / "step-000006" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["strategy"] == strategy and len(state["rng_per_rank"]) == 2


def test_fsdp_bf16_gathers_bf16_weights_and_trains_as_one_process(shared, corpus_file):
    """FSDP2 under --precision bf16 gathers the weights in bf16 (MixedPrecisionPolicy; gradients reduced in fp32,
    fp32 master weights and optimizer): it says so, and trains as one bf16 process does, within bf16 rounding."""
    one = shared / "bf16-single"
    _run([sys.executable, "-m", "mlmfast", *_args(shared, corpus_file, one, "--batch-size", "8", "--precision", "bf16")])
    two = shared / "bf16-fsdp"
    p = _torchrun(2, _args(shared, corpus_file, two, "--batch-size", "4", "--strategy", "fsdp", "--precision", "bf16"))
    assert "FSDP2 gathers bf16 weights, reduces fp32 gradients" in p.stdout
    losses, ref = _metrics(two)[0], _metrics(one)[0]
    assert len(losses) == len(ref) == 6 and losses[0] != losses[-1]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=3e-2, atol=0)
    w = _weights(two)
    assert all(t.dtype == torch.float32 for t in w.values())  # the saved (master) weights stay fp32


def test_torchrun_ddp_with_compile_equals_one_process(shared, corpus_file, single, monkeypatch):
    """--compile under DDP with gradient accumulation (no_sync on the plain DDP module, the forward through the
    compiled wrapper; aot_eager: the same traced graphs without generated code): the same training as one
    process."""
    from mlmfast.trainer import COMPILE_BACKEND_ENV

    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    out = shared / "ddp-compile"
    p = _torchrun(2, _args(shared, corpus_file, out, "--batch-size", "2", "--grad-accum", "2", "--compile"))
    assert "torch.compile: on (backend aot_eager)" in p.stdout + p.stderr
    _assert_same_training(out, single)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_resumes_exactly(shared, corpus_file, strategy):
    """A 2-process run resumed from its step-3 checkpoint (as if killed after it: later checkpoints and the final
    model removed) with --resume auto ends as the run that went straight to 6: the same losses and bit-identical
    weights (per-rank RNG, data position, and the DDP / FSDP2-sharded optimizer state restored)."""
    import shutil

    full = shared / f"{strategy}-b4"
    args = ("--batch-size", "4", "--grad-accum", "1", "--strategy", strategy)
    if not (full / "model" / "model.safetensors").exists():  # made by test_torchrun_two_processes_equal_one_process
        _torchrun(2, _args(shared, corpus_file, full, *args))
    part = shared / f"{strategy}-resumed"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-000006")
    shutil.rmtree(part / "model")
    p = _torchrun(2, _args(shared, corpus_file, part, *args, "--resume", "auto"))
    assert "step-000003" in p.stdout + p.stderr  # it resumed there, not from scratch
    assert _metrics(part)[0] == _metrics(full)[0]
    a, b = _weights(part), _weights(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["sigterm-to-torchrun", "ctrl-c-to-the-group"])
def test_torchrun_stops_gracefully_with_a_checkpoint(shared, corpus_file, tmp_path, how):
    """A signal during a 2-process run: the ranks agree on a step, write one checkpoint there and stop; --resume
    auto continues from it. SIGTERM to torchrun (it forwards it to the workers, then waits 30 s); Ctrl-C = SIGINT
    to the whole process group (each worker gets it twice: the terminal's and torchrun's forward: one request)."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mlmfast",
           *_args(shared, corpus_file, out, "--batch-size", "4", "--max-steps", "100000", "--save-every", "100000",
                  "--eval-every", "100000")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    metrics = out / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"train"') >= 3):
        time.sleep(0.1)
    if how == "sigterm-to-torchrun":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert stderr.count("stopped at step") == 1, stderr[-3000:]  # rank 0 says it, once
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1, stderr[-3000:]
    step = int(ckpts[0].name[5:])
    assert step >= 3 and f"stopped at step {step} " in stderr
    state = torch.load(ckpts[0] / "trainer_state.pt", weights_only=False)
    assert state["step"] == step and state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    p = _torchrun(2, ["train", "--resume", "auto", "--out", str(out), "--max-steps", str(step + 2), "--no-progress"])
    assert f"resumed from" in p.stdout + p.stderr and f"done: {step + 2} steps" in p.stdout


def test_resume_with_another_process_count_is_refused(shared, corpus_file):
    from mlmfast.errors import UserError
    from mlmfast.trainer import TrainConfig, train

    out = shared / "ddp-b4"
    if not (out / "train_config.json").exists():
        _torchrun(2, _args(shared, corpus_file, out, "--batch-size", "4"))
    cfg = TrainConfig(out_dir=str(out), max_steps=8, progress=False)
    with pytest.raises(UserError, match="same torchrun --nproc_per_node"):
        train(cfg, resume="auto", log=lambda m: None)


@pytest.mark.parametrize("world,batch", [(2, 4), (3, 2)])
def test_rank_loaders_read_disjoint_parts_of_the_global_batches(world, batch):
    n, L = 50, 4
    ds = MLMDataset(torch.arange(n * L).reshape(n, L), torch.full((n,), L))
    single = [b["input_ids"] for b in make_loader(ds, batch * world, seed=7, epoch=1, start_batch=2)]
    ranks = [[b["input_ids"] for b in make_loader(ds, batch, seed=7, epoch=1, start_batch=2, rank=r,
                                                   world_size=world)] for r in range(world)]
    assert all(len(r) == len(single) == n // (batch * world) - 2 for r in ranks)
    for k, big in enumerate(single):
        torch.testing.assert_close(torch.cat([ranks[r][k] for r in range(world)]), big, rtol=0, atol=0)
