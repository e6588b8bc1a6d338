"""The benchmark suite runs end to end (the --smoke form CI runs), writes its files, and accounts for every path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlmfast.cli import main

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PATHS = {"hf-eager", "hf-sdpa", "hf-sdpa-compile", "hf-accelerated", "mlmfast-reference", "mlmfast-fast",
               "mlmfast-fast-unpad", "mlmfast-fast-compile", "mlmfast-fast-unpad-compile"}
OPS = {"masking", "gather", "attention", "linear-CE"}


def _bench(module: str):
    """benchmarks.<module>, imported from the checkout as `mlmfast bench` does."""
    import importlib

    from mlmfast.cli import _benchmarks_package

    _benchmarks_package()
    return importlib.import_module(f"benchmarks.{module}")


def _check_result_files(out: Path, name: str, suites=("ops", "train")) -> dict:
    for ext in ("json", "md", "png"):
        assert (out / f"{name}.{ext}").stat().st_size > 0, ext
    d = json.loads((out / f"{name}.json").read_text())
    meta, rows = d["meta"], d["rows"]
    assert meta["status"] == "complete"
    for key in ("date", "device", "git_commit", "torch", "transformers", "python"):
        assert meta["env"][key], key
    assert meta["config"]["smoke"] is True and meta["conventions"]
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r  # an "error" row is a bug in the suite or a path
        if r["status"] == "skipped":
            assert r["reason"].strip(), r
        else:
            assert r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"], r
    if "train" in suites:
        train = [r for r in rows if r["suite"] == "train"]
        for dist in ("real", "full"):
            assert {r["path"] for r in train if r["dist"] == dist} == TRAIN_PATHS
        ok = {r["path"]: r for r in train if r["status"] == "ok" and r["dist"] == "full"}
        assert {"hf-eager", "hf-sdpa", "mlmfast-reference"} <= set(ok)  # these run on every machine
        assert ok["hf-sdpa"]["speedup"]["hf-eager"] > 0 and ok["hf-eager"]["speedup"]["hf-eager"] == 1.0
        for r in ok.values():
            assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_mem_mib"] is not None
            assert r["loss_first"] > 0
        # same weights, same masked batch: the first losses agree up to dropout noise
        losses = [r["loss_first"] for r in ok.values()]
        assert max(losses) - min(losses) < 0.5, losses
    if "ops" in suites:
        ops = [r for r in rows if r["suite"] == "ops"]
        assert {r["op"] for r in ops} == OPS
        sel = [r for r in ops if r["op"] == "masking" and r["impl"].startswith("mask_select") and r["dist"] == "full"]
        assert sel and sel[0]["speedup"]["hf-collator"] > 0 and sel[0]["tokens_per_s"] > 0
    md = (out / f"{name}.md").read_text()
    assert "| path |" in md or "| impl |" in md
    return d


def test_mlmfast_bench_smoke(tmp_path, capsys):
    """`mlmfast bench --smoke`: ops + train on a tiny model; every path measured or skipped with its reason."""
    assert main(["bench", "--smoke", "--out", str(tmp_path), "--name", "smoke", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "### Training step" in printed and printed.rstrip().endswith("s")  # the tables, then the file line
    _check_result_files(tmp_path, "smoke")


def test_bench_help_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "usage: mlmfast bench" in capsys.readouterr().out
    assert main(["bench", "--suite", "nope"]) == 2
    assert "error: --suite" in capsys.readouterr().err
    assert main(["bench", "--models", "bert-huge", "--smoke"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_model_flops_counts_the_weight_matrices():
    """dense FLOPs / (6 B L) == the encoder's and head transform's weight-matrix parameters of a real BertForMLM."""
    from mlmfast.model import BertForMLM

    ts = _bench("train_suite")
    cfg = ts.model_config("bert-tiny", 1000, 64)
    model = BertForMLM(cfg)
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.dim() == 2 and "embeddings" not in name and "decoder" not in name)
    f = ts.model_flops(cfg, B=3, L=64)
    assert f["dense"] == 6 * n * 3 * 64
    assert f["attention"] == 12 * cfg.num_hidden_layers * 3 * 64 * 64 * cfg.hidden_size
    assert f["decoder"] == 6 * 3 * 64 * cfg.hidden_size * 1000
    assert f["total"] == f["dense"] + f["attention"] + f["decoder"]
    base = ts.model_flops(ts.model_config("bert-base", 30522, 128), B=1, L=128)
    assert abs(base["dense"] / (6 * 128) / 1e6 - 85.5) < 0.1  # BERT-base: 85.5 M matrix weights off the embeddings


def test_peak_table():
    peak_tflops = _bench("harness").peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert peak_tflops("NVIDIA H200")[0] == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_tflops("NVIDIA A10G")[0] == 125.0
    assert peak_tflops("NVIDIA L4")[0] == 121.0
    assert peak_tflops("NVIDIA GeForce RTX 4090")[0] == 165.2
    value, why = peak_tflops("Some Future GPU")
    assert value is None and "--peak-tflops" in why


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh in its CPU dry-run form: every stage runs, files stay flat and <= 8, table last."""
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable,
               GPU_CHECK_BENCH_ARGS="--suite train --paths hf-eager,hf-sdpa,mlmfast-fast --dists full")
    out = tmp_path / "gc"
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    expected = {"results.json", "results.md", "results.png", "pytest_gpu.log", "install.log", "attention.json",
                "profile.md"}
    assert expected <= set(files)
    assert (out / "install.log").read_text().startswith("== nvidia-smi")
    assert "attention: ok" in p.stdout and json.loads((out / "attention.json").read_text())
    assert "== bench_attention" in (out / "bench.log").read_text()
    assert "tests collected" in (out / "pytest_gpu.log").read_text()
    assert "| mlmfast-fast |" in (out / "profile.md").read_text() and "profile: ok" in p.stdout
    tail = p.stdout.strip().splitlines()
    assert tail[-1].startswith("| bert-tiny") and "mlmfast-fast" in tail[-1]


def test_interrupted_run_lists_what_it_did_not_reach():
    suite, ts = _bench("suite"), _bench("train_suite")
    cfg = ts.StepConfig("bert-tiny", 32, 2, 512)
    rows = [dict(suite="train", model="bert-tiny", L=32, B=2, dist="real", path="hf-eager", status="ok")]
    suite._fill_missing(rows, [cfg], ["real", "full"], ["ops", "train"], ["masking"], ["hf-eager", "hf-sdpa"], "stop")
    got = {(r["suite"], r["dist"], r.get("path") or r.get("op")): r["status"] for r in rows}
    assert got == {("train", "real", "hf-eager"): "ok", ("train", "real", "hf-sdpa"): "skipped",
                   ("train", "full", "hf-eager"): "skipped", ("train", "full", "hf-sdpa"): "skipped",
                   ("ops", "real", "masking"): "skipped", ("ops", "full", "masking"): "skipped"}
    assert all(r["reason"] == "stop" for r in rows[1:])


def test_attention_sweep_compiles_candidates_in_worker_processes():
    """bench_attention --sweep compiles its candidates in spawned worker processes first. The workers' plumbing
    (spawn, pickling by module name, the config patch, fwd / fwd+bwd per kernel) runs here under the Triton
    interpreter on tiny shapes; a candidate that cannot run comes back as that job's error, not an exception."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("this test runs the kernels under TRITON_INTERPRET=1 (set by conftest on a machine without a GPU)")
    ba = _bench("bench_attention")
    good = [(kind, (16, 16, 4, 1), (1, 2, 19, 16), "fp32", "cpu", p) for kind in ("fwd", "dkdv", "dq")
            for p in (0.0, 0.1)]
    bad = ("fwd", (16, 24, 4, 1), (1, 2, 19, 16), "fp32", "cpu", 0.0)  # BLOCK_N 24: tl.arange needs a power of two
    errors = ba.warm_cache(good + [bad], workers=2)
    assert set(errors) == {6}, errors
    assert "power of 2" in errors[6] or "power of two" in errors[6], errors[6]
    assert len(ba.SWEEP_CANDIDATES) == 24 and len(set(ba.SWEEP_CANDIDATES)) == 24


def test_attention_bench_times_both_ways_and_reports_each(monkeypatch):
    """bench_attention --timing: events = triton's do_bench, graph = do_bench_cudagraph (kernel time, without the
    host's launch cost); every row says which, speedups compare like with like, the target table has a line per
    target and timing (and old result files, without the field, read as events)."""
    import triton.testing

    ba = _bench("bench_attention")
    called = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: called.append("events") or [1.0, 0.9, 1.1])
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: called.append("graph") or [0.5, 0.4, 0.6])
    assert ba._bench_cuda(lambda: None, timing="graph") == (0.5, 0.4, 0.6)
    assert ba._bench_cuda(lambda: None) == (1.0, 0.9, 1.1) and called == ["graph", "events"]

    def row(provider, mode, padding, timing, ms):
        r = dict(provider=provider, mode=mode, L=512, D=64, B=32, H=32, padding=padding, dtype="bf16", ms=ms,
                 p20_ms=ms, p80_ms=ms, tflops=1.0 / ms)
        return r if timing is None else dict(r, timing=timing)

    rows = [row("mlmfast", "fwd+bwd", "half", None, 0.8), row("sdpa", "fwd+bwd", "half", None, 1.0),
            row("mlmfast", "fwd+bwd", "half", "graph", 0.25), row("sdpa", "fwd+bwd", "half", "graph", 1.0)]
    t = ba._targets(rows)
    assert "| half padded: speedup vs SDPA with mask (fwd+bwd) | events | 3x | 1.25x | NO |" in t
    assert "| half padded: speedup vs SDPA with mask (fwd+bwd) | graph | 3x | 4.00x | yes |" in t
    md = ba._markdown(rows)
    assert "| mlmfast | fwd+bwd | graph | 512 |" in md and md.count("4.00x") == 1 and md.count("1.25x") == 1
    # with dropout rows: what dropout costs, and the speedup over SDPA with the same dropout (no target)
    rows += [row("mlmfast", "fwd+bwd", "none", "graph", 0.5), dict(row("mlmfast", "fwd+bwd", "none", "graph", 0.6),
             dropout=0.1), dict(row("sdpa", "fwd+bwd", "none", "graph", 0.9), dropout=0.1)]
    t = ba._targets(rows)
    assert "| (info) dropout 0.1: fwd+bwd time / dropout 0, no padding | graph | - | 1.20x | - |" in t
    assert "| (info) dropout 0.1: fwd+bwd speedup vs SDPA, no padding | graph | - | 1.50x | - |" in t
    assert "(info) dropout" not in t.split("| graph |")[0]  # the events rows have no dropout measurement


def test_sweep_annotation_adds_registers_and_spills(tmp_path):
    """bench_attention --annotate: registers and spill bytes (ptxas, sm_90, no GPU) for each candidate of a sweep
    JSON, written back; the fastest spill-free config per kernel is named (the fastest overall when it spills).
    Run as the command (it leaves the Triton interpreter that conftest turns on: kernels must compile)."""
    rows = [dict(kind="dq", config=[64, 32, 4, 3], ms=1.2, L=512, D=64, B=32, H=32, dtype="bf16"),
            dict(kind="dq", config=[128, 128, 4, 3], ms=1.1, L=512, D=64, B=32, H=32, dtype="bf16")]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(rows))
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--annotate", str(path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(path.read_text())
    assert got[0]["spill_bytes"] == 0 and 0 < got[0]["regs"] <= 255
    assert got[1]["spill_bytes"] > 0  # 128 x 128 tiles on 4 warps: far over 255 registers a thread
    assert "BEST spill-free dq: (64, 32, 4, 3) 1.200 ms (fastest overall (128, 128, 4, 3) 1.100 ms" in p.stdout


def test_priming_runs_every_eager_path():
    """The unmeasured priming step must itself work (it once built a 64-token model for the tokenizer's ids: every
    path failed silently, and on a GPU the out-of-range id is a sticky device-side assert)."""
    import torch

    ts, inputs = _bench("train_suite"), _bench("inputs")
    text = inputs.TextSource(tokenizer_vocab=512)
    assert ts._prime(["hf-eager", "hf-sdpa", "mlmfast-reference", "mlmfast-fast"], text, torch.device("cpu")) == []


def _fake_path(ts, monkeypatch, measure, path):
    import torch

    monkeypatch.setattr(ts, "build_model", lambda *a: torch.nn.Linear(2, 2))
    monkeypatch.setattr(ts, "_measure", measure)
    batches = {"real": type("B", (), {"fill": 0.5})(), "full": type("B", (), {"fill": 1.0})()}
    rows = []
    return rows, dict(cfg=None, state=None, batches=batches, base=dict(model="m", L=8, B=2, path=path), device=torch.device("cpu"),
                      emit=rows.append, log=lambda s: None, steps=1, warmup=1, flops=1.0, peak=None, deadline=None)


def test_failing_compile_is_not_retried(monkeypatch):
    ts = _bench("train_suite")
    calls = []

    def measure(*a, **k):
        calls.append(1)
        raise RuntimeError("inductor: simulated failure")

    rows, kw = _fake_path(ts, monkeypatch, measure, "hf-sdpa-compile")
    ts._run_path("hf-sdpa-compile", **kw)
    assert len(calls) == 1 and [r["status"] for r in rows] == ["error", "error"]
    assert "not retried" in rows[1]["reason"] and "simulated" in rows[1]["reason"]
    calls.clear()
    rows2, kw = _fake_path(ts, monkeypatch, measure, "hf-sdpa")
    ts._run_path("hf-sdpa", **kw)  # an eager path tries each row set
    assert len(calls) == 2


def test_lost_device_stops_the_suite(monkeypatch):
    """A kernel that breaks the CUDA context (simulated): the path's rows say so and DeviceLost stops the run."""
    ts, harness = _bench("train_suite"), _bench("harness")

    def measure(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    rows, kw = _fake_path(ts, monkeypatch, measure, "mlmfast-fast")
    monkeypatch.setattr(ts, "device_lost", lambda device: "AcceleratorError: illegal memory access")
    with pytest.raises(harness.DeviceLost, match="illegal memory access"):
        ts._run_path("mlmfast-fast", **kw)
    assert rows[0]["status"] == "error" and rows[1]["status"] == "skipped"
    assert "context lost" in rows[1]["reason"]


def test_suite_writes_what_it_has_when_the_device_is_lost(tmp_path, monkeypatch, capsys):
    ops_suite, harness = _bench("ops_suite"), _bench("harness")

    def run(*a, **k):
        raise harness.DeviceLost("CUDA context lost in ops attention triton: simulated")

    monkeypatch.setattr(ops_suite, "run", run)
    assert main(["bench", "--smoke", "--out", str(tmp_path), "--name", "lost", "--quiet", "--no-plot"]) == 1
    d = json.loads((tmp_path / "lost.json").read_text())
    assert d["meta"]["status"] == "device lost"
    assert d["rows"] and all(r["status"] == "skipped" and "simulated" in r["reason"] for r in d["rows"])
    assert "context lost" in capsys.readouterr().err


def test_unpad_path_passes_the_host_count_and_others_do_not():
    """mlmfast-fast-unpad(-compile) give the model the batch's real-token count (on a GPU and compiled the plan
    needs it); the other fast paths run padded there. The step with the count is the same step: same loss on CPU, where both unpad."""
    from benchmarks import train_suite as ts
    from benchmarks.inputs import Batches
    from mlmfast.config import ModelConfig
    from mlmfast.model import BertForMLM

    torch.manual_seed(0)
    B, L = 3, 12
    ids = torch.randint(5, 100, (B, L))
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 4:] = 0
    am[2, 7:] = 0
    bt = Batches("real", B, L, [ids], [am], [int(am.sum())],
                 mask_kwargs=dict(mask_token_id=4, vocab_size=100, special_token_ids=[0, 1, 2, 3, 4]))
    bt.masked = [bt.mask(0)]
    model = BertForMLM(ModelConfig.from_preset("bert-tiny", vocab_size=100, max_position_embeddings=16,
                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.set_path("fast").train()
    seen, losses = [], {}
    for path in ("mlmfast-fast", "mlmfast-fast-unpad", "mlmfast-fast-compile", "mlmfast-fast-unpad-compile"):
        def fn(*a, **kw):
            seen.append((path, kw.get("num_tokens")))
            return model(*a, **kw)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        losses[path] = ts.make_step(path, fn, opt, bt, torch.device("cpu"))(0)
    assert seen == [("mlmfast-fast", None), ("mlmfast-fast-unpad", int(am.sum())), ("mlmfast-fast-compile", None),
                    ("mlmfast-fast-unpad-compile", int(am.sum()))]
    assert losses["mlmfast-fast"] == losses["mlmfast-fast-unpad"]
    assert ts.skip_reason("mlmfast-fast-unpad", torch.device("cpu")) == ts.UNPAD_CPU_REASON
    assert ts.skip_reason("mlmfast-fast-unpad", torch.device("meta")) is None
    assert ts.skip_reason("mlmfast-fast-unpad-compile", torch.device("cpu"), cpu_compile=True) is None
    full = Batches("full", B, L, [ids], [torch.ones(B, L, dtype=torch.long)], [B * L],
                   mask_kwargs=dict(mask_token_id=4, vocab_size=100, special_token_ids=[0, 1, 2, 3, 4]))
    full.masked = [full.mask(0)]
    seen.clear()
    ts.make_step("mlmfast-fast-unpad-compile", fn, opt, full, torch.device("cpu"))(0)
    assert seen == [("mlmfast-fast-unpad-compile", None)]  # a full batch: no count (nothing to unpad)


def test_union_of_kernel_intervals():
    from benchmarks.profile_step import _union_us

    assert _union_us([]) == 0.0
    assert _union_us([(0, 10), (5, 12), (20, 25), (21, 22), (12, 13)]) == 18.0  # overlaps and a touching end


def test_profile_step_runs_on_cpu(tmp_path, capsys):
    """The step profiler on CPU (bert-tiny): one table row per path with its step and host time; a path that
    cannot run here is a row with the reason; --out / --json written."""
    from benchmarks import profile_step

    out, js = tmp_path / "p.md", tmp_path / "p.json"
    assert profile_step.main(["--model", "bert-tiny", "--seq-len", "32", "--tokens-per-batch", "256",
                              "--vocab-size", "8192", "--steps", "2", "--warmup", "1", "--profile-steps", "1",
                              "--paths", "hf-sdpa,mlmfast-fast,mlmfast-fast-unpad", "--out", str(out),
                              "--json", str(js)]) == 0
    rows = {r["path"]: r for r in json.loads(js.read_text())["rows"]}
    for p in ("hf-sdpa", "mlmfast-fast"):
        assert rows[p]["step_ms"] > 0 and rows[p]["host_ms_per_step"] > 0 and rows[p]["top_host"], rows[p]
        assert rows[p]["device_busy"] is None  # no device on CPU
    assert rows["mlmfast-fast-unpad"]["error"].startswith("skipped: on CPU")
    md = out.read_text()
    assert "| mlmfast-fast |" in md and "top ops by host" in md and md in capsys.readouterr().out
    with pytest.raises(SystemExit):
        profile_step.main(["--paths", "nope"])


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """--compile-mode is torch.compile's mode for the -compile paths (reduce-overhead: CUDA graphs); eager paths
    are not compiled at all."""
    ts = _bench("train_suite")
    modes = []
    monkeypatch.setattr(ts.torch, "compile", lambda m, **kw: modes.append(kw.get("mode")) or m)
    def measure(*a, **k):
        return dict(status="skipped", reason="fake")

    rows, kw = _fake_path(ts, monkeypatch, measure, "mlmfast-fast-compile")
    ts._run_path("mlmfast-fast-compile", compile_mode="reduce-overhead", **kw)
    rows, kw = _fake_path(ts, monkeypatch, measure, "mlmfast-fast")
    ts._run_path("mlmfast-fast", compile_mode="reduce-overhead", **kw)
    assert modes == ["reduce-overhead"]
    from benchmarks.suite import build_parser

    assert build_parser().parse_args(["--compile-mode", "reduce-overhead"]).compile_mode == "reduce-overhead"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--compile-mode", "fastest"])


def test_hf_accelerated_path_is_the_hf_model_on_the_fast_path():
    """hf-accelerated: transformers' BertForMaskedLM (sdpa) with mlmfast.accelerate applied; it loads the same
    master weights as the other paths and gives the HF model's loss (CPU, fp32, dropout off)."""
    ts = _bench("train_suite")
    from mlmfast.config import ModelConfig
    from mlmfast.model import BertForMLM

    cfg = ModelConfig.from_preset("bert-tiny", vocab_size=100, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    state = BertForMLM(cfg).state_dict()
    acc = ts.build_model("hf-accelerated", cfg, state, torch.device("cpu"))
    ref = ts.build_model("hf-sdpa", cfg, state, torch.device("cpu"))
    assert type(acc.__dict__.get("forward")).__name__ == "_FastForward" and "forward" not in ref.__dict__
    ids = torch.randint(5, 100, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 7:] = 0
    labels = torch.full((2, 12), -100)
    labels[0, 3], labels[1, 2], labels[0, 9] = 17, 40, 8
    a = acc(input_ids=ids, attention_mask=am, labels=labels).loss
    b = ref(input_ids=ids, attention_mask=am, labels=labels).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attention_sweep_candidates_select_an_ab():
    """bench_attention --sweep --candidates KIND=BM,BN,W,S ...: only those configs, per kernel in the given order
    (duplicates once); every SWEEP_CANDIDATE without it; a malformed one, or --candidates without --sweep, is one
    argparse error (exit 2) that says what to write."""
    ba = _bench("bench_attention")
    assert ba.sweep_plan(["dkdv=128,64,4,2", "dkdv=64,128,8,3", "fwd=128,64,8,3", "dkdv=128,64,4,2"]) == {
        "dkdv": [(128, 64, 4, 2), (64, 128, 8, 3)], "fwd": [(128, 64, 8, 3)]}
    full = ba.sweep_plan(None)
    assert list(full) == ["fwd", "dkdv", "dq"] and all(v == ba.SWEEP_CANDIDATES for v in full.values())
    with pytest.raises(ValueError, match="expected KIND=BM,BN,W,S"):
        ba.sweep_plan(["dkdv=64,120,8,3"])
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_attention.py")
    for argv, msg in ((["--sweep", "--candidates", "attn=64,64,4,2"], "--candidates 'attn=64,64,4,2': expected"),
                      (["--candidates", "dkdv=64,64,4,2"], "--candidates selects the configs of --sweep")):
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
