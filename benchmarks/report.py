"""Benchmark results as JSON, Markdown tables and a PNG plot.

    python -m benchmarks.report RESULTS.json            # print the Markdown tables again
    python -m benchmarks.report RESULTS.json --short    # the short training table (what gpu_check.sh prints last)
    python -m benchmarks.report RESULTS.json --png OUT.png
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from mlmfast._io import atomic_savefig, atomic_write_text

OP_BASELINES = {"masking": "hf-collator", "gather": "index (torch)", "attention": "sdpa", "linear-CE": "hf-full-logits"}
TRAIN_BASELINES = [("hf-eager", "× hf-eager"), ("hf-sdpa", "× hf-sdpa"), ("hf-sdpa-compile", "× hf-compile"),
                   ("mlmfast-reference", "× reference")]


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    atomic_write_text(path, json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def _f(x: Optional[float], fmt: str, none: str = "n/a") -> str:
    return none if x is None else format(x, fmt)


def _ms(r: dict) -> str:
    if r["ms"] >= 100:
        return f"{r['ms']:.0f} [{r['p20_ms']:.0f}, {r['p80_ms']:.0f}]"
    if r["ms"] >= 1:
        return f"{r['ms']:.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]"
    return f"{r['ms']:.4f} [{r['p20_ms']:.4f}, {r['p80_ms']:.4f}]"


def _not_ok(r: dict, width: int = 0) -> str:
    s = f"{r['status']}: {r.get('reason', '')}".replace("|", "/")
    return s if not width or len(s) <= width else s[:width - 1] + "…"


def _head_rows(cols: list[str], n_text: int) -> list[str]:
    """Markdown header and alignment rows: the first n_text columns left-aligned, the numbers right-aligned."""
    align = ["---" if i < n_text else "---:" for i in range(len(cols))]
    return ["| " + " | ".join(cols) + " |", "| " + " | ".join(align) + " |"]


def _dist(r: dict) -> str:
    return r["dist"] if r.get("fill") is None else f"{r['dist']} ({r['fill']:.2f})"


def header(meta: dict) -> str:
    e = meta["env"]
    peak = meta.get("peak_tflops")
    peak_s = f"peak {peak:g} TFLOP/s bf16 ({meta.get('peak_source')})" if peak else "MFU n/a (no GPU peak)"
    dev = e["device"] + (f", {e.get('gpu_memory_gib')} GiB, {e.get('capability')}" if e["device_type"] == "cuda"
                         else f", {e['cpu_cores']} cores, {e['torch_threads']} torch threads "
                              f"({e.get('threads_choice', '?')}), load average {e.get('load_avg_1m')} at the start")
    return (f"**{dev}** — {e['date'][:10]}; torch {e['torch']}, transformers {e['transformers']}, triton "
            f"{e['triton']}, mlmfast {e['mlmfast']} @ {e['git_commit']}; {peak_s}; text: {meta.get('text')}")


def train_table(rows: list[dict], short: bool = False) -> str:
    rows = [r for r in rows if r.get("suite") == "train"]
    if not rows:
        return ""
    if short:
        cols = ["model", "L", "B", "rows", "path", "ms", "tok/s", "MFU", "peak MiB", "× hf-eager", "× hf-sdpa",
                "× hf-compile", "mem ÷ hf-eager"]
    else:
        cols = ["model", "L", "B", "rows (fill)", "path", "median ms [p20, p80]", "non-pad tok/s", "TFLOP/s", "MFU",
                "peak MiB"] + [c for _, c in TRAIN_BASELINES] + ["mem ÷ hf-eager"]
    out = _head_rows(cols, 5)
    for r in rows:
        dist = r["dist"] if short else _dist(r)
        lead = [r["model"], str(r["L"]), str(r["B"]), dist, r["path"]]
        if r["status"] != "ok":
            out.append("| " + " | ".join(lead + [_not_ok(r, 72 if short else 0)] + [""] * (len(cols) - 6)) + " |")
            continue
        sp = r.get("speedup", {})
        mem = _f(r.get("peak_mem_mib"), ",.0f")
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        if short:
            vals = [f"{r['ms']:.1f}", f"{r['tokens_per_s']:,.0f}", mfu, mem] + \
                   [_f(sp.get(b), ".2f", "-") for b in ("hf-eager", "hf-sdpa", "hf-sdpa-compile")] + \
                   [_f(r.get("mem_vs_hf_eager"), ".2f", "-")]
        else:
            vals = [_ms(r), f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.2f}", mfu, mem] + \
                   [_f(sp.get(b), ".2f", "-") for b, _ in TRAIN_BASELINES] + [_f(r.get("mem_vs_hf_eager"), ".2f", "-")]
        out.append("| " + " | ".join(lead + vals) + " |")
    return "\n".join(out)


def op_baseline(rows: list[dict], key: tuple) -> Optional[str]:
    """The impl an op's speedups are quoted against: OP_BASELINES[op] when it ran, else the first that ran."""
    ok = [r["impl"] for r in rows if r.get("suite") == "ops" and r["status"] == "ok"
          and (r["op"], r["model"], r["L"], r["B"], r["dist"]) == key]
    want = OP_BASELINES.get(key[0])
    return want if want in ok else (ok[0] if ok else None)


def ops_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("suite") == "ops"]
    if not rows:
        return ""
    cols = ["op", "model", "L", "B", "rows (fill)", "impl", "median ms [p20, p80]", "rate", "peak MiB",
            "× baseline"]
    out = _head_rows(cols, 6)
    for r in rows:
        key = (r["op"], r["model"], r["L"], r["B"], r["dist"])
        lead = [r["op"], r["model"], str(r["L"]), str(r["B"]), _dist(r), r["impl"]]
        if r["status"] != "ok":
            out.append("| " + " | ".join(lead + [_not_ok(r), "", "", ""]) + " |")
            continue
        base = op_baseline(rows, key)
        if "tokens_per_s" in r:
            rate = f"{r['tokens_per_s'] / 1e6:,.2f} M tok/s"
        elif "gb_per_s" in r:
            rate = f"{r['gb_per_s']:,.1f} GB/s"
        elif "tflops" in r:
            rate = f"{r['tflops']:,.2f} TFLOP/s"
        else:
            rate = ""
        if r.get("note"):
            rate += f" ({r['note']})"
        sp = "1.00 (baseline)" if base == r["impl"] else _f(r.get("speedup", {}).get(base), ".2f", "-")
        out.append("| " + " | ".join(lead + [_ms(r), rate, _f(r.get("peak_mem_mib"), ",.1f"), sp]) + " |")
    return "\n".join(out)


def markdown(meta: dict, rows: list[dict]) -> str:
    parts = [f"## mlmfast benchmarks: {meta['env']['device']} ({meta['env']['date'][:10]})", "", header(meta), ""]
    t = ops_table(rows)
    if t:
        parts += ["### Ops (forward + backward where there is one)", "", t, ""]
    t = train_table(rows)
    if t:
        parts += ["### Training step (forward + backward + AdamW)", "", t, ""]
        builds = [f"{r['path']} {r['model']} L={r['L']} B={r['B']}: {r['compile_s']:.0f} s" for r in rows
                  if r.get("suite") == "train" and r.get("compile_s") is not None]
        if builds:
            parts += ["torch.compile build + first step (not in the timings): " + "; ".join(builds) + ".", ""]
    if meta.get("conventions"):
        parts += ["Conventions: " + " ".join(meta["conventions"]), ""]
    return "\n".join(parts)


def plot(meta: dict, rows: list[dict], path: str) -> Optional[str]:
    """Top: speedup over the first baseline measured (hf-eager, else hf-sdpa, else mlmfast-reference) and peak
    memory, per training config. Below: each op's speedup over its first implementation, per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("suite") == "train" and r["status"] == "ok"]
    ops = [r for r in rows if r.get("suite") == "ops" and r["status"] == "ok"]
    if not train and not ops:
        return None
    op_h = 0.8 + 0.17 * len(ops)
    heights = ([4.2] if train else []) + ([op_h] if ops else [])
    fig = plt.figure(figsize=(13, sum(heights) + 0.6))
    gs = fig.add_gridspec(len(heights), 2, height_ratios=heights)
    if train:
        configs = list(dict.fromkeys((r["model"], r["L"], r["B"], r["dist"]) for r in train))
        paths = list(dict.fromkeys(r["path"] for r in train))
        by = {(r["model"], r["L"], r["B"], r["dist"], r["path"]): r for r in train}
        width = 0.8 / max(1, len(paths))
        ax_s, ax_m = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])
        base_name = None
        for k, p in enumerate(paths):
            xs, sp, mem, lo, hi = [], [], [], [], []
            for i, c in enumerate(configs):
                r = by.get((*c, p))
                if r is None:
                    continue
                base = next((b for b in ("hf-eager", "hf-sdpa", "mlmfast-reference") if b in r.get("speedup", {})),
                            None)
                base_name = base_name or base
                xs.append(i + (k - (len(paths) - 1) / 2) * width)
                v = r["speedup"][base] if base else float("nan")
                sp.append(v)
                # whisker: the baseline's median over this path's p80 .. p20 (this path's spread only)
                lo.append(max(0.0, v - v * r["ms"] / r["p80_ms"]) if base else 0.0)
                hi.append(max(0.0, v * r["ms"] / r["p20_ms"] - v) if base else 0.0)
                mem.append(r.get("peak_mem_mib") or float("nan"))
            ax_s.bar(xs, sp, width, label=p, yerr=[lo, hi], capsize=2, error_kw={"lw": 0.8})
            ax_m.bar(xs, mem, width, label=p)
        ax_s.axhline(1.0, color="k", lw=0.8)
        ax_s.set_ylabel(f"speedup over {base_name or 'baseline'}")
        ax_s.set_title("training step: speedup (median step time; whiskers: p20-p80)")
        ax_m.set_ylabel("peak memory (MiB)")
        ax_m.set_title("training step: peak memory added")
        for ax in (ax_s, ax_m):
            ax.set_xticks(range(len(configs)))
            ax.set_xticklabels([f"{m}\nL={L} B={B}\n{d}" for m, L, B, d in configs], fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        ax_s.legend(fontsize=7)
    if ops:
        ax = fig.add_subplot(gs[-1, :])
        groups = list(dict.fromkeys((r["op"], r["model"], r["L"], r["B"], r["dist"]) for r in ops))
        ticks, vals, names, colors = [], [], [], []
        pos = 0.0
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for g in groups:
            rs = [r for r in ops if (r["op"], r["model"], r["L"], r["B"], r["dist"]) == g]
            base = next(r for r in rs if r["impl"] == op_baseline(ops, g))
            for j, r in enumerate(rs):
                vals.append(base["ms"] / r["ms"])
                ticks.append(pos)
                names.append(f"{g[0]} {g[1]} L={g[2]} B={g[3]} {g[4]}: {r['impl']}")
                colors.append(palette[j % len(palette)])
                pos += 1
            pos += 0.6
        ax.barh(ticks, vals, color=colors)
        ax.set_yticks(ticks)
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("speedup over the op's baseline: " + ", ".join(f"{k}: {v}" for k, v in OP_BASELINES.items())
                      + " (median time; log scale)", fontsize=8)
        ax.set_title("ops (forward + backward where there is one)")
        ax.grid(axis="x", alpha=0.3)
    e = meta["env"]
    fig.suptitle(f"mlmfast benchmarks: {e['device']}, {e['date'][:10]}, torch {e['torch']}, commit {e['git_commit']}",
                 fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="print or plot a benchmark result file")
    ap.add_argument("json")
    ap.add_argument("--short", action="store_true", help="only the short training table")
    ap.add_argument("--png", help="write the plot here")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        d: dict[str, Any] = json.load(f)
    if args.png:
        print(plot(d["meta"], d["rows"], args.png) or "nothing to plot")
    elif args.short:
        t = train_table(d["rows"], short=True) or ops_table(d["rows"])
        print(header(d["meta"]) + "\n\n" + t)
    else:
        print(markdown(d["meta"], d["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
