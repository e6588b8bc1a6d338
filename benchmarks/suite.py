"""The benchmark suite's command line: `python -m benchmarks` and `mlmfast bench` (the same arguments).

    python -m benchmarks                                   # this machine's defaults (CPU: < 5 min on 2 cores)
    python -m benchmarks --smoke --out /tmp/b              # seconds: proves the suite runs (CI)
    python -m benchmarks --device cuda --models bert-base --seq-lens 128,512 --out $OUT --name results

Writes <out>/<name>.json (rows + device, versions, git commit, date, config, conventions) as rows come in,
then <name>.md and <name>.png, and prints the Markdown tables last. Default out: benchmarks/results, default
name: <date>-<device>. On SIGTERM or Ctrl-C it writes what it has and exits with status 130.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent

# Per-device defaults; an explicit flag always wins. CPU: sized to end in < 5 minutes on a 2-core machine.
DEFAULTS = {
    "cpu": dict(models="bert-mini,bert-small", seq_lens="128", batch_sizes="8", steps=5, warmup=1, vocab_size=8192,
                op_target_s=0.4, op_max_calls=20, threads="auto", time_budget=240.0),
    "cuda": dict(models="bert-base", seq_lens="128,512", batch_sizes="auto", steps=20, warmup=3, vocab_size=30522,
                 op_target_s=0.3, op_max_calls=100),
    "smoke": dict(models="bert-tiny", seq_lens="32", batch_sizes="2", steps=2, warmup=1, vocab_size=512,
                  op_target_s=0.01, op_max_calls=2, threads=1),
}

CONVENTIONS = [
    "Times: median [p20, p80] over the timed calls after warm-up (CUDA events on a GPU, perf_counter on a CPU).",
    "Train step = (fast paths: mask_select) + forward + backward + AdamW (fused on CUDA) + zero_grad; bf16 autocast "
    "on CUDA, fp32 on CPU; all paths start from the same weights and get the same masked batches.",
    "Model FLOPs (every path): HF's work on the padded batch, 6*N*B*L + 12*layers*B*L^2*H + 6*B*L*H*V "
    "(N = encoder + head-transform weight matrices; full logits); MFU = that / time / the GPU's dense bf16 peak.",
    "Tokens/s count non-pad tokens. Peak memory = what the path adds to what was live before it was built "
    "(CUDA: max_memory_allocated; CPU: peak RSS via VmHWM reset through /proc/self/clear_refs).",
    "Rows: real = one document per row (the text's length distribution), full = packed rows of L tokens.",
    "Speedup columns: baseline median / this median, same run, same config.",
]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def _csv(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--suite", default="ops,train", help="comma list of: ops, train (default: both)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run of everything (tiny model; for CI)")
    ap.add_argument("--threads", default=None,
                    help="CPU: torch threads, or 'auto' (the default; --smoke: 1): all cores, but 1 when the 1-minute "
                         "load average is >= half the cores (OpenMP threads spinning on cores that others use make "
                         "steps several times slower and erratic)")
    g = ap.add_argument_group("configs (defaults depend on the device: see the end of --help)")
    g.add_argument("--models", help="comma list of presets (bert-tiny ... bert-large)")
    g.add_argument("--seq-lens", help="comma list of L")
    g.add_argument("--batch-sizes", help="comma list of B, or 'auto' = --tokens-per-batch // L")
    g.add_argument("--tokens-per-batch", type=int, default=16384, help="for --batch-sizes auto (default 16384)")
    g.add_argument("--dists", default="real,full", help="row lengths: real (the text's), full (packed); default both")
    g.add_argument("--vocab-size", type=int, help="model vocabulary (GPU default 30522 as BERT; CPU 8192 as "
                                                   "`mlmfast train`)")
    g.add_argument("--tokenizer-vocab", type=int, default=8192, help="WordPiece trained on the text (default 8192)")
    g.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="text for the batches (default: the built-in corpus)")
    g = ap.add_argument_group("what runs")
    g.add_argument("--paths", default="all", help="comma list of train-step paths (default all: "
                                                 "hf-eager, hf-sdpa, hf-sdpa-compile, mlmfast-reference, "
                                                 "hf-accelerated, mlmfast-fast, mlmfast-fast-unpad, "
                                                 "mlmfast-fast-compile, mlmfast-fast-unpad-compile)")
    g.add_argument("--ops", default="all", help="comma list of ops: masking, gather, attention, linear-CE")
    g.add_argument("--cpu-compile", action="store_true", help="run the torch.compile paths on CPU too")
    g.add_argument("--steps", type=int, help="timed training steps per path (GPU 20, CPU 5)")
    g.add_argument("--warmup", type=int, help="untimed steps first (GPU 3, CPU 1)")
    g.add_argument("--compile-warmup", type=int, default=3, help="untimed steps of a compiled path (default 3)")
    g.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the -compile paths (default: default; reduce-overhead replays "
                        "CUDA graphs, which removes the host's launch cost)")
    g.add_argument("--batches", type=int, default=4, help="distinct batches, cycled (default 4)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start nothing new after S seconds; what is left becomes skipped rows (CPU default 240)")
    g.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: the table in "
                                                                     "benchmarks/harness.py)")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default=None, help="directory (default: benchmarks/results)")
    g.add_argument("--name", default=None, help="file stem (default: <date>-<device>, + -smoke with --smoke)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no per-row lines, only the tables")


def _resolve(args: argparse.Namespace):
    import torch

    from mlmfast.config import PRESETS
    from mlmfast.errors import UserError
    from mlmfast.trainer import resolve_device

    device = resolve_device(args.device)
    d = DEFAULTS["smoke" if args.smoke else device.type if device.type in DEFAULTS else "cpu"]
    for k in ("models", "seq_lens", "batch_sizes", "steps", "warmup", "vocab_size", "threads", "time_budget"):
        if getattr(args, k) is None and k in d:
            setattr(args, k, d[k])
    if args.smoke:
        args.batches, args.compile_warmup = min(args.batches, 2), min(args.compile_warmup, 2)
        args.tokenizer_vocab = min(args.tokenizer_vocab, args.vocab_size)
    args.op_target_s, args.op_max_calls = d["op_target_s"], d["op_max_calls"]
    suites = _csv(args.suite)
    bad = [s for s in suites if s not in ("ops", "train")]
    if bad or not suites:
        raise UserError(f"--suite {args.suite!r}: use ops, train or ops,train")
    models = _csv(args.models)
    for m in models:
        if m not in PRESETS:
            raise UserError(f"--models: unknown preset {m!r}; choose from {', '.join(PRESETS)}")
    try:
        seq_lens = [int(x) for x in _csv(args.seq_lens)]
        batch_sizes = None if args.batch_sizes == "auto" else [int(x) for x in _csv(args.batch_sizes)]
    except ValueError:
        raise UserError("--seq-lens and --batch-sizes take comma lists of integers (or --batch-sizes auto)") from None
    if any(L < 8 or L > 4096 for L in seq_lens):
        raise UserError("--seq-lens: each L must be in [8, 4096]")
    if batch_sizes is not None and any(B < 1 for B in batch_sizes):
        raise UserError("--batch-sizes must be >= 1")
    dists = _csv(args.dists)
    if not dists or any(x not in ("real", "full") for x in dists):
        raise UserError("--dists: use real, full or real,full")
    from .ops_suite import OPS
    from .train_suite import PATHS

    paths = list(PATHS) if args.paths == "all" else _csv(args.paths)
    ops = list(OPS) if args.ops == "all" else _csv(args.ops)
    for name, chosen, known in (("--paths", paths, PATHS), ("--ops", ops, OPS)):
        unknown = [x for x in chosen if x not in known]
        if unknown:
            raise UserError(f"{name}: unknown {unknown[0]!r}; choose from {', '.join(known)}")
    if args.steps < 1 or args.warmup < 0 or args.batches < 1:
        raise UserError("--steps and --batches must be >= 1 and --warmup >= 0")
    if args.threads not in (None, "auto"):
        try:
            args.threads = int(args.threads)
        except ValueError:
            raise UserError(f"--threads {args.threads!r}: pass a number or auto") from None
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
    if args.vocab_size < args.tokenizer_vocab:
        args.tokenizer_vocab = args.vocab_size
    return device, suites, models, seq_lens, batch_sizes, dists, paths, ops


def run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    device, suites, models, seq_lens, batch_sizes, dists, paths, ops = _resolve(args)
    import torch

    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    threads_before = torch.get_num_threads()
    args.threads_choice = None
    if device.type == "cpu" and args.threads:
        n, args.threads_choice = _cpu_threads(args.threads, threads_before)
        torch.set_num_threads(n)
    try:
        return _run(args, device, suites, dists, paths, ops, models, seq_lens, batch_sizes, t_start, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, device, suites, dists, paths, ops, models, seq_lens, batch_sizes, t_start, log) -> int:
    import torch

    from . import ops_suite, report, train_suite
    from .harness import DeviceLost, environment, peak_tflops, short_device
    from .inputs import TextSource

    env = environment(device)
    if device.type == "cpu":
        env["threads_choice"] = args.threads_choice or "torch's default"
        if env["torch_threads"] > 1 and (env.get("load_avg_1m") or 0) >= 0.5 * env["cpu_cores"]:
            env["warning"] = (f"load average {env['load_avg_1m']} on {env['cpu_cores']} cores with "
                              f"{env['torch_threads']} torch threads: OpenMP threads spin on busy cores; "
                              "--threads 1 or OMP_WAIT_POLICY=PASSIVE gives steadier numbers")
            print(f"# warning: {env['warning']}", file=sys.stderr, flush=True)
    peak, peak_src = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else \
        peak_tflops(env["device"]) if device.type == "cuda" else (None, "CPU: MFU not reported")
    out_dir = Path(args.out) if args.out else HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    # a smoke run proves the suite works; it must not replace the dated results the README quotes
    name = args.name or f"{_dt.date.today().isoformat()}-{short_device(env)}" + ("-smoke" if args.smoke else "")
    stem = out_dir / name
    deadline = None if args.time_budget is None else t_start + args.time_budget

    configs = []
    for m in models:
        for L in seq_lens:
            for B in (batch_sizes or [max(1, args.tokens_per_batch // L)]):
                configs.append(train_suite.StepConfig(m, L, B, args.vocab_size))
    log(f"# mlmfast bench on {env['device']}: suites {','.join(suites)}; "
        f"{len(configs)} config(s) x rows {','.join(dists)}; results -> {stem}.{{json,md,png}}")
    t0 = time.monotonic()
    text = TextSource(args.data, tokenizer_vocab=args.tokenizer_vocab)
    log(f"# text: {text.source}: {len(text.documents)} documents, WordPiece {text.tokenizer.vocab_size} tokens "
        f"({time.monotonic() - t0:.1f}s)")
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    meta = dict(env=env, config=config, peak_tflops=peak, peak_source=peak_src, text=text.source,
                conventions=CONVENTIONS, status="running")
    rows: list[dict] = []

    def on_row(r: dict) -> None:
        rows.append(r)
        report.write_json(f"{stem}.json", meta, rows)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: finish like Ctrl-C, keeping what was measured
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        if "ops" in suites:
            ops_suite.run(configs, dists, ops, text, device, n_batches=args.batches, seed=args.seed,
                          min_calls=2 if args.smoke else 5, max_calls=args.op_max_calls, target_s=args.op_target_s,
                          deadline=deadline, on_row=on_row, log=log)
        if "train" in suites:
            train_suite.run(configs, dists, paths, text, device, steps=args.steps, warmup=args.warmup,
                            compile_warmup=args.compile_warmup, n_batches=args.batches, seed=args.seed,
                            cpu_compile=args.cpu_compile, compile_mode=args.compile_mode, peak=peak,
                            deadline=deadline, on_row=on_row, log=log)
        meta["status"] = "complete"
    except DeviceLost as exc:  # a kernel broke the CUDA context: nothing more can run in this process
        meta["status"] = "device lost"
        code = 1
        print(f"# {exc}: writing what was measured", file=sys.stderr, flush=True)
        _fill_missing(rows, configs, dists, suites, ops, paths, f"not run: {exc}")
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
        code = 130
        print("# interrupted: writing what was measured", file=sys.stderr, flush=True)
        _fill_missing(rows, configs, dists, suites, ops, paths, "not run: interrupted (SIGTERM or Ctrl-C)")
    finally:
        signal.signal(signal.SIGTERM, old)
    ops_suite.add_speedups([r for r in rows if r.get("suite") == "ops"])
    train = [r for r in rows if r.get("suite") == "train"]
    train_suite.add_speedups(train)
    rows[:] = [r for r in rows if r.get("suite") != "train"] + train_suite.sort_rows(train, configs, dists)
    meta["seconds"] = round(time.monotonic() - t_start, 1)
    report.write_json(f"{stem}.json", meta, rows)
    md = report.markdown(meta, rows)
    with open(f"{stem}.md", "w") as f:
        f.write(md + "\n")
    png = None
    if not args.no_plot:
        try:
            png = report.plot(meta, rows, f"{stem}.png")
        except Exception as exc:  # a plot must not lose the numbers
            print(f"# plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print()
    print(md)
    print(f"wrote {stem}.json, {stem}.md" + (f", {png}" if png else "") + f" in {meta['seconds']:.0f}s")
    return code


def _cpu_threads(choice, default: int) -> tuple[int, str]:
    """--threads: a number, or auto = torch's default unless the machine is busy (load >= half the cores): 1."""
    if choice != "auto":
        return int(choice), f"--threads {choice}"
    try:
        load = os.getloadavg()[0]
    except OSError:
        return default, f"auto: {default} (no load average)"
    cores = os.cpu_count() or 1
    if load >= 0.5 * cores:
        return 1, f"auto: 1 (1-minute load average {load:.1f} >= half of {cores} cores)"
    return default, f"auto: {default} (load average {load:.1f} on {cores} cores)"


def _fill_missing(rows, configs, dists, suites, ops, paths, reason: str) -> None:
    """Rows for what an interrupted run did not reach, so every planned (config, dist, path / op) has a row."""
    have = {(r["suite"], r["model"], r["L"], r["B"], r["dist"], r.get("path") or r.get("op")) for r in rows}
    for c in configs:
        for d in dists:
            base = dict(model=c.model, L=c.L, B=c.B, vocab_size=c.vocab_size, dist=d, fill=None,
                        status="skipped", reason=reason)
            for op in ops if "ops" in suites else ():
                if ("ops", c.model, c.L, c.B, d, op) not in have:
                    rows.append(dict(base, suite="ops", op=op, impl="*"))
            for p in paths if "train" in suites else ():
                if ("train", c.model, c.L, c.B, d, p) not in have:
                    rows.append(dict(base, suite="train", path=p))


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="mlmfast benchmark suite: ops and end-to-end training steps, "
                                 "fast vs reference vs HF, with tables, a plot and dated JSON results.",
                                 epilog="Defaults: " + "; ".join(
                                     f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items() if not a.startswith("op_"))
                                     for k, v in DEFAULTS.items()))
    add_arguments(ap)
    return ap


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    from mlmfast.errors import UserError

    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
