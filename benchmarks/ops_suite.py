"""Op benchmarks at the shapes of a training step: masking, gather, attention, linear + cross-entropy.

Each op is timed per (model, L, B, dist) on the suite's batches (see inputs.py), forward + backward where the op has
one, with every implementation that can run here; an implementation that cannot is a "skipped" row with the
reason. Speedups are computed within the run against every other implementation of the same op and shape.

  masking    non-pad tokens/s. hf-collator: transformers' DataCollatorForLanguageModeling on the rows as Python
             lists (what an HF training loop runs, on the CPU, in its DataLoader workers; on a GPU run it is still
             timed on the CPU); reference: mlmfast.masking.mask_tokens(backend="reference") on the device;
             mask_select: mlmfast.ops.mask_select (CUDA kernel / C++ twin / PyTorch twin, as built).
  gather     hidden (B, L, H) -> rows (B*P, H) at the masked positions, forward + backward (scatter-add).
             index: torch advanced indexing hidden[b, positions] (its backward: index_put_ with accumulate);
             gather_rows: mlmfast.ops.gather_rows. GB/s = bytes of a forward (read + write B*P*H) and a backward
             (read B*P*H, write B*L*H), over the time.
  attention  q, k, v (B, heads, L, head_dim) of the model, key lengths = the batch's row lengths, forward +
             backward; providers of bench_attention.py (mlmfast = the Triton kernel, GPU only; sdpa with a
             boolean mask; eager = mlmfast.attention.attention_reference; flash-attn when installed).
             TFLOP/s counts non-pad work only, as bench_attention.py: 3.5 * 4 * heads * head_dim * sum_b len_b^2.
  linear-CE  decoder (V x H, + bias) + mean cross-entropy, forward + backward, on the head-transform output.
             hf-full-logits: every one of the B*L rows, labels -100 off the masked positions (what HF computes);
             sparse: only the B*P gathered rows, fp32 CE (the reference sparse head);
             linear_ce: mlmfast.linear_ce.linear_cross_entropy (issue 5) on the same B*P rows (Triton kernel on
             CUDA, its chunked PyTorch twin on CPU).
Precision: bf16 tensors on CUDA, fp32 on CPU. Timing: see harness.py. Peak memory (what the calls add to the live
inputs): CUDA only. On a CPU, an op's tensors are tens of MiB and the process's peak RSS around them moves by as
much with glibc's heap state (measured: the same sparse linear-CE 90-121 MiB over repeats, for ~40 MiB of
tensors), so it is not reported.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

from .harness import DeviceLost, PeakMemory, device_lost, median_rate, spread, time_calls


def _error_reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:200] if msg else ''}"


def time_adaptive(fn: Callable[[int], Any], device, *, warmup: int, min_calls: int, max_calls: int,
                  target_s: float) -> list[float]:
    """Warm up, then time as many calls as fit in about target_s (between min_calls and max_calls)."""
    warm, _ = time_calls(fn, warmup, 0, device)
    per_call = max(min(warm) if warm else 1e-3, 1e-6)
    n = int(max(min_calls, min(max_calls, target_s / per_call)))
    return time_calls(fn, 0, n, device)[1]


class OpRunner:
    """Times implementations of one op at one shape and turns them into rows."""

    def __init__(self, device: torch.device, base: dict, *, min_calls: int, max_calls: int, target_s: float,
                 log: Callable[[str], None], on_row: Callable[[dict], None]):
        self.device, self.base, self.log, self.on_row = device, base, log, on_row
        self.kw = dict(min_calls=min_calls, max_calls=max_calls, target_s=target_s)
        self.rows: list[dict] = []

    def skip(self, op: str, impl: str, reason: str, status: str = "skipped") -> None:
        r = dict(self.base, op=op, impl=impl, status=status, reason=reason)
        self.rows.append(r)
        self.on_row(r)
        self.log(f"ops   {self._head(r)} {status}: {reason}")

    def time(self, op: str, impl: str, fn: Callable[[int], Any], *, device=None, tokens: Optional[list[int]] = None,
             bytes_per_call: Optional[float] = None, flop_per_call: Optional[float] = None, note: str = "") -> None:
        dev = torch.device(device or self.device)
        mem = PeakMemory(dev) if dev.type == "cuda" else None  # see the module docstring
        try:
            if mem:
                mem.start()
            seconds = time_adaptive(fn, dev, warmup=2, **self.kw)
            peak = mem.peak_bytes() if mem else None
        except Exception as exc:
            lost = device_lost(dev)
            if dev.type == "cuda" and lost is None:
                torch.cuda.empty_cache()
            self.skip(op, impl, _error_reason(exc), status="error")
            if lost is not None:
                raise DeviceLost(f"CUDA context lost in ops {op} {impl}: {lost}") from exc
            return
        r = dict(self.base, op=op, impl=impl, status="ok", run_on=dev.type, calls=len(seconds), **spread(seconds),
                 peak_mem_mib=None if peak is None else peak / 2**20,
                 mem_method=mem.method if mem else "n/a on CPU (RSS at these sizes is allocator noise)")
        if note:
            r["note"] = note
        if tokens:
            r["tokens_per_s"] = median_rate(tokens, seconds)
        if bytes_per_call:
            r["gb_per_s"] = median_rate([bytes_per_call / 1e9], seconds)
        if flop_per_call:
            r["tflops"] = median_rate([flop_per_call / 1e12], seconds)
        self.rows.append(r)
        self.on_row(r)
        extra = "".join(f"  {k} {r[k]:,.3g}" for k in ("tokens_per_s", "gb_per_s", "tflops") if k in r)
        self.log(f"ops   {self._head(r)} {r['ms']:9.3f} ms [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]{extra}")

    @staticmethod
    def _head(r: dict) -> str:
        return f"{r['op']:9s} {r['model']} L={r['L']} B={r['B']} {r['dist']:4s} {r['impl']:22s}"


# ---- the four ops ----------------------------------------------------------------------------------------------
def bench_masking(run: OpRunner, bt, text) -> None:
    from mlmfast import ops
    from mlmfast.masking import mask_tokens

    n = len(bt)
    kw = bt.mask_kwargs
    try:
        from transformers import DataCollatorForLanguageModeling

        from .inputs import hf_tokenizer

        collator = DataCollatorForLanguageModeling(hf_tokenizer(text.tokenizer), mlm=True, mlm_probability=0.15,
                                                   return_tensors="pt")
        examples = [[{"input_ids": ids.tolist(), "attention_mask": am.tolist()}
                     for ids, am in zip(bt.input_ids[j].cpu(), bt.attention_mask[j].cpu())] for j in range(n)]
        run.time("masking", "hf-collator", lambda i: collator(examples[i % n]), device="cpu", tokens=bt.tokens,
                 note="on CPU")
    except ImportError:
        run.skip("masking", "hf-collator", "transformers is not installed")
    run.time("masking", "reference", lambda i: mask_tokens(
        bt.input_ids[i % n], kw["mask_token_id"], kw["vocab_size"], special_token_ids=kw["special_token_ids"],
        attention_mask=bt.attention_mask[i % n], seed=i, backend="reference"), tokens=bt.tokens)
    backend = ops.mask_select_backend(run.device)
    run.time("masking", f"mask_select ({backend})", lambda i: ops.mask_select(
        bt.input_ids[i % n], attention_mask=bt.attention_mask[i % n], seed=0, offset=i, **kw), tokens=bt.tokens)


def bench_gather(run: OpRunner, bt, cfg, dtype: torch.dtype) -> None:
    from mlmfast import ops

    B, L, H = bt.B, bt.L, cfg.hidden_size
    hidden = torch.randn(B, L, H, device=run.device, dtype=dtype, requires_grad=True)
    positions = [m.positions for m in bt.masked]
    P = positions[0].shape[1]
    grad = torch.randn(B * P, H, device=run.device, dtype=dtype)
    rows = torch.arange(B, device=run.device)[:, None]
    n = len(bt)
    nbytes = (3 * B * P * H + B * L * H) * hidden.element_size()

    def index(i):
        hidden.grad = None
        hidden[rows, positions[i % n]].reshape(B * P, H).backward(grad)

    def gather(i):
        hidden.grad = None
        ops.gather_rows(hidden, positions[i % n]).backward(grad)

    run.time("gather", "index (torch)", index, bytes_per_call=nbytes)
    run.time("gather", f"gather_rows ({ops.gather_backend(run.device, dtype)})", gather, bytes_per_call=nbytes)


def bench_attention(run: OpRunner, bt, cfg, dtype: torch.dtype) -> None:
    from .bench_attention import _flops_fwd, _providers

    B, L = bt.B, bt.L
    nh, D = cfg.num_attention_heads, cfg.head_dim
    lens = bt.attention_mask[0].sum(1)  # (B,) batch 0's row lengths
    lens_list = [int(x) for x in lens.tolist()]
    keep = torch.arange(L, device=run.device)[None, :] < lens[:, None]  # (B, L) bool
    q, k, v = (torch.randn(B, nh, L, D, device=run.device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(B, nh, L, D, device=run.device, dtype=dtype)
    flop = 3.5 * _flops_fwd(nh, D, lens_list)
    provs = _providers(True, run.device.type)
    if "mlmfast" not in provs:
        run.skip("attention", "mlmfast (Triton)", "the Triton kernel needs a CUDA GPU (its CPU interpreter is for "
                 "tests, not timings)")
    for name, f in provs.items():
        def fn(i, f=f):
            for t in (q, k, v):
                t.grad = None
            f(q, k, v, lens, keep).backward(do)
        run.time("attention", name, fn, flop_per_call=flop)


def _fused_linear_ce(x: torch.Tensor) -> tuple[Optional[Callable], str]:
    """(mlmfast.linear_ce.linear_cross_entropy, its name with the backend it takes for x) or (None, why not)."""
    try:
        import mlmfast.linear_ce as lce
    except ImportError as exc:
        return None, f"mlmfast.linear_ce not built yet (issue 5): {exc}"
    fn = getattr(lce, "linear_cross_entropy", None)
    if not callable(fn):
        return None, "mlmfast.linear_ce has no linear_cross_entropy(x, weight, bias, labels)"
    kernel = lce.use_kernel(x) if hasattr(lce, "use_kernel") else None
    return fn, f"linear_ce ({'?' if kernel is None else 'Triton' if kernel else 'chunked torch'})"


def bench_linear_ce(run: OpRunner, bt, cfg, dtype: torch.dtype) -> None:
    import torch.nn.functional as F

    B, L, H, V = bt.B, bt.L, cfg.hidden_size, cfg.vocab_size
    dev = run.device
    x_all = torch.randn(B * L, H, device=dev, dtype=dtype) * 0.5
    w = (torch.randn(V, H, device=dev, dtype=dtype) * 0.02).requires_grad_()
    b = torch.zeros(V, device=dev, dtype=dtype, requires_grad=True)
    n = len(bt)
    labels_all = [m.labels.reshape(-1) for m in bt.masked]  # (B*L,)
    pos = [m.positions for m in bt.masked]
    labels_sel = [m.position_labels.reshape(-1) for m in bt.masked]  # (B*P,)
    x_sel = [x_all.view(B, L, H)[torch.arange(B, device=dev)[:, None], p].reshape(-1, H).detach() for p in pos]
    for t in [x_all, *x_sel]:
        t.requires_grad_()

    def clear(*ts):
        for t in ts:
            t.grad = None

    def full(i):
        clear(x_all, w, b)
        F.cross_entropy(F.linear(x_all, w, b).float(), labels_all[i % n], ignore_index=-100).backward()

    def sparse(i):
        x = x_sel[i % n]
        clear(x, w, b)
        F.cross_entropy(F.linear(x, w, b).float(), labels_sel[i % n], ignore_index=-100).backward()

    run.time("linear-CE", "hf-full-logits", full, flop_per_call=6.0 * B * L * H * V)
    P = pos[0].shape[1]
    run.time("linear-CE", "sparse (reference)", sparse, flop_per_call=6.0 * B * P * H * V)
    fused, name = _fused_linear_ce(x_sel[0])
    if fused is None:
        run.skip("linear-CE", "linear_ce (mlmfast)", name)
        return

    def fused_call(i):
        x = x_sel[i % n]
        clear(x, w, b)
        fused(x, w, b, labels_sel[i % n]).backward()

    run.time("linear-CE", name, fused_call, flop_per_call=6.0 * B * P * H * V)


OPS = ("masking", "gather", "attention", "linear-CE")


def run(configs, dists: list[str], ops: list[str], text, device: torch.device, *, n_batches: int, seed: int = 0,
        min_calls: int = 5, max_calls: int = 50, target_s: float = 0.5, deadline: Optional[float] = None,
        on_row: Callable[[dict], None] = lambda r: None, log: Callable[[str], None] = print) -> list[dict]:
    from .train_suite import model_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    for sc in configs:
        cfg = model_config(sc.model, sc.vocab_size, sc.L, text.tokenizer.pad_token_id)
        for d in dists:
            bt = text.batches(d, sc.B, sc.L, n_batches, sc.vocab_size, device, seed)
            base = dict(suite="ops", model=sc.model, L=sc.L, B=sc.B, vocab_size=sc.vocab_size, dist=d, fill=bt.fill,
                        dtype=str(dtype).replace("torch.", ""))
            runner = OpRunner(device, base, min_calls=min_calls, max_calls=max_calls, target_s=target_s, log=log,
                              on_row=on_row)
            for op in ops:
                if deadline is not None and time.monotonic() > deadline:
                    runner.skip(op, "*", "time budget spent (--time-budget)")
                    continue
                try:
                    if op == "masking":
                        bench_masking(runner, bt, text)
                    elif op == "gather":
                        bench_gather(runner, bt, cfg, dtype)
                    elif op == "attention":
                        bench_attention(runner, bt, cfg, dtype)
                    elif op == "linear-CE":
                        bench_linear_ce(runner, bt, cfg, dtype)
                except Exception as exc:  # set-up failed (e.g. out of memory): one row for the op
                    runner.skip(op, "*", _error_reason(exc), status="error")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            add_speedups(runner.rows)  # in place: the rows already passed to on_row get them too
            rows.extend(runner.rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup[other impl] = its median ms / this row's median ms, within one op at one shape (model, L, B, dist)."""
    def key(r: dict) -> tuple:
        return r["op"], r["model"], r["L"], r["B"], r["dist"]

    for r in rows:
        if r["status"] != "ok":
            continue
        r["speedup"] = {o["impl"]: o["ms"] / r["ms"] for o in rows
                        if o is not r and key(o) == key(r) and o["status"] == "ok"}
