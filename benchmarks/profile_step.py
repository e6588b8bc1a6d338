"""Where a training step's time goes: is it bound by the GPU or by the host issuing kernels?

    python -m benchmarks.profile_step                                  # bert-base, L=128, hf-sdpa + mlmfast-fast
    python -m benchmarks.profile_step --paths mlmfast-fast --seq-len 512 --out prof.md

For each train-step path of `benchmarks/train_suite.py` (same models, batches and step), after warm-up:
  * step ms          median wall time per step (CUDA events; host clock on CPU), profiler off
  * device busy      the union of the device's kernel intervals over the profiled steps / their wall time. Near
                     100%: the GPU is the bottleneck; well below: the GPU waits for the host to launch work, and
                     fewer launches (fusion, CUDA graphs, torch.compile) pay more than faster kernels
  * kernels / step   device kernels launched per step (Triton and ATen alike)
  * host ms / step   the profiler's CPU self time of all ops per step (dispatch + Python in ops; a floor of the
                     host's work, with the profiler's own overhead in it)
and the top ops by device time and by host (CPU self) time. Markdown on stdout (and --out), JSON with --json.
On a CPU the device columns are empty: the table then only counts host time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

import torch

from .harness import environment, short_device, spread, time_calls

DEFAULT_PATHS = ("hf-sdpa", "mlmfast-fast")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (microseconds)."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(prof, n_steps: int, wall_s: float) -> dict[str, Any]:
    """Numbers of one profiled window of n_steps steps that took wall_s seconds (see the module docstring)."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in kernels])
    avgs = prof.key_averages()
    host_us = sum(a.self_cpu_time_total for a in avgs)

    def dev_time(a) -> float:
        return float(getattr(a, "self_device_time_total", getattr(a, "self_cuda_time_total", 0.0)))

    top_dev = sorted((a for a in avgs if dev_time(a) > 0), key=dev_time, reverse=True)[:12]
    top_host = sorted(avgs, key=lambda a: a.self_cpu_time_total, reverse=True)[:12]
    return dict(
        device_busy=(busy_us / (wall_s * 1e6)) if kernels and wall_s > 0 else None,
        kernels_per_step=len(kernels) / n_steps if kernels else None,
        host_ms_per_step=host_us / 1e3 / n_steps,
        top_device=[dict(op=a.key[:90], ms_per_step=dev_time(a) / 1e3 / n_steps, calls_per_step=a.count / n_steps)
                    for a in top_dev],
        top_host=[dict(op=a.key[:90], ms_per_step=a.self_cpu_time_total / 1e3 / n_steps,
                       calls_per_step=a.count / n_steps) for a in top_host],
    )


def profile_path(path: str, cfg, state, batches, device: torch.device, *, steps: int, warmup: int,
                 prof_steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from .train_suite import build_path, make_step

    model, opt, fn = build_path(path, cfg, state, device)
    step = make_step(path, fn, opt, batches, device)
    _, timed = time_calls(step, warmup, steps, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(prof_steps):
            step(warmup + steps + i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    out = dict(path=path, step_ms=spread(timed)["ms"], profiled_steps=prof_steps, profiled_wall_ms=wall * 1e3 / prof_steps,
               **summarize(prof, prof_steps, wall))
    del model, opt, fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = [f"## Step profile: {meta['device']} ({meta['date']}), {meta['model']}, L = {meta['L']}, "
             f"B = {meta['B']}, {meta['dist']} rows", "",
             "| path | step ms | device busy | kernels / step | host ms / step (profiler) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | error: {r['error']} | | | |")
            continue
        busy = "n/a" if r["device_busy"] is None else f"{100 * r['device_busy']:.0f}%"
        lines.append(f"| {r['path']} | {r['step_ms']:.2f} | {busy} | {f(r['kernels_per_step'], '.0f')} | "
                     f"{r['host_ms_per_step']:.1f} |")
    for r in rows:
        if "error" in r:
            continue
        for key, title in (("top_device", "device time"), ("top_host", "host (CPU self) time")):
            if not r[key]:
                continue
            lines += ["", f"**{r['path']}: top ops by {title}, per step**", "", "| op | ms | calls |",
                      "| --- | ---: | ---: |"]
            lines += [f"| `{t['op']}` | {t['ms_per_step']:.3f} | {t['calls_per_step']:.0f} |" for t in r[key]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from mlmfast.trainer import resolve_device

    from .inputs import TextSource
    from .train_suite import PATHS, master_state, model_config, skip_reason

    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_step",
                                 description="device-busy share, kernel launches and top ops of training steps")
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"comma list of: {', '.join(PATHS)}")
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None, help="default: --tokens-per-batch // L")
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--dist", choices=["real", "full"], default="full")
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (profiler off)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the Markdown here")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        ap.error(f"unknown path(s) {', '.join(bad)}; choose from {', '.join(PATHS)}")
    device = resolve_device(args.device)
    L = args.seq_len
    B = args.batch_size or max(1, args.tokens_per_batch // L)
    text = TextSource(None)
    cfg = model_config(args.model, args.vocab_size, L, text.tokenizer.pad_token_id)
    batches = text.batches(args.dist, B, L, 4, args.vocab_size, device, 0)
    state = master_state(cfg, 0)
    env = environment(device)
    meta = dict(device=short_device(env), date=str(env.get("date"))[:10], model=args.model, L=L, B=B, dist=args.dist,
                git_commit=env.get("git_commit"))
    rows = []
    for path in paths:
        reason = skip_reason(path, device)
        if reason is not None:
            rows.append(dict(path=path, error=f"skipped: {reason}"))
            continue
        try:
            rows.append(profile_path(path, cfg, state, batches, device, steps=args.steps, warmup=args.warmup,
                                     prof_steps=args.profile_steps))
        except Exception as exc:  # one path's failure is a row, not the end of the run
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            rows.append(dict(path=path, error=f"{type(exc).__name__}: {first}"))
        print(f"# {path}: done", file=sys.stderr, flush=True)
    md = markdown(meta, rows)
    print(md)
    if args.out:
        from mlmfast._io import atomic_write_text

        atomic_write_text(args.out, md + "\n")
    if args.json:
        from mlmfast._io import atomic_write_text

        atomic_write_text(args.json, json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
