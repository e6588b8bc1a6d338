"""Compile every Triton kernel of mlmfast for NVIDIA targets without a GPU, and report registers / spills / smem.

    python -m mlmfast.kernels.compile_check --arch 90 80            # the default sweep
    python -m mlmfast.kernels.compile_check --arch 90 --head-dims 64 128 --dtypes bfloat16 --all-variants

For each kernel x head dim x dtype x arch (and constexpr variant: plain, or key mask + dropout; every
combination with --all-variants) it runs `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
with the launch configuration the host launcher would pick (`kernel_config`), then `ptxas -v` on the PTX for
registers and spill bytes, and which matrix instruction the dots became (wgmma / mma / none). Prints a Markdown
table; exits 1 on a compile error, a register spill, more shared memory than the arch allows, or a 16-bit sm_90
kernel without wgmma. Works with triton 3.6 .. 3.9 (3.6 is the GPU machine's: run it under both).

TRITON_INTERPRET must not be set in this process (kernels would be interpreted objects, not compilable); if it
is, the script re-executes itself without it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

# Max dynamic shared memory per block (bytes): sm_80 163 KB, sm_86/89 99 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_DTYPE_NAME = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass
class Result:
    kernel: str
    head_dim: int
    dtype: str
    arch: int
    variant: str
    config: str
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None
    smem: Optional[int] = None
    mma: str = "-"  # the matrix instruction in the PTX: wgmma (Hopper), mma (sm_80 style), or none
    seconds: float = 0.0
    error: Optional[str] = None
    mma_rows: Optional[int] = None  # the M dimension of the kernel's products (dkdv: BLOCK_N; fwd, dq: BLOCK_M)

    def needs_wgmma(self) -> bool:
        """16-bit matrix kernels on sm_90 must use warpgroup MMA when their tile allows it (M >= 64, wgmma's
        height): the sm_80 instruction caps them far below Hopper's peak, and Triton falls back to it silently.
        A tile with M < 64 cannot use wgmma; such a config is in the table only where the H200 sweep timed it
        faster than every wgmma one (dK/dV at D = 128: 64x32 w4, 1.458 ms fwd+bwd vs 1.503 for the best wgmma
        tile, L = 512), so it passes."""
        return (self.arch >= 90 and self.dtype in ("fp16", "bf16") and self.kernel != "pre"
                and (self.mma_rows is None or self.mma_rows >= 64))

    def ok(self) -> bool:
        return (self.error is None and not self.spill_bytes
                and (self.smem or 0) <= SMEM_LIMIT.get(self.arch, min(SMEM_LIMIT.values()))
                and not (self.needs_wgmma() and self.mma != "wgmma"))


def _specs(head_dim: int, dtype_name: str, arch: int, variants: list[tuple[bool, bool]]):
    """Yield (kernel name, fn, signature, constexprs, options, variant label, config label)."""
    import torch

    from mlmfast.kernels import attention as A

    dtype = getattr(torch, dtype_name)
    t = "*" + _DTYPE_NAME[dtype_name]
    bd = A.block_d(head_dim)
    strides = lambda *names: {f"stride_{n}{s}": "i32" for n in names for s in "bhl"}  # noqa: E731

    def common(cfg):
        return A.launch_options(cfg, arch)

    for has_mask, dropout in variants:
        var = ("mask" if has_mask else "-") + "," + ("drop" if dropout else "-")
        flags = dict(HAS_MASK=has_mask, DROPOUT=dropout, DOT_PREC=A._dot_precision(dtype))
        cfg = A.kernel_config("fwd", head_dim, dtype, arch, has_mask, dropout)
        sig = {"Q": t, "K": t, "V": t, "O": t, "LSE": "*fp32", "BOUNDS": "*i32", "KMASK": "*i8", "SEED": "*i64",
               **strides("q", "k", "v", "o"), "H": "i32", "L": "i32", "sm_scale": "fp32", "drop_scale": "fp32",
               "p_thresh": "i32"}
        cx = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags)
        yield "fwd", A._attn_fwd_kernel, sig, cx, common(cfg), var, cfg
        for kind, fn, outs in (("dkdv", A._attn_bwd_dkdv_kernel, ("DK", "DV")), ("dq", A._attn_bwd_dq_kernel, ("DQ",))):
            cfg = A.kernel_config(kind, head_dim, dtype, arch, has_mask, dropout)
            sig = {"Q": t, "K": t, "V": t, "DO": t, **{o: t for o in outs}, "LSE": "*fp32", "DELTA": "*fp32",
                   "BOUNDS": "*i32", "KMASK": "*i8", "SEED": "*i64",
                   **strides("q", "k", "v", "do", *[o.lower() for o in outs]),
                   "H": "i32", "L": "i32", "sm_scale": "fp32", "drop_scale": "fp32", "p_thresh": "i32"}
            cx = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags)
            yield kind, fn, sig, cx, common(cfg), var, cfg
    cfg = A.kernel_config("pre", head_dim, dtype, arch)
    sig = {"O": t, "DO": t, "DELTA": "*fp32", **strides("o", "do"), "H": "i32", "L": "i32"}
    yield "pre", A._attn_bwd_preprocess_kernel, sig, dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=cfg.block_m), \
        common(cfg), "-", cfg


def _ones_specs(arch: int):
    """The attention kernels as the JIT compiles them when H, L and p_thresh equal 1: Triton specialises integer
    arguments equal to 1 into constexprs (bf16, D=64, mask + dropout)."""
    for kind, fn, sig, cx, opts, var, cfg in _specs(64, "bfloat16", arch, [(True, True)]):
        sig = {k: v for k, v in sig.items() if k not in ("H", "L", "p_thresh")}
        cx = dict(cx, **{k: 1 for k in ("H", "L", "p_thresh") if k in fn.arg_names})
        yield kind, fn, sig, cx, opts, var + ",ones", cfg


def _dropout_mask_spec():
    from mlmfast.kernels import attention as A

    sig = {"KEEP": "*i8", "SEED": "*i64", "H": "i32", "L": "i32", "p_thresh": "i32"}
    return "dropout_mask", A._dropout_mask_kernel, sig, dict(BLOCK_M=32, BLOCK_N=32), dict(num_warps=4), "-", None


def _linear_ce_specs(dtype_name: str, arch: int):
    """The fused linear + cross-entropy kernels (kernels/linear_ce.py) with their launch configurations; the
    heavier variant of each (bias, dW accumulation). D is not a parameter of these kernels (reported as '-')."""
    import types

    import torch

    from mlmfast.kernels import linear_ce as C

    dtype = getattr(torch, dtype_name)
    t = "*" + _DTYPE_NAME[dtype_name]
    prec = C._dot_precision(dtype)
    i32 = "i32"

    def label(cfg):  # the table's config column reads block_m / block_n
        return types.SimpleNamespace(block_m=cfg.block_a, block_n=cfg.block_b, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages)

    def opts(cfg):
        return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = C.kernel_config("fwd", dtype, arch)
    sig = {"X": t, "W": t, "BIAS": t, "LABELS": "*i64", "NACT": "*i64", "M_OUT": "*fp32", "S_OUT": "*fp32",
           "T_OUT": "*fp32", "stride_xn": i32, "stride_wv": i32, "N": i32, "V": i32, "H": i32, "V_PER_SPLIT": i32,
           "IGNORE": i32}
    cx = dict(BLOCK_M=cfg.block_a, BLOCK_V=cfg.block_b, BLOCK_K=cfg.block_k, HAS_BIAS=True, DOT_PREC=prec)
    yield "lce_fwd", C._lce_fwd_kernel, sig, cx, opts(cfg), "bias", label(cfg)
    cfg = C.kernel_config("dlogits", dtype, arch)
    sig = {"X": t, "W": t, "BIAS": t, "LABELS": "*i64", "NACT": "*i64", "LSE": "*fp32", "SCALE": "*fp32", "DLOG": t,
           "DB_PART": "*fp32", "stride_xn": i32, "stride_wv": i32, "stride_dn": i32, "row0": i32, "C": i32, "N": i32, "V": i32, "H": i32,
           "IGNORE": i32}
    cx = dict(BLOCK_M=cfg.block_a, BLOCK_V=cfg.block_b, BLOCK_K=cfg.block_k, HAS_BIAS=True, DOT_PREC=prec)
    yield "lce_dlogits", C._lce_bwd_dlogits_kernel, sig, cx, opts(cfg), "bias", label(cfg)
    cfg = C.kernel_config("dx", dtype, arch)
    sig = {"DLOG": t, "W": t, "DX": t, "NACT": "*i64", "stride_dn": i32, "stride_wv": i32, "stride_dxn": i32,
           "row0": i32, "C": i32, "N": i32, "V": i32, "H": i32}
    cx = dict(BLOCK_M=cfg.block_a, BLOCK_H=cfg.block_b, BLOCK_V=cfg.block_k, DOT_PREC=prec)
    yield "lce_dx", C._lce_bwd_dx_kernel, sig, cx, opts(cfg), "-", label(cfg)
    cfg = C.kernel_config("dw", dtype, arch)
    sig = {"DLOG": t, "X": t, "DW": "*fp32", "NACT": "*i64", "stride_dn": i32, "stride_xn": i32,
           "row0": i32, "C": i32, "N": i32, "V": i32, "H": i32}
    cx = dict(ACCUMULATE=True, BLOCK_V=cfg.block_a, BLOCK_H=cfg.block_b, BLOCK_M=cfg.block_k, DOT_PREC=prec)
    yield "lce_dw", C._lce_bwd_dw_kernel, sig, cx, opts(cfg), "acc", label(cfg)


def _ptxas_candidates(arch: int) -> list[str]:
    """ptxas binaries to try, the one triton itself uses for `arch` first (triton 3.9 pairs sm_90 with a newer
    ptxas than sm_80; triton 3.6 has one)."""
    paths = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        paths.append(get_ptxas(arch).path)
    except Exception:
        pass
    try:
        import triton.knobs

        paths += [triton.knobs.nvidia.ptxas.path, getattr(triton.knobs.nvidia, "ptxas_blackwell").path]
    except Exception:
        pass
    if shutil.which("ptxas"):
        paths.append(shutil.which("ptxas"))
    return list(dict.fromkeys(p for p in paths if p and os.path.exists(p)))


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) of the one kernel in `ptx`, from `ptxas -v`."""
    target = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    errors = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates(arch):
            proc = subprocess.run([ptxas, "-v", f"--gpu-name={target}", src, "-o", os.path.join(d, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                log = proc.stderr + proc.stdout
                regs = int(re.search(r"Used (\d+) registers", log).group(1))
                spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
                return regs, spills
            errors.append(f"{ptxas}: {proc.stderr.strip()[-500:]}")
    raise RuntimeError("ptxas failed: " + " | ".join(errors) if errors else "no ptxas found")


def _compile(fn, signature: dict, constexprs: dict, options: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    sig = {name: sig[name] for name in fn.arg_names}  # argument order
    # Pointers and strides divisible by 16, as in typical launches (aligned allocations, D % 16 == 0).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name.startswith("stride_")}
    target = GPUTarget("cuda", arch, 32)
    try:
        src = ASTSource(fn, sig, constexprs, attrs)
    except TypeError:  # a triton without attrs in ASTSource
        src = ASTSource(fn, sig, constexprs)
    return triton.compile(src, target=target, options=options)


def run(archs: list[int], head_dims: list[int], dtypes: list[str], all_variants: bool,
        jobs_n: int = 1) -> list[Result]:
    variants = [(False, False), (True, True)] if not all_variants else \
        [(False, False), (True, False), (False, True), (True, True)]
    jobs = []
    for arch in archs:
        for dtype_name in dtypes:
            for hd in head_dims:
                for spec in _specs(hd, dtype_name, arch, variants):
                    jobs.append((arch, dtype_name, hd, spec))
        jobs.append((arch, "-", 0, _dropout_mask_spec()))
        jobs += [(arch, "bfloat16", 64, spec) for spec in _ones_specs(arch)]  # ints == 1 specialised
        jobs += [(arch, dt, 0, spec) for dt in dtypes for spec in _linear_ce_specs(dt, arch)]  # linear-CE (issue 5)
    global _JOBS
    _JOBS = jobs
    results = []
    if jobs_n <= 1:
        for i in range(len(jobs)):
            results.append(_run_job(i))
            print(_row(results[-1]), flush=True)
        return results
    import concurrent.futures
    import multiprocessing

    # fork: the workers inherit _JOBS (kernels are not picklable); only indices and Results cross processes
    with concurrent.futures.ProcessPoolExecutor(jobs_n, mp_context=multiprocessing.get_context("fork")) as pool:
        for r in pool.map(_run_job, range(len(jobs))):
            results.append(r)
            print(_row(r), flush=True)
    return results


_JOBS: list = []


def _run_job(i: int) -> Result:
    arch, dtype_name, hd, (kind, fn, sig, cx, opts, var, cfg) = _JOBS[i]
    cfg_label = "-" if cfg is None else f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
    r = Result(kind, hd, _DTYPE_NAME.get(dtype_name, dtype_name), arch, var, cfg_label)
    if cfg is not None and kind in ("fwd", "dq", "dkdv"):
        r.mma_rows = cfg.block_n if kind == "dkdv" else cfg.block_m
    t0 = time.perf_counter()
    try:
        compiled = _compile(fn, sig, cx, opts, arch)
        r.smem = int(compiled.metadata.shared)
        r.regs, r.spill_bytes = _ptxas_usage(compiled.asm["ptx"], arch)
        r.mma = _mma_kind(compiled.asm["ptx"])
    except Exception as exc:  # report every failure, keep going
        r.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    r.seconds = time.perf_counter() - t0
    return r


def _mma_kind(ptx: str) -> str:
    """Which tensor-core instruction the kernel's dots became: 'wgmma' (sm_90 warpgroup MMA, what Hopper needs
    for full speed), 'mma' (the sm_80 warp-level instruction), or 'none' (FMA loops)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


_HEADER = ("| kernel | D | dtype | sm | variant | config | regs | spill B | smem B | mma | s | status |\n"
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def _row(r: Result) -> str:
    status = "ok" if r.ok() else ("ERROR " + r.error if r.error else
                                  "SPILL" if r.spill_bytes else
                                  "NO WGMMA" if r.needs_wgmma() and r.mma != "wgmma" else "SMEM > limit")
    return (f"| {r.kernel} | {r.head_dim or '-'} | {r.dtype} | {r.arch} | {r.variant} | {r.config} | "
            f"{r.regs if r.regs is not None else '-'} | {r.spill_bytes if r.spill_bytes is not None else '-'} | "
            f"{r.smem if r.smem is not None else '-'} | {r.mma} | {r.seconds:.1f} | {status} |")


def rerun_without_interpreter(cmd: list[str]) -> Optional[int]:
    """With TRITON_INTERPRET on in this process (kernels would be interpreter objects, not compilable), run `cmd`
    without it and return its exit code; otherwise None (go on here)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call(cmd, env=env)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rc = rerun_without_interpreter([sys.executable, "-m", "mlmfast.kernels.compile_check", *argv])
    if rc is not None:
        return rc
    from mlmfast.kernels.attention import SUPPORTED_HEAD_DIMS

    ap = argparse.ArgumentParser(prog="python -m mlmfast.kernels.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = sm_90a)")
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(SUPPORTED_HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"], choices=list(_DTYPE_NAME))
    ap.add_argument("--all-variants", action="store_true", help="every HAS_MASK x DROPOUT combination")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}; ptxas: {', '.join(_ptxas_candidates(max(args.arch)))}")
    print(_HEADER, flush=True)
    t0 = time.perf_counter()
    results = run(args.arch, args.head_dims, args.dtypes, args.all_variants, args.jobs)
    bad = [r for r in results if not r.ok()]
    print(f"\n{len(results)} kernels in {time.perf_counter() - t0:.0f} s")
    if bad:
        print("\n" + _HEADER)
        for r in bad:
            print(_row(r))
        print(f"\nFAILED: {len(bad)} of {len(results)} kernels (compile error, spill, shared memory over limit, or a "
              "16-bit sm_90 kernel without wgmma)")
        return 1
    print(f"\nOK: {len(results)} kernels compiled without spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
