"""The `mlmfast` command: every subcommand works, and bad input gives one clear error line and exit status 2."""
import json
import os
import subprocess
import sys

import pytest

from mlmfast.cli import main

TINY = ["--model", "bert-tiny", "--seq-len", "32", "--batch-size", "8", "--vocab-size", "400",
        "--eval-every", "10", "--eval-batches", "2", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(out), "--max-steps", "12", *TINY]) == 0
    return out


def run_cli(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("argv", [[], ["train"], ["prepare"], ["eval"], ["fill"], ["tokenizer"], ["tokenizer", "train"],
                                  ["tokenizer", "encode"], ["info"]])
def test_help_on_every_command(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: mlmfast" in capsys.readouterr().out


def test_train_prints_result(trained_run):
    assert (trained_run / "model" / "model.safetensors").is_file()
    assert (trained_run / "loss.png").is_file()


def test_train_output_lines(corpus_file, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "--data", str(corpus_file), "--out", str(tmp_path / "r"),
                           "--max-steps", "3", *TINY)
    assert code == 0
    assert "validation MLM loss:" in out and "plot:" in out and str(tmp_path / "r" / "loss.png") in out


def test_eval_run_and_model_dir(trained_run, corpus_file, capsys):
    code, out, _ = run_cli(capsys, "eval", str(trained_run), "--json", "--device", "cpu")
    assert code == 0
    r = json.loads(out)
    assert r["val_tokens"] > 0 and 0 <= r["val_acc"] <= 1 and r["val_ppl"] > 1
    code, out, _ = run_cli(capsys, "eval", str(trained_run / "model"), "--data", str(corpus_file),
                           "--batches", "2", "--device", "cpu")
    assert code == 0 and "perplexity" in out


def test_fill(trained_run, capsys):
    code, out, _ = run_cli(capsys, "fill", str(trained_run), "the [MASK] of the function is [MASK].",
                           "--top-k", "3", "--json", "--device", "cpu")
    assert code == 0
    preds = json.loads(out)
    assert len(preds) == 2
    for p in preds:
        assert len(p["candidates"]) == 3
        probs = [c["prob"] for c in p["candidates"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    code, out, _ = run_cli(capsys, "fill", str(trained_run), "a [MASK] b", "--top-k", "1000", "--json")
    tokens = {c["token"] for c in json.loads(out)[0]["candidates"]}
    assert not tokens & {"[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"}  # special tokens are never a fill
    tok_cfg = json.loads((trained_run / "model" / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 512  # the model's positions: HF truncation works on model/


def test_tokenizer_train_and_encode(corpus_file, tmp_path, capsys):
    out_dir = tmp_path / "tok"
    code, out, _ = run_cli(capsys, "tokenizer", "train", "--data", str(corpus_file), "--out", str(out_dir),
                           "--vocab-size", "300")
    assert code == 0 and (out_dir / "tokenizer.json").is_file() and (out_dir / "vocab.txt").is_file()
    code, out, _ = run_cli(capsys, "tokenizer", "encode", str(out_dir), "Hello world", "--json")
    r = json.loads(out)
    assert r["tokens"][0] == "[CLS]" and r["tokens"][-1] == "[SEP]" and len(r["ids"]) == len(r["tokens"])
    again = ["tokenizer", "train", "--data", str(corpus_file), "--out", str(out_dir), "--vocab-size", "300"]
    code, out, err = run_cli(capsys, *again)  # a tokenizer others may depend on is not replaced silently
    assert code == 2 and "--overwrite" in err
    assert run_cli(capsys, *again, "--overwrite")[0] == 0


def test_info(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["torch"] and r["device"] and isinstance(r["ops"], list)
    assert r["distributed"].startswith("torchrun with gloo") and "FSDP2" in r["distributed"]  # what the tests use
    for op in r["ops"]:  # every op names its active implementation and, when the fast one is off, why
        assert op["active"] and (op["reason"] is None or op["reason"].strip())
    code, out, _ = run_cli(capsys, "info")
    assert code == 0 and "torch" in out


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra, needle", [
    (["--mlm-probability", "1.5"], "mlm_probability"),
    (["--mlm-probability", "0"], "mlm_probability"),
    (["--mask-replace-prob", "0.9", "--random-replace-prob", "0.2"], "> 1"),
])
def test_bad_masking_probabilities(extra, needle, corpus_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", str(corpus_file), "--out", str(tmp_path / "r"), *TINY, *extra)
    _assert_one_line_error(code, err, needle)


def test_missing_and_empty_corpus(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r"), *TINY)
    _assert_one_line_error(code, err, "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    code, _, err = run_cli(capsys, "train", "--data", str(empty), "--out", str(tmp_path / "r2"), *TINY)
    _assert_one_line_error(code, err, "empty")


def test_not_a_checkpoint(tmp_path, capsys):
    d = tmp_path / "notckpt"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    for cmd in (["fill", str(d), "a [MASK] b"], ["eval", str(d)]):
        code, _, err = run_cli(capsys, *cmd)
        _assert_one_line_error(code, err, "not a checkpoint")


def test_sequence_longer_than_max_positions(trained_run, corpus_file, tmp_path, capsys):
    # The tiny run's model has 512 positions: a longer --seq-len on continued training is refused.
    code, _, err = run_cli(capsys, "train", "--model", str(trained_run / "model"), "--data", str(corpus_file),
                           "--out", str(tmp_path / "r"), "--seq-len", "600", "--no-progress")
    _assert_one_line_error(code, err, "max_position_embeddings")
    long_text = " ".join(["word"] * 700) + " [MASK]"
    code, _, err = run_cli(capsys, "fill", str(trained_run), long_text)
    _assert_one_line_error(code, err, "positions")


def test_token_id_out_of_vocab(trained_run, corpus_file, tmp_path, capsys):
    """A tokenizer with more tokens than the model's vocabulary is refused before training."""
    big = tmp_path / "bigtok"
    assert main(["tokenizer", "train", "--data", str(corpus_file), "--out", str(big), "--vocab-size", "900"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "train", "--model", str(trained_run / "model"), "--tokenizer", str(big),
                           "--data", str(corpus_file), "--out", str(tmp_path / "r"), "--no-progress")
    _assert_one_line_error(code, err, "vocab")


def test_fill_without_mask(trained_run, capsys):
    code, _, err = run_cli(capsys, "fill", str(trained_run), "no mask here")
    _assert_one_line_error(code, err, "[MASK]")


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlmfast", "--debug", "fill", str(tmp_path), "a [MASK]"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_console_script_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlmfast", "fill", str(tmp_path / "missing"), "a [MASK]"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert os.path.basename(sys.executable)  # the module entry point and `mlmfast` share cli.main


def test_prepare_then_train_on_the_shards_then_resume_auto(trained_run, corpus_file, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    code, out, err = run_cli(capsys, "prepare", "--data", str(corpus_file), "--tokenizer",
                             str(trained_run / "tokenizer"), "--out", str(prepared), "--workers", "2",
                             "--no-progress")
    assert code == 0, err
    assert "tokens" in out and (prepared / "manifest.json").is_file()
    code, out, err = run_cli(capsys, "prepare", "--verify", "--out", str(prepared))
    assert code == 0, err
    run = tmp_path / "run"
    args = ["train", "--data", str(prepared), "--out", str(run), "--max-steps", "4", "--save-every", "2",
            "--resume", "auto", *TINY]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "prepared shards" in out and "done: 4 steps" in out
    # the same command with a larger --max-steps continues the finished run from its newest checkpoint
    code, out, err = run_cli(capsys, *[a if a != "4" else "6" for a in args])
    assert code == 0, err
    assert "resumed from" in out and "step-000004" in out and "done: 6 steps" in out
    code, out, err = run_cli(capsys, "eval", str(run), "--batches", "1")  # the run's own validation split
    assert code == 0, err
    assert "validation split of the prepared shards" in out


def test_resume_without_a_run_is_one_error(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--resume", "--out", str(tmp_path / "none"), *TINY)
    assert code == 2 and err.count("\n") == 1 and "not a run directory" in err and "--resume auto" in err


def test_eval_on_prepared_shards(trained_run, corpus_file, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    assert run_cli(capsys, "prepare", "--data", str(corpus_file), "--tokenizer", str(trained_run / "tokenizer"),
                   "--out", str(prepared), "--val-fraction", "0.1", "--no-progress")[0] == 0
    code, out, err = run_cli(capsys, "eval", str(trained_run), "--data", str(prepared), "--batches", "2", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["val_tokens"] > 0 and 0 < r["val_loss"] < 20


def test_bare_resume_keeps_the_runs_own_settings(trained_run, tmp_path, capsys):
    """`mlmfast train --resume auto --out RUN` (the README's command) keeps the run's --max-steps, --save-every,
    ... instead of the CLI defaults; a typed --max-steps still extends it; a typed flag that defines the run is
    reported as ignored."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    saved = json.loads((run / "train_config.json").read_text())
    code, out, err = run_cli(capsys, "train", "--resume", "auto", "--out", str(run), "--no-progress", "--lr", "0.5")
    assert code == 0, err
    now = json.loads((run / "train_config.json").read_text())
    assert now["max_steps"] == saved["max_steps"] == 12 and now["save_every"] == saved["save_every"]
    assert now["lr"] == saved["lr"] and "settings are kept for lr" in out
    assert "already at step 12" in out  # a finished run: nothing to do, said plainly
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    code, out, err = run_cli(capsys, "train", "--resume", str(ckpt), "--out", str(tmp_path / "other"), "--no-progress")
    assert code == 2 and "continues its own run" in err and "--model" in err and not (tmp_path / "other").exists()


def test_published_files_follow_the_umask(trained_run):
    """mkstemp / safetensors write 0600: the run's files must be readable by the other users of a shared disk."""
    mask = os.umask(0o022)
    os.umask(mask)
    if mask & 0o044:
        pytest.skip(f"umask {mask:o} hides files from others anyway")
    for rel in ("model/model.safetensors", "train_config.json", "tokenizer/tokenizer.json"):
        assert os.stat(trained_run / rel).st_mode & 0o044 == 0o044, rel
    ckpt = sorted((trained_run / "checkpoints").iterdir())[-1]
    assert os.stat(ckpt).st_mode & 0o055 == 0o055
    assert os.stat(ckpt / "model.safetensors").st_mode & 0o044 == 0o044


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(corpus_file, tmp_path):
    """SIGINT (as SIGTERM) during training: the run finishes the step, writes a checkpoint, says how to resume,
    exits 130; --resume auto then continues from that step."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlmfast", "train", "--data", str(corpus_file), "--out", str(out), "--max-steps",
           "100000", "--save-every", "100000", "--log-every", "1", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"train"') >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped at step" in stderr and f"--out {out}" in stderr
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts, stderr[-2000:]
    step = int(ckpts[-1].name[5:])
    code = subprocess.run([sys.executable, "-m", "mlmfast", "train", "--resume", "auto", "--out", str(out),
                           "--max-steps", str(step + 2), "--no-progress"], capture_output=True, text=True, env=env)
    assert code.returncode == 0 and f"done: {step + 2} steps" in code.stdout, code.stderr[-2000:]


def test_unwritable_out_is_one_error_line(corpus_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, out, err = run_cli(capsys, "train", "--data", str(corpus_file), "--out", str(blocker / "run"),
                             "--max-steps", "1", *TINY)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_eval_reproduces_the_runs_last_validation(trained_run, capsys):
    """`mlmfast eval RUN` uses the run's batch size and seq-len, so its masks and numbers are the training's."""
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["split"] == "val"][-1]
    code, out, err = run_cli(capsys, "eval", str(trained_run), "--batches", "2", "--json")  # the run's --eval-batches
    assert code == 0, err
    r = json.loads(out)
    assert abs(r["val_loss"] - last["val_loss"]) < 1e-6 and abs(r["val_acc"] - last["val_acc"]) < 1e-9


def test_prepare_takes_num_workers_as_train_spells_it():
    from mlmfast.cli import build_parser

    base = ["prepare", "--data", "x", "--tokenizer", "t", "--out", "o"]
    assert build_parser().parse_args(base + ["--num-workers", "3"]).workers == 3
    assert build_parser().parse_args(base + ["--workers", "2"]).workers == 2
    assert build_parser().parse_args(base).workers == 0


def test_eval_numbers_do_not_depend_on_the_batch_size(trained_run, capsys):
    """Validation masks are seeded per row (counter-based kernel): the whole split evaluated with batches of 3
    masks exactly the tokens that the run's batch size masks (same count), and gives the same loss."""
    res = {}
    for bs in (None, "3"):
        extra = [] if bs is None else ["--batch-size", bs]
        code, out, err = run_cli(capsys, "eval", str(trained_run), "--batches", "0", "--json", *extra)
        assert code == 0, err
        res[bs] = json.loads(out)
    assert res[None]["val_tokens"] == res["3"]["val_tokens"]
    assert abs(res[None]["val_loss"] - res["3"]["val_loss"]) < 1e-5
    assert abs(res[None]["val_acc"] - res["3"]["val_acc"]) < 1e-9
