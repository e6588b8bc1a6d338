"""Benchmark the fused attention kernel against SDPA, eager attention and (if installed) flash-attn.

    python benchmarks/bench_attention.py                         # L 128..4096, D 64 and 128, bf16, fwd and fwd+bwd
    python benchmarks/bench_attention.py --padding none half --out benchmarks/results/attention-$(date +%F).json
    python benchmarks/bench_attention.py --L 512 --D 64 --sweep   # try launch configs, print the best per kernel
    python benchmarks/bench_attention.py --L 512 --D 64 --sweep --dropout 0.1 --out sweep.json   # dropout variant
    python benchmarks/bench_attention.py --L 512 --D 64 --sweep --candidates dkdv=128,64,4,2 dkdv=64,128,8,3
                                                                 # an A/B of a few configs, same run
    python benchmarks/bench_attention.py --annotate sweep.json   # + registers / spills per candidate (no GPU):
                                                                 # the fastest spill-free config per kernel

FLOPs (non-causal, padding excluded): forward 4 * H * D * sum_b L_b^2, backward 2.5x that (fwd+bwd = 3.5x).
Timings (`--timing`, default both), median with p20 / p80, after warm-up, random data:
  events  triton.testing.do_bench: each call launched from Python, as an eager training step launches it; a call
          shorter than its host time (launches, autograd) measures the host
  graph   triton.testing.do_bench_cudagraph: the calls captured in a CUDA graph and replayed, so the kernels' own
          time (what a CUDA-graphed / torch.compile(mode="reduce-overhead") step sees); every provider alike
Providers: mlmfast (the Triton kernel), sdpa (torch SDPA: flash backend without a mask; with padding a
boolean mask and whatever backend SDPA picks), eager (matmul + softmax + matmul, the reference), flash-attn
(flash_attn_func; varlen on the unpadded tokens with padding) when importable.
`--padding half`: every row keeps L/2 keys (seqlens = L/2); padded query rows count no FLOPs.
`--dropout P [P ...]`: attention dropout (BERT trains with 0.1) for every provider (default 0 only); the
targets are read at 0.

Needs a CUDA GPU for kernel timings; on CPU it says so (and, with --cpu-reference, times only the reference
and SDPA at small L). The Markdown table is printed last; --out writes JSON rows with the device name,
library versions and git commit.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_attention.py): make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import git_commit as _git_commit  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype

TARGETS = {  # issue 4, H100 bf16 non-causal D=64 L=512
    "fwd TFLOP/s": 300.0,
    "fwd+bwd TFLOP/s": 250.0,
    "half padded: speedup vs SDPA with mask (fwd+bwd)": 3.0,
}


def _env() -> dict:
    env = {"torch": torch.__version__, "commit": _git_commit()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return env


def _flops_fwd(H: int, D: int, lens: list[int]) -> float:
    return 4.0 * H * D * sum(n * n for n in lens)


TIMINGS = ("events", "graph")


def _bench_cuda(fn: Callable[[], object], grad_to_none=None, timing: str = "events") -> tuple[float, float, float]:
    """(median, p20, p80) ms per call of fn; timing: see the module docstring."""
    from triton.testing import do_bench, do_bench_cudagraph

    if timing == "graph":
        q = do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    else:
        q = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(x) for x in q)


def _bench_cpu(fn: Callable[[], object], reps: int = 5) -> tuple[float, float, float]:
    import time

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times)
    return tuple(float(x) for x in (t.quantile(0.5), t.quantile(0.2), t.quantile(0.8)))


def _providers(padded: bool, device: str, dropout_p: float = 0.0) -> dict[str, Callable]:
    """name -> f(q, k, v, lens_tensor, keep_mask) returning out [B, H, L, D]; dropout_p for every provider."""
    import torch.nn.functional as F

    from mlmfast.attention import attention, attention_reference

    provs: dict[str, Callable] = {}
    if device == "cuda":
        provs["mlmfast"] = lambda q, k, v, lens, keep: attention(q, k, v, seqlens=lens if padded else None,
                                                                 dropout_p=dropout_p)

    def sdpa(q, k, v, lens, keep):
        if not padded:
            if device == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=dropout_p)

    provs["sdpa"] = sdpa
    provs["eager"] = lambda q, k, v, lens, keep: attention_reference(q, k, v, seqlens=lens if padded else None,
                                                                     dropout_p=dropout_p)
    if device == "cuda":
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func

            cache: dict = {}

            def fa(q, k, v, lens, keep):
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, L, H, D)
                if not padded:
                    return flash_attn_func(qt, kt, vt, dropout_p=dropout_p).transpose(1, 2)
                B, L, H, D = qt.shape
                if id(keep) not in cache:  # index set-up (a host sync) outside the timed region
                    cache[id(keep)] = (keep.flatten().nonzero().flatten(),
                                       torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0)))
                idx, cu = cache[id(keep)]
                sel = [x.reshape(B * L, H, D)[idx] for x in (qt, kt, vt)]
                o = flash_attn_varlen_func(*sel, cu, cu, L, L, dropout_p=dropout_p)
                out = torch.zeros(B * L, H, D, device=q.device, dtype=q.dtype)
                out[idx] = o
                return out.view(B, L, H, D).transpose(1, 2)

            provs["flash-attn"] = fa
        except ImportError:
            pass
    return provs


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    timings = list(dict.fromkeys(args.timing)) if device == "cuda" else ["cpu"]
    env = _env()
    rows = []
    for D in args.D:
        H = max(1, args.hidden // D)
        for L in args.L:
            B = max(1, args.tokens // L)
            for padding, dropout_p in [(pd, p) for pd in args.padding for p in args.dropout]:
                padded = padding == "half"
                lens_list = [max(1, L // 2)] * B if padded else [L] * B
                lens = torch.tensor(lens_list, device=device)
                keep = torch.arange(L, device=device)[None, :] < lens[:, None]
                q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
                do = torch.randn(B, H, L, D, device=device, dtype=dtype)
                flops = _flops_fwd(H, D, lens_list)
                for name, f in _providers(padded, device, dropout_p).items():
                    if args.providers and name not in args.providers:
                        continue
                    if name == "eager" and B * H * L * L * 4 > args.eager_max_bytes:
                        continue  # the score matrix would not fit
                    for mode, timing in [(m, t) for m in args.modes for t in timings]:
                        if mode == "fwd":
                            def fn(f=f):
                                with torch.no_grad():
                                    return f(q, k, v, lens, keep)
                            mult = 1.0
                        else:
                            def fn(f=f):
                                f(q, k, v, lens, keep).backward(do)
                            mult = 3.5
                        try:
                            if device == "cuda":
                                med, p20, p80 = _bench_cuda(fn, grad_to_none=[q, k, v], timing=timing)
                            else:
                                med, p20, p80 = _bench_cpu(fn)
                        except Exception as exc:  # e.g. out of memory, a backend that refuses the shape or capture
                            print(f"skip {name} {mode} {timing} L={L} D={D} {padding} p={dropout_p}: "
                                  f"{type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:120]}", file=sys.stderr)
                            torch.cuda.empty_cache() if device == "cuda" else None
                            continue
                        row = dict(provider=name, mode=mode, L=L, D=D, B=B, H=H, padding=padding,
                                   dtype=args.dtype, timing=timing, dropout=dropout_p, ms=med, p20_ms=p20,
                                   p80_ms=p80,
                                   tflops=mult * flops / (med * 1e-3) / 1e12, **env)
                        rows.append(row)
                        print(f"{name:10s} {mode:7s} {timing:6s} L={L:5d} D={D:3d} B={B:3d} H={H:2d} {padding:4s} "
                              f"p={dropout_p:<4g} "
                              f"{med:8.3f} ms [{p20:.3f}, {p80:.3f}]  {row['tflops']:7.1f} TFLOP/s", flush=True)
    return rows


def _timing(r: dict) -> str:
    return r.get("timing", "events")  # result files before the graph timing: events


def _p(r: dict) -> float:
    return float(r.get("dropout", 0.0))  # result files before --dropout: 0


def _markdown(rows: list[dict]) -> str:
    out = ["| provider | mode | timing | L | D | B | H | padding | dropout | median ms | p20 ms | p80 ms | TFLOP/s | "
           "vs sdpa |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def key(r):
        return r["mode"], _timing(r), r["L"], r["D"], r["padding"], _p(r)

    sdpa = {key(r): r["ms"] for r in rows if r["provider"] == "sdpa"}
    for r in rows:
        base = sdpa.get(key(r))
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        out.append(f"| {r['provider']} | {r['mode']} | {_timing(r)} | {r['L']} | {r['D']} | {r['B']} | {r['H']} | "
                   f"{r['padding']} | {_p(r):g} | {r['ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} | "
                   f"{r['tflops']:.1f} | {speed} |")
    return "\n".join(out)


def _targets(rows: list[dict]) -> str:
    """The issue's targets (bf16, D=64, L=512), one line per target and timing measured."""
    def get(provider, mode, padding, timing, p=0.0):
        for r in rows:
            if (r["provider"], r["mode"], r["L"], r["D"], r["padding"], r["dtype"], _timing(r), _p(r)) == \
                    (provider, mode, 512, 64, padding, "bf16", timing, p):
                return r
        return None

    lines = ["| target (bf16, D=64, L=512) | timing | bar | measured | ok |", "| --- | --- | --- | --- | --- |"]
    for timing in dict.fromkeys(_timing(r) for r in rows):
        for mode, key in (("fwd", "fwd TFLOP/s"), ("fwd+bwd", "fwd+bwd TFLOP/s")):
            r = get("mlmfast", mode, "none", timing)
            if r:
                ok = "yes" if r["tflops"] >= TARGETS[key] else "NO"
                lines.append(f"| {key} | {timing} | {TARGETS[key]:.0f} | {r['tflops']:.1f} | {ok} |")
        key = "half padded: speedup vs SDPA with mask (fwd+bwd)"
        a, b = get("mlmfast", "fwd+bwd", "half", timing), get("sdpa", "fwd+bwd", "half", timing)
        if a and b:
            sp = b["ms"] / a["ms"]
            lines.append(f"| {key} | {timing} | {TARGETS[key]:.0f}x | {sp:.2f}x | {'yes' if sp >= TARGETS[key] else 'NO'} |")
        # no target, for the record: what attention dropout (BERT's 0.1, the training step's) costs
        p = max((_p(r) for r in rows if r["provider"] == "mlmfast" and _timing(r) == timing), default=0.0)
        a, b = get("mlmfast", "fwd+bwd", "none", timing, p), get("mlmfast", "fwd+bwd", "none", timing)
        if p > 0 and a and b:
            lines.append(f"| (info) dropout {p:g}: fwd+bwd time / dropout 0, no padding | {timing} | - | "
                         f"{a['ms'] / b['ms']:.2f}x | - |")
            c = get("sdpa", "fwd+bwd", "none", timing, p)
            if c:
                lines.append(f"| (info) dropout {p:g}: fwd+bwd speedup vs SDPA, no padding | {timing} | - | "
                             f"{c['ms'] / a['ms']:.2f}x | - |")
    return "\n".join(lines) if len(lines) > 2 else ""


SWEEP_CANDIDATES = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]


def _with_config(K, kind: str, cfg):
    """kernel_config patched so that kernel `kind` launches with cfg (the others keep the table's)."""
    orig = K.kernel_config
    K.kernel_config = lambda kd, *a, **kw: cfg if kd == kind else orig(kd, *a, **kw)
    return orig


def _sweep_inputs(B: int, H: int, L: int, D: int, dtype: torch.dtype, device: str):
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn_like(q)


def _warm_one(job: tuple) -> Optional[str]:
    """In a worker process: run one candidate once so that Triton compiles it into its on-disk cache (the sweep's
    process then loads it instead of compiling). Same shapes and dtypes as the sweep, hence the same
    specialisation and cache key. Returns None, or the error."""
    kind, cand, (B, H, L, D), dtype_name, device, dropout_p = job
    import mlmfast.kernels.attention as K
    from mlmfast.attention import attention

    dtype = DTYPES[dtype_name]
    orig = _with_config(K, kind, K.KernelConfig(*cand))
    try:
        q, k, v, do = _sweep_inputs(B, H, L, D, dtype, device)
        out = attention(q, k, v, dropout_p=dropout_p)
        if kind != "fwd":
            out.backward(do)
        if device == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as exc:  # a candidate that does not compile is reported by the sweep itself
        return f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    finally:
        K.kernel_config = orig


def warm_cache(jobs: list[tuple], workers: int) -> dict:
    """Compile the sweep's candidates in `workers` processes at once (spawned: each has its own CUDA context),
    since compiling, one core per kernel, is most of a sweep's time. {job index: error} for those that failed;
    a pool that cannot start is reported and the sweep compiles as it goes."""
    import concurrent.futures
    import multiprocessing

    from benchmarks import bench_attention as this  # picklable by module name in the spawned workers

    errors = {}
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for i, err in enumerate(pool.map(this._warm_one, jobs)):
                if err:
                    errors[i] = err
    except Exception as exc:
        print(f"sweep: parallel compile unavailable ({type(exc).__name__}: {exc}); compiling in the sweep")
    return errors


def sweep_plan(candidates: Optional[list[str]] = None) -> dict[str, list[tuple[int, int, int, int]]]:
    """kernel -> the launch configs to time: every SWEEP_CANDIDATE for fwd, dkdv and dq, or only the given
    "KIND=BM,BN,W,S" ones, in their order (an A/B of a few configs in one run: seconds, not minutes). ValueError
    for a malformed one."""
    from mlmfast.kernels.attention import parse_config

    if not candidates:
        return {kind: list(SWEEP_CANDIDATES) for kind in ("fwd", "dkdv", "dq")}
    plan: dict[str, list[tuple[int, int, int, int]]] = {}
    for item in candidates:
        kind, cfg = parse_config(item)
        if cfg not in plan.setdefault(kind, []):
            plan[kind].append(cfg)
    return plan


def sweep(args) -> list[dict]:
    """Time each candidate launch config of each kernel at the first L / D given, with the first --dropout (the
    dropout variant has launch configs of its own); print the fastest. Candidates are compiled first in parallel
    processes (`--jobs`); timings: do_bench medians, the same inputs for all. Spills: see --annotate."""
    import time

    import mlmfast.kernels.attention as K
    from mlmfast.attention import attention

    dtype = DTYPES[args.dtype]
    D, L = args.D[0], args.L[0]
    p = float(args.dropout[0])
    H, B = max(1, args.hidden // D), max(1, args.tokens // L)
    plan = sweep_plan(getattr(args, "candidates", None))
    t0 = time.perf_counter()
    if args.jobs > 1:
        jobs = [(kind, c, (B, H, L, D), args.dtype, "cuda", p) for kind, cands in plan.items() for c in cands]
        errors = warm_cache(jobs, args.jobs)
        print(f"sweep: compiled {len(jobs)} candidates in {time.perf_counter() - t0:.0f} s on {args.jobs} processes"
              f" ({len(errors)} failed)", flush=True)
    q, k, v, do = _sweep_inputs(B, H, L, D, dtype, "cuda")
    flops = _flops_fwd(H, D, [L] * B)
    rows = []
    for kind, cands in plan.items():
        results = []
        for cand in cands:
            c = K.KernelConfig(*cand)
            orig = _with_config(K, kind, c)
            try:
                if kind == "fwd":
                    ms = _bench_cuda(lambda: attention(q, k, v, dropout_p=p))[0]
                    tf = flops / (ms * 1e-3) / 1e12
                else:
                    ms = _bench_cuda(lambda: attention(q, k, v, dropout_p=p).backward(do), grad_to_none=[q, k, v])[0]
                    tf = 3.5 * flops / (ms * 1e-3) / 1e12
                results.append((ms, c))
                rows.append(dict(kind=kind, config=list(cand), ms=ms, tflops=tf, L=L, D=D, B=B, H=H,
                                 dtype=args.dtype, dropout=p, timed="fwd" if kind == "fwd" else "fwd+bwd"))
                print(f"{kind} {c}: {ms:.3f} ms ({tf:.1f} TFLOP/s{' fwd+bwd' if kind != 'fwd' else ''})", flush=True)
            except Exception as exc:
                rows.append(dict(kind=kind, config=list(cand), error=f"{type(exc).__name__}: {exc}"[:300]))
                print(f"{kind} {c}: failed ({type(exc).__name__})", flush=True)
            finally:
                K.kernel_config = orig
        if results:
            best = min(results, key=lambda t: t[0])
            print(f"BEST {kind} D={D} L={L} {args.dtype} dropout {p:g}: {best[1]} {best[0]:.3f} ms")
    print(f"sweep: {time.perf_counter() - t0:.0f} s in all")
    return rows


def annotate(path: str, arch: int = 90) -> list[dict]:
    """Registers and spill bytes (ptxas, this machine's triton; no GPU needed) of every candidate in a --sweep
    JSON, written back into it; prints the fastest spill-free config per kernel (the ones a launch-config table
    may take: CI fails on spills). The variant compiled is the one timed: plain, or dropout when the rows say so."""
    import json

    from mlmfast._io import atomic_write_json
    from mlmfast.kernels import attention as K
    from mlmfast.kernels import compile_check as C

    with open(path) as f:
        rows = json.load(f)
    for r in rows:
        if "config" not in r or "error" in r:
            continue
        dropout = float(r.get("dropout", 0.0)) > 0
        orig = _with_config(K, r["kind"], K.KernelConfig(*r["config"]))
        try:
            dtype_name = str(DTYPES[r["dtype"]]).removeprefix("torch.")  # "bf16" -> "bfloat16"
            spec = next(sp for sp in C._specs(r["D"], dtype_name, arch, [(False, dropout)]) if sp[0] == r["kind"])
            _, fn, sig, cx, opts, _, _ = spec
            ck = C._compile(fn, sig, cx, opts, arch)
            r["regs"], r["spill_bytes"] = C._ptxas_usage(ck.asm["ptx"], arch)
        except Exception as exc:
            r["compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            K.kernel_config = orig
        print(f"{r['kind']:5s} {tuple(r['config'])}: {r['ms']:.3f} ms, {r.get('regs', '-')} regs, "
              f"spill {r.get('spill_bytes', '-')}", flush=True)
    atomic_write_json(path, rows)
    for kind in dict.fromkeys(r.get("kind") for r in rows if "kind" in r):
        ok = sorted((r for r in rows if r.get("kind") == kind and r.get("spill_bytes") == 0 and "ms" in r),
                    key=lambda r: r["ms"])
        best = min((r for r in rows if r.get("kind") == kind and "ms" in r), key=lambda r: r["ms"], default=None)
        if ok:
            print(f"BEST spill-free {kind}: {tuple(ok[0]['config'])} {ok[0]['ms']:.3f} ms"
                  + (f" (fastest overall {tuple(best['config'])} {best['ms']:.3f} ms, spill {best.get('spill_bytes')})"
                     if best is not ok[0] else ""))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="fused attention benchmark (see module docstring)")
    ap.add_argument("--L", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--tokens", type=int, default=16384, help="B = tokens // L (default 16384)")
    ap.add_argument("--hidden", type=int, default=2048, help="H = hidden // D (default 2048)")
    ap.add_argument("--padding", nargs="+", default=["none", "half"], choices=["none", "half"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0], help="attention dropout p (default 0)")
    ap.add_argument("--timing", nargs="+", default=list(TIMINGS), choices=TIMINGS,
                    help="GPU: events (launched from Python), graph (CUDA-graph replay: kernel time); default both")
    ap.add_argument("--providers", nargs="*", default=None, help="subset of mlmfast sdpa eager flash-attn")
    ap.add_argument("--eager-max-bytes", type=float, default=16e9, help="skip eager when B*H*L*L*4 exceeds this")
    ap.add_argument("--sweep", action="store_true", help="time launch configs of each kernel (GPU)")
    ap.add_argument("--candidates", nargs="+", default=None, metavar="KIND=BM,BN,W,S",
                    help="--sweep: time only these launch configs (e.g. dkdv=128,64,4,2 dkdv=64,128,8,3: an A/B)")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                    help="--sweep: compile the candidates in this many processes first (1: as it goes)")
    ap.add_argument("--cpu-reference", action="store_true",
                    help="on CPU: time only eager and SDPA at the given (small) L; the kernel needs a GPU")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--annotate", default=None, metavar="SWEEP_JSON",
                    help="add registers / spills (sm_90, this machine's triton, no GPU) to a --sweep JSON")
    args = ap.parse_args(argv)
    if args.candidates is not None:
        if not args.sweep:
            ap.error("--candidates selects the configs of --sweep: add --sweep")
        try:
            sweep_plan(args.candidates)
        except ValueError as exc:
            ap.error(f"--candidates {exc}")
    if args.annotate:
        from mlmfast.kernels.compile_check import rerun_without_interpreter

        rc = rerun_without_interpreter([sys.executable, os.path.abspath(__file__), "--annotate", args.annotate])
        if rc is not None:
            return rc
        annotate(args.annotate)
        return 0
    if not torch.cuda.is_available():
        print("bench_attention: kernel timings need a CUDA GPU (the Triton interpreter is not a benchmark).")
        if not args.cpu_reference:
            return 0
        args.providers = [p for p in (args.providers or ["sdpa", "eager"]) if p in ("sdpa", "eager")]
    if args.sweep:
        if not torch.cuda.is_available():
            print("--sweep needs a GPU")
            return 1
        rows = sweep(args)
    else:
        rows = run(args)
    if args.out:
        from mlmfast._io import atomic_write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_json(args.out, rows)
    if args.sweep:
        return 0
    print()
    t = _targets(rows)
    if t:
        print(t + "\n")
    print(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
