"""End-to-end MLM training steps: transformers' BertForMaskedLM against mlmfast's reference and fast paths.

Paths (every one gets the same weights, copied from one seeded BertForMLM, and the same masked batches):
  hf-eager              BertForMaskedLM(attn_implementation="eager"), HF labels (-100 = not predicted)
  hf-sdpa               the same with attn_implementation="sdpa"
  hf-sdpa-compile       torch.compile of hf-sdpa
  hf-accelerated        hf-sdpa after `mlmfast.accelerate(model)`: the user's HF model and HF loop (labels=),
                        on mlmfast's fast path (fused attention, last layer and head on the masked rows only)
  mlmfast-reference     BertForMLM's reference path (sdpa attention, full logits, fp32 CE): what the trainer
                        runs without the fast path
  mlmfast-fast          BertForMLM.set_path("fast"), forward(..., positions=, position_labels=) from the
                        MaskingOutput (issue 5); mask_select runs INSIDE the step, as in the trainer
  mlmfast-fast-unpad    mlmfast-fast + num_tokens= (the batch's real-token count, known on the host): on a GPU
                        layers 1..n-1 run their dense ops on the real tokens only (fast.unpad_plan); on CPU
                        mlmfast-fast does that already (skipped there)
  mlmfast-fast-compile  torch.compile of mlmfast-fast (mask_select outside the compiled module, inside the step)
  mlmfast-fast-unpad-compile
                        torch.compile of mlmfast-fast-unpad: what `mlmfast train --compile` runs (the count is
                        a dynamic size: two builds, then any count); runs on CPU too (with --cpu-compile)
A path that cannot run here is a row with status "skipped" and the reason; one that fails is "error" + reason.

One step = (fast paths: mask_select) + forward + backward + AdamW step + zero_grad(set_to_none) — the trainer's
step without gradient clipping. AdamW is `mlmfast.trainer.make_optimizer` (fused on CUDA; no decay on biases and
LayerNorm). Precision: bf16 autocast on CUDA (fp16 where bf16 is missing), fp32 on CPU. Dropout as configured
(0.1, BERT's). The HF and reference paths get the pre-masked batch: their masking (HF's collator runs in the
DataLoader's worker processes) is measured by the ops suite, not here.

Model FLOPs (one convention for every path, so MFU compares like with like): the work HF does on the padded
(B, L) batch, forward + backward = 3 x forward:
    dense      6 * N * B * L        N = encoder weight matrices + the head transform (n_layers*(4H^2 + 2HI) + H^2)
    attention  12 * n_layers * B * L^2 * H     (QK^T and PV, 2 * 2 * B * L^2 * H per layer forward)
    decoder    6 * B * L * H * V    (full logits over every position, as HF computes them)
A path that skips work (padding, unselected positions) gets it as speed: its "model TFLOP/s" is this count over its
time. Non-pad tokens/s counts real tokens only. MFU = model TFLOP/s / the device's dense bf16 peak (GPU only).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .harness import DeviceLost, PeakMemory, device_lost, median_rate, spread, time_calls

PATHS = ("hf-eager", "hf-sdpa", "hf-sdpa-compile", "hf-accelerated", "mlmfast-reference", "mlmfast-fast",
         "mlmfast-fast-unpad", "mlmfast-fast-compile", "mlmfast-fast-unpad-compile")
# Measured order: eager paths first, compiled ones (slow to build) last, so a time budget cuts the compiles.
RUN_ORDER = ("hf-eager", "hf-sdpa", "mlmfast-reference", "mlmfast-fast", "hf-accelerated", "mlmfast-fast-unpad",
             "hf-sdpa-compile", "mlmfast-fast-compile", "mlmfast-fast-unpad-compile")
UNPAD_CPU_REASON = "on CPU mlmfast-fast drops the padding itself (counting the real tokens is free there)"
BASELINES = ("hf-eager", "hf-sdpa", "hf-sdpa-compile", "mlmfast-reference")
CPU_COMPILE_REASON = "torch.compile on CPU is not part of the comparison (--cpu-compile runs it)"


@dataclass
class StepConfig:
    model: str  # preset name
    L: int
    B: int
    vocab_size: int


def model_config(preset: str, vocab_size: int, L: int, pad_token_id: int = 0):
    from mlmfast.config import ModelConfig

    return ModelConfig.from_preset(preset, vocab_size=vocab_size, max_position_embeddings=max(512, L),
                                   pad_token_id=pad_token_id)


def model_flops(cfg, B: int, L: int) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward) on a padded (B, L) batch; see the module docstring."""
    H, I, n, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    N = n * (4 * H * H + 2 * H * I) + H * H
    out = {"dense": 6.0 * N * B * L, "attention": 12.0 * n * B * L * L * H, "decoder": 6.0 * B * L * H * V}
    out["total"] = sum(out.values())
    return out


# ---- availability ----------------------------------------------------------------------------------------------
def skip_reason(path: str, device: torch.device, cpu_compile: bool = False) -> Optional[str]:
    """None when `path` can run here, else why not (one line)."""
    if path.startswith("hf-"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install transformers)"
    if path.endswith("-compile") and device.type == "cpu" and not cpu_compile:
        return CPU_COMPILE_REASON
    if path == "mlmfast-fast-unpad" and device.type == "cpu":
        return UNPAD_CPU_REASON
    if path.startswith("mlmfast-fast"):
        from mlmfast.model import BertForMLM

        if not hasattr(BertForMLM, "set_path"):
            return "fast path not built (issue 5: BertForMLM.set_path is missing)"
    return None


# ---- one path --------------------------------------------------------------------------------------------------
def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_model(path: str, cfg, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """The path's model with the master weights, in train mode, on the device (not yet compiled)."""
    with torch.device(device):  # built (and randomly initialised) on the device: fast on a GPU; then overwritten
        if path.startswith("hf-"):
            from transformers import BertConfig, BertForMaskedLM

            attn = "eager" if path == "hf-eager" else "sdpa"
            model = BertForMaskedLM._from_config(BertConfig(**cfg.to_dict()), attn_implementation=attn)
            if path == "hf-accelerated":
                import mlmfast

                mlmfast.accelerate(model)
        else:
            from mlmfast.model import BertForMLM

            model = BertForMLM(cfg)
            if hasattr(model, "set_path"):
                model.set_path("fast" if path.startswith("mlmfast-fast") else "reference")
    model.load_state_dict(state, strict=True)
    return model.to(device).train()


def master_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    """The weights every path starts from: those of one BertForMLM seeded with `seed`, on the CPU."""
    from mlmfast.model import BertForMLM

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in BertForMLM(cfg).state_dict().items()}


def build_path(path: str, cfg, state: dict[str, torch.Tensor], device: torch.device,
               compile_mode: str = "default") -> tuple[torch.nn.Module, Any, Callable]:
    """(model, optimizer, fn): the path's model, the trainer's AdamW (`make_optimizer`) and what its step calls
    (torch.compile(model, mode=compile_mode) for the -compile paths, else the model)."""
    from mlmfast.trainer import TrainConfig, make_optimizer

    model = build_model(path, cfg, state, device)
    opt = make_optimizer(model, TrainConfig(), device)
    fn = torch.compile(model, mode=compile_mode) if path.endswith("-compile") else model
    return model, opt, fn


def make_step(path: str, fn: Callable, opt, batches, device: torch.device) -> Callable[[int], torch.Tensor]:
    """step(i) on batch i % n with fn = the path's model (or its torch.compile); returns the loss (no sync)."""
    from mlmfast.fast import unpads

    amp = autocast_dtype(device)
    n = len(batches)
    fast = path.startswith("mlmfast-fast")
    # the rows' lengths (the batches are right-padded), as the trainer passes them: attention takes seqlens
    lengths = [am.sum(1) for am in batches.attention_mask] if fast else None

    def hint(j: int) -> dict:
        # mlmfast-fast-unpad(-compile): the real-token count as the host knows it, so that the layers' dense ops
        # run on the real tokens only on a GPU and compiled too (fast.unpad_plan); the other fast paths run the
        # padded layout there.
        # As the trainer, only for a batch that unpads (a full batch, passed nothing, does not rebuild a graph).
        give = path.startswith("mlmfast-fast-unpad") and unpads(batches.tokens[j], batches.B, batches.L)
        return dict(num_tokens=batches.tokens[j]) if give else {}

    def step(i: int) -> torch.Tensor:
        j = i % n
        attn = batches.attention_mask[j]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if fast:
                m = batches.mask(j)  # the mask_select call of the trainer's step; same bits as batches.masked[j]
                out = fn(m.input_ids, attention_mask=attn, positions=m.positions, position_labels=m.position_labels,
                         lengths=lengths[j], **hint(j))
            else:
                m = batches.masked[j]
                out = fn(input_ids=m.input_ids, attention_mask=attn, labels=m.labels)
        loss = out.loss if hasattr(out, "loss") else out[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _error_reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:200] if msg else ''}"


def run(configs: list[StepConfig], dists: list[str], paths: list[str], text, device: torch.device, *,
        steps: int, warmup: int, compile_warmup: int, n_batches: int, seed: int = 0, cpu_compile: bool = False,
        compile_mode: str = "default",
        peak: Optional[float] = None, deadline: Optional[float] = None,
        on_row: Callable[[dict], None] = lambda r: None, log: Callable[[str], None] = print) -> list[dict]:
    """Measure every (config, dist, path); rows go to on_row as they come and are returned (sorted, with speedups).

    Two phases: every eager path of every config, then the torch.compile paths (slow to build), so a time budget
    cuts compiles, not the comparison at the second L. A path is built once per config and runs both dists."""
    rows: list[dict] = []

    def emit(r: dict) -> None:
        rows.append(r)
        on_row(r)

    order = [p for p in RUN_ORDER if p in paths]
    # CPU: prime every eager path (lazy imports, thread pools: RSS). CUDA: only the cheap ones, so the Triton
    # kernels of the fast paths are not JIT-compiled for the priming model's shapes.
    primed = [p for p in order if skip_reason(p, device, cpu_compile) is None and not p.endswith("-compile")
              and (device.type == "cpu" or not (p.startswith("mlmfast-fast") or p == "hf-accelerated"))]
    for failure in _prime(primed, text, device):
        log(f"# priming failed: {failure}")
    prepared: dict[int, tuple] = {}  # config index -> (cfg, flops, batches per dist, master weights)

    def prepare(i: int, sc: StepConfig) -> tuple:
        if i not in prepared:
            cfg = model_config(sc.model, sc.vocab_size, sc.L, text.tokenizer.pad_token_id)
            batches = {d: text.batches(d, sc.B, sc.L, n_batches, sc.vocab_size, device, seed) for d in dists}
            prepared[i] = (cfg, model_flops(cfg, sc.B, sc.L), batches, master_state(cfg, seed))
        return prepared[i]

    for phase in ([p for p in order if not p.endswith("-compile")], [p for p in order if p.endswith("-compile")]):
        for i, sc in enumerate(configs):
            for path in phase:
                cfg, flops, batches, state = prepare(i, sc)
                base = dict(suite="train", model=sc.model, L=sc.L, B=sc.B, vocab_size=sc.vocab_size, path=path,
                            model_tflop_per_step=flops["total"] / 1e12, flops=flops)
                reason = skip_reason(path, device, cpu_compile)
                if reason is None and deadline is not None and time.monotonic() > deadline:
                    reason = "time budget spent (--time-budget)"
                if reason is not None:
                    for d in dists:
                        emit(dict(base, dist=d, fill=batches[d].fill, status="skipped", reason=reason))
                    continue
                _run_path(path, cfg, state, batches, base, device, emit, log, steps=steps,
                          warmup=compile_warmup if path.endswith("-compile") else warmup, flops=flops["total"],
                          peak=peak, deadline=deadline, compile_mode=compile_mode)
    add_speedups(rows)
    return sort_rows(rows, configs, dists)


def sort_rows(rows: list[dict], configs: list[StepConfig], dists: list[str]) -> list[dict]:
    """Table order: config, then dist, then PATHS order (the run order differs: compiles last)."""
    index = {p: k for k, p in enumerate(PATHS)}
    cfg_index = {(c.model, c.L, c.B): k for k, c in enumerate(configs)}
    return sorted(rows, key=lambda r: (cfg_index.get((r["model"], r["L"], r["B"]), 0), dists.index(r["dist"]),
                                       index.get(r["path"], 0)))


def _run_path(path, cfg, state, batches, base, device, emit, log, *, steps, warmup, flops, peak, deadline,
              compile_mode: str = "default") -> None:
    """Build the path's model once, then measure it on each dist's batches."""
    mem = PeakMemory(device)
    mem.start()  # before the model exists: its weights, gradients and optimizer state count
    model = fn = opt = None
    build_error = first_error = lost = None
    try:
        model, opt, fn = build_path(path, cfg, state, device, compile_mode)
    except Exception as exc:  # e.g. out of memory, an API that changed
        build_error = _error_reason(exc)
        lost = device_lost(device)
    first_dist = next(iter(batches))  # the first row set pays the compile
    for d, bt in batches.items():
        r = dict(base, dist=d, fill=bt.fill, mem_method=mem.method)
        if lost is not None:
            r.update(status="skipped", reason=f"not run: CUDA context lost ({lost})")
        elif build_error is not None:
            r.update(status="error", reason=build_error)
        elif first_error is not None and path.endswith("-compile"):  # a failing compile is not paid for twice
            r.update(status="error", reason=f"{first_error[1]} (as on the {first_error[0]} rows; not retried)")
        elif deadline is not None and time.monotonic() > deadline:
            r.update(status="skipped", reason="time budget spent (--time-budget)")
        else:
            try:
                r.update(_measure(path, fn, opt, bt, device, mem, steps=steps, warmup=warmup, flops=flops, peak=peak,
                                  compile_row=path.endswith("-compile") and d == first_dist))
            except Exception as exc:
                r.update(status="error", reason=_error_reason(exc))
                first_error = (d, r["reason"])
                lost = device_lost(device)
                if lost is None:
                    opt.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        emit(r)
        log(_one_line(r))
    if lost is not None:
        raise DeviceLost(f"CUDA context lost in train {path}: {lost}")
    del model, fn, opt
    if path.endswith("-compile"):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _prime(paths: list[str], text, device: torch.device) -> list[str]:
    """One step of a 1-layer model on each eager path, unmeasured: lazy imports and one-time allocations (thread
    pools, library handles) then land before the first measured path, not inside its peak memory."""
    from mlmfast.config import ModelConfig
    from mlmfast.model import BertForMLM

    V = text.tokenizer.vocab_size  # the batches hold the tokenizer's ids
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)
    state = BertForMLM(cfg).state_dict()
    bt = text.batches("real", 2, 16, 1, V, device, seed=12345)
    failed = []
    for path in paths:
        try:
            _, opt, fn = build_path(path, cfg, state, device)
            make_step(path, fn, opt, bt, device)(0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous error shows here, not in the first measured path
        except Exception as exc:  # the measured run reports it too
            failed.append(f"{path}: {_error_reason(exc)}")
            lost = device_lost(device)
            if lost is not None:
                raise DeviceLost(f"CUDA context lost while priming {path}: {lost}") from exc
    gc.collect()
    return failed


def _measure(path, fn, opt, batches, device, mem: PeakMemory, *, steps: int, warmup: int, flops: float,
             peak: Optional[float], compile_row: bool = False) -> dict[str, Any]:
    mem.reset_peak()
    step = make_step(path, fn, opt, batches, device)
    losses: list[torch.Tensor] = []

    def call(i: int) -> None:
        loss = step(i)
        if i == 0:
            losses.append(loss)

    warm, timed = time_calls(call, warmup, steps, device)
    tokens = [batches.tokens[(warmup + j) % len(batches)] for j in range(len(timed))]  # timed step j = call warmup+j
    peak_bytes = mem.peak_bytes()
    tflops = median_rate([flops / 1e12], timed)
    out: dict[str, Any] = dict(status="ok", steps=len(timed), warmup=len(warm),
                               warmup_s=[round(w, 3) for w in warm], **spread(timed),
                               tokens_per_s=median_rate(tokens, timed), tflops=tflops,
                               mfu=(tflops / peak) if peak else None,
                               peak_mem_mib=None if peak_bytes is None else peak_bytes / 2**20,
                               loss_first=float(losses[0]) if losses else None)
    if compile_row and warm:  # the first call of the first row set: torch.compile's build (+ one step)
        out["compile_s"] = round(warm[0], 1)
    return out


def add_speedups(rows: list[dict]) -> None:
    """speedup[b] = median ms of baseline b / median ms of the row, within the same (model, L, B, dist) of this run;
    mem_vs_hf_eager = peak memory / hf-eager's."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["L"], r["B"], r["dist"]), {})[r["path"]] = r
    for g in groups.values():
        for r in g.values():
            if r.get("status") != "ok":
                continue
            r["speedup"] = {b: g[b]["ms"] / r["ms"] for b in BASELINES if g.get(b, {}).get("status") == "ok"}
            e = g.get("hf-eager", {})
            if e.get("status") == "ok" and e.get("peak_mem_mib") and r.get("peak_mem_mib") is not None:
                r["mem_vs_hf_eager"] = r["peak_mem_mib"] / e["peak_mem_mib"]


def _one_line(r: dict) -> str:
    head = f"train {r['model']} L={r['L']} B={r['B']} {r['dist']:4s} {r['path']:21s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    mem = "n/a" if r.get("peak_mem_mib") is None else f"{r['peak_mem_mib']:.0f} MiB"
    return (f"{head} {r['ms']:9.2f} ms [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]  {r['tokens_per_s']:>10,.0f} tok/s  "
            f"{r['tflops']:7.2f} TFLOP/s  mem {mem}")
