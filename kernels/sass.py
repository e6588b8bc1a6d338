"""Instruction mix of the attention kernels' inner loops, from their sm_90 SASS, without a GPU.

    python -m mlmfast.kernels.sass                       # D=64 bf16: fwd / dq / dkdv, with and without dropout
    python -m mlmfast.kernels.sass --head-dim 128 --dtype float16 --arch 80 --json mix.json
    python -m mlmfast.kernels.sass --config dkdv=64,128,8,3     # another launch config, compared statically

Each kernel is compiled as `compile_check` does (the launch configuration the host would pick), its cubin is
disassembled with Triton's `nvdisasm`, and the loops are found as backward branches. For the key (or query)
loop without masking -- the one full blocks run -- it counts the instructions one warp issues per iteration by
class: `int` (IMAD, LOP3, ISETP, PRMT, SEL, ...: the pipe Philox and index arithmetic use, half the FP32 rate on
Hopper), `fp`, `mufu` (exp2), `mem` (shared / global loads and stores: a layout conversion through shared memory
shows up here), `mma` (HGMMA / HMMA and their fences), `uniform`, `other`. Per tile element that is
`warps * count / (BLOCK_M * BLOCK_N)`.

A rough bound per element (SM clocks, one class at a time, `--arch 90` / `80`): the tensor-core time
(2 * D flops per element per GEMM: fwd 2 GEMMs, dq 3, dkdv 4; dense 16-bit flops per SM per clock: 4096 on
H100/H200, 2048 on A100) next to each pipe's issue time (32 lanes per warp instruction over the pipe's lanes per
SM per clock: int 64, fp32 128 on sm_90 and 64 on sm_80, mufu 16). Whichever is largest bounds the loop if
nothing else does; latency and occupancy are not modelled.

What it is for: the dropout variant's cost is integer work (Philox) the tensor cores do not hide, so comparing
its loop with the plain one says how much dropout adds, before a GPU measures it. A static count, not a timing:
it says nothing about latency, occupancy or memory stalls.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

_CLASSES = {
    "int": {"IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "IMNMX", "VIMNMX", "LEA", "PRMT",
            "SEL", "IABS", "BMSK", "SGXT", "POPC", "FLO", "BREV", "IDP", "VIADD", "VABSDIFF4", "I2FP", "F2I"},
    "fp": {"FMUL", "FADD", "FFMA", "FSEL", "FMNMX", "FSETP", "F2FP", "FCHK", "HADD2", "HMUL2", "HFMA2", "FSWZADD",
           "F2F", "FRND"},
    "mufu": {"MUFU"},
    "mem": {"LDG", "LDS", "STS", "STG", "LDSM", "STSM", "LDGSTS", "LDGDEPBAR", "DEPBAR", "SYNCS", "UTMALDG", "LD",
            "ST", "ATOMS", "LDC"},
    "mma": {"HGMMA", "HMMA", "WARPGROUP", "WGMMA"},
}


def classify(opcode: str) -> str:
    base = opcode.split(".")[0]
    for name, ops in _CLASSES.items():
        if base in ops:
            return name
    return "uniform" if base.startswith("U") else "other"  # U*: the uniform datapath (one value per warp)


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def disassemble(cubin: bytes) -> list[tuple[int, str, list[str]]]:
    """[(address, instruction, labels placed right before it)] from Triton's bundled nvdisasm."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    ins, pending = [], []
    for line in out.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip(), pending))
            pending = []
    return ins


def loops(ins: list[tuple[int, str, list[str]]]) -> list[list[str]]:
    """The bodies (instruction texts) of the loops: from a label to a branch back to it."""
    where = {label: i for i, (_, _, labels) in enumerate(ins) for label in labels}
    bodies = []
    for i, (_, text, _) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
        if m and where.get(m.group(1), i + 1) < i:
            body = [t for _, t, _ in ins[where[m.group(1)]: i + 1]]
            if len(body) > 1:  # not the `BRA self` trap after EXIT
                bodies.append(body)
    return bodies


def mix(body: list[str]) -> dict[str, int]:
    c = collections.Counter(classify(_opcode(t)) for t in body)
    return {k: c.get(k, 0) for k in ("int", "fp", "mufu", "mem", "mma", "uniform", "other")}


@dataclass
class LoopMix:
    kernel: str
    variant: str
    config: str
    warps: int
    tile: int  # BLOCK_M * BLOCK_N elements per iteration
    instructions: int  # per warp per iteration
    classes: dict = field(default_factory=dict)

    def per_element(self, cls: Optional[str] = None) -> float:
        n = self.instructions if cls is None else self.classes[cls]
        return self.warps * n / self.tile


_GEMMS = {"fwd": 2, "dq": 3, "dkdv": 4}
# per SM per clock: dense 16-bit tensor-core flops, and lanes of the int / fp32 / mufu pipes (nominal figures)
_RATES = {90: {"tensor": 4096, "int": 64, "fp": 128, "mufu": 16}, 80: {"tensor": 2048, "int": 64, "fp": 64, "mufu": 16}}


def clocks_per_element(r: "LoopMix", head_dim: int, arch: int) -> dict[str, float]:
    """SM clocks per attention-matrix element: tensor cores, and the issue time of the int / fp / mufu pipes."""
    rate = _RATES[90 if arch >= 90 else 80]
    out = {"tensor": _GEMMS[r.kernel] * 2 * head_dim / rate["tensor"]}
    for cls in ("int", "fp", "mufu"):
        out[cls] = r.per_element(cls) * 32 / rate[cls]
    return out


def loop_mix(kind: str, head_dim: int, dtype_name: str, arch: int, has_mask: bool, dropout: bool,
             config: Optional[tuple[int, int, int, int]] = None) -> LoopMix:
    """The unmasked inner loop of attention kernel `kind` ("fwd", "dq", "dkdv") -- the smallest loop of the
    three the kernel has (partial first block, full blocks, partial last block). config (BLOCK_M, BLOCK_N,
    num_warps, num_stages) replaces the launch table's."""
    from . import attention as A
    from . import compile_check as C

    for k, fn, sig, cx, opts, var, cfg in C._specs(head_dim, dtype_name, arch, [(has_mask, dropout)]):
        if k != kind:
            continue
        if config is not None:
            cfg = A.KernelConfig(*config)
            cx, opts = dict(cx, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), A.launch_options(cfg, arch)
        compiled = C._compile(fn, sig, cx, opts, arch)
        bodies = loops(disassemble(compiled.asm["cubin"]))
        if not bodies:
            raise RuntimeError(f"no loop found in the SASS of {kind}")
        body = min(bodies, key=len)
        return LoopMix(kind, var, f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
                       cfg.num_warps, cfg.block_m * cfg.block_n, len(body), mix(body))
    raise ValueError(f"unknown kernel {kind!r}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .compile_check import rerun_without_interpreter

    rc = rerun_without_interpreter([sys.executable, "-m", "mlmfast.kernels.sass", *argv])
    if rc is not None:
        return rc
    ap = argparse.ArgumentParser(prog="python -m mlmfast.kernels.sass", description=__doc__.split("\n")[0])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--mask", action="store_true", help="the key-padding-mask variant")
    ap.add_argument("--config", action="append", default=[], metavar="KIND=BM,BN,W,S",
                    help="compile kernel KIND (fwd / dq / dkdv) with this launch config instead of the table's, "
                         "e.g. dkdv=64,128,8,3 (repeatable); multiples of 16")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    import triton

    rows = []
    print(f"triton {triton.__version__}, sm_{args.arch}, D={args.head_dim}, {args.dtype}: one warp's instructions "
          "per iteration of the unmasked inner loop")
    print("| kernel | variant | config | instr | int | fp | mufu | mem | mma | instr / element | int / element "
          "| SM clk / element: tensor, int, fp, mufu |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    configs = {}
    from .attention import parse_config

    for item in args.config:
        try:
            kind, cfg = parse_config(item)
        except ValueError as exc:
            ap.error(f"--config {exc}")
        configs[kind] = cfg
    for kind in ("fwd", "dq", "dkdv"):
        for dropout in (False, True):
            r = loop_mix(kind, args.head_dim, args.dtype, args.arch, args.mask, dropout, configs.get(kind))
            rows.append(r)
            c = r.classes
            clk = clocks_per_element(r, args.head_dim, args.arch)
            print(f"| {r.kernel} | {r.variant} | {r.config} | {r.instructions} | {c['int']} | {c['fp']} | "
                  f"{c['mufu']} | {c['mem']} | {c['mma']} | {r.per_element():.3f} | {r.per_element('int'):.3f} | "
                  + ", ".join(f"{clk[k]:.3f}" for k in ("tensor", "int", "fp", "mufu")) + " |", flush=True)
    total = {d: sum(r.per_element() for r in rows if ("drop" in r.variant) == d) for d in (False, True)}
    bound = {d: sum(max(clocks_per_element(r, args.head_dim, args.arch).values()) for r in rows
                    if ("drop" in r.variant) == d) for d in (False, True)}
    print(f"\nfwd + dq + dkdv, instructions per attention-matrix element: {total[False]:.2f} without dropout, "
          f"{total[True]:.2f} with dropout; the largest single bound per kernel, summed: {bound[False]:.3f} and "
          f"{bound[True]:.3f} SM clocks per element")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "head_dim": args.head_dim,
                       "dtype": args.dtype,
                       "rows": [dict(asdict(r), clocks_per_element=clocks_per_element(r, args.head_dim, args.arch))
                                for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
