"""Masking throughput: the C++ twin / CUDA kernel vs the PyTorch reference vs HF DataCollatorForLanguageModeling.

All methods mask the same batches of real text (WikiText-2 paragraphs, [CLS] ... [SEP] + padding, fixed L),
BERT's recipe (15%, 80/10/10). Throughput is non-padding tokens per second, per batch; the table gives the
median with p20 / p80 over batches x repeats, and the speedup of each method's median over the collator's.

    python benchmarks/bench_masking.py                        # CPU rows (+ GPU rows when CUDA is there)
    python benchmarks/bench_masking.py --batches 20 --out benchmarks/results/masking-cpu.json
    python benchmarks/bench_masking.py --device cuda --step   # + the share of a BERT-base training step

Methods:
  hf_collator         DataCollatorForLanguageModeling(tokenizer)(examples): what an HF training loop runs
                      (examples = pre-padded rows as Python lists, so its padding is a no-op)
  reference           mlmfast.masking.mask_tokens(backend="reference") (plain PyTorch, vectorised)
  twin                mlmfast.ops.mask_select on CPU: the C++ twin of the CUDA kernel (OpenMP over rows)
  reference[cuda]     mask_tokens on the GPU (CUDA events)
  kernel[cuda]        mask_select on the GPU: the one-launch CUDA kernel (CUDA events)
With --step (GPU): one bf16 BERT-base MLM training step (encode -> gather_rows -> head -> CE -> backward ->
AdamW) on the same batch size, and the kernel's median time as a share of it.

The tokenizer is a WordPiece trained on the corpus itself with `tokenizers` (no hub access).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_masking.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import git_commit, percentile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---- data -------------------------------------------------------------------------------------------------
def read_paragraphs(path: Path) -> list[str]:
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        paras = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("=")]
        if paras:
            return paras
    print(f"# {path} not found: using mlmfast's built-in corpus", file=sys.stderr)
    from mlmfast.data import builtin_corpus

    return [t for t in builtin_corpus() if t.strip()]


def build_tokenizer(paragraphs: list[str], vocab_size: int):
    """A BERT-style WordPiece trained on the corpus, wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(paragraphs, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def build_batches(paragraphs, hf_tok, B: int, L: int, n_batches: int, seed: int = 0):
    """n_batches x (ids (B, L) int64, attention_mask (B, L) int64, examples: list of dicts for the collator)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(paragraphs), generator=g).tolist()
    need = B * n_batches
    order = (order * (need // len(order) + 1))[:need]
    enc = hf_tok([paragraphs[i] for i in order], add_special_tokens=False)["input_ids"]
    cls, sep, pad = (hf_tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    rows = []
    for ids in enc:
        ids = [cls] + ids[: L - 2] + [sep]
        rows.append((ids + [pad] * (L - len(ids)), [1] * len(ids) + [0] * (L - len(ids))))
    batches = []
    for b in range(n_batches):
        chunk = rows[b * B:(b + 1) * B]
        ids = torch.tensor([r[0] for r in chunk], dtype=torch.long)
        attn = torch.tensor([r[1] for r in chunk], dtype=torch.long)
        examples = [{"input_ids": r[0], "attention_mask": r[1]} for r in chunk]
        batches.append((ids, attn, examples))
    return batches


# ---- timing -----------------------------------------------------------------------------------------------
def time_cpu(fn, batches, repeats: int, warmup: int = 2):
    for i in range(warmup):
        fn(batches[i % len(batches)], i)
    out = []
    for r in range(repeats):
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            fn(batch, r * len(batches) + i)
            out.append(time.perf_counter() - t0)
    return out


def time_cuda(fn, batches, repeats: int, warmup: int = 3):
    for i in range(warmup):
        fn(batches[i % len(batches)], i)
    torch.cuda.synchronize()
    out = []
    for r in range(repeats):
        for i, batch in enumerate(batches):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(batch, r * len(batches) + i)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
    return out


def summarise(name, device, seconds, tokens_per_batch):
    """Per-sample tokens/s = the batch's non-pad tokens / its time (batches cycle through `seconds`)."""
    n = len(tokens_per_batch)
    tps = [tokens_per_batch[i % n] / s for i, s in enumerate(seconds)]
    return {
        "method": name, "device": device, "samples": len(tps),
        "tokens_per_s_median": statistics.median(tps), "tokens_per_s_p20": percentile(tps, 0.2),
        "tokens_per_s_p80": percentile(tps, 0.8), "ms_per_batch_median": statistics.median(seconds) * 1e3,
    }


# ---- the BERT-base step (GPU, optional) --------------------------------------------------------------------
def bert_step_seconds(batches, vocab_size: int, mask_id: int, specials, repeats: int) -> float:
    from mlmfast.config import ModelConfig
    from mlmfast.model import BertForMLM
    from mlmfast.ops import gather_rows, mask_select

    cfg = ModelConfig.from_preset("bert-base", vocab_size=vocab_size, attn_implementation="sdpa")
    model = BertForMLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dev_batches = [(ids.cuda(), attn.cuda(), None) for ids, attn, _ in batches]

    def step(batch, i):
        ids, attn, _ = batch
        m = mask_select(ids, mask_token_id=mask_id, vocab_size=vocab_size, special_token_ids=specials,
                        attention_mask=attn, seed=0, offset=i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model.encode(m.input_ids, attn)  # (B, L, H)
            logits = model.head(gather_rows(hidden, m.positions))  # (B*P, V)
        loss = torch.nn.functional.cross_entropy(logits.float(), m.position_labels.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return statistics.median(time_cuda(step, dev_batches, repeats))


# ---- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text file, one paragraph per line")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="passes over the batches per method")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU rows, plus GPU rows when CUDA is available")
    ap.add_argument("--step", action="store_true", help="GPU: also time a bf16 BERT-base training step")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from transformers import DataCollatorForLanguageModeling
    import transformers

    from mlmfast import ops
    from mlmfast.masking import mask_tokens

    paragraphs = read_paragraphs(args.data)
    hf_tok = build_tokenizer(paragraphs, args.vocab_size)
    V = len(hf_tok)
    specials = sorted(hf_tok.all_special_ids)
    mask_id = hf_tok.mask_token_id
    batches = build_batches(paragraphs, hf_tok, args.batch_size, args.seq_len, args.batches)
    tokens = [int(attn.sum()) for _, attn, _ in batches]
    collator = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=0.15, return_tensors="pt")
    kw = dict(mask_token_id=mask_id, vocab_size=V, special_token_ids=specials)

    rows = []
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device != "cuda":
        rows.append(summarise("hf_collator", "cpu", time_cpu(lambda b, i: collator(b[2]), batches, args.repeats),
                              tokens))
        rows.append(summarise("reference", "cpu", time_cpu(
            lambda b, i: mask_tokens(b[0], attention_mask=b[1], seed=i, backend="reference", **kw), batches, args.repeats), tokens))
        rows.append(summarise(f"twin ({ops.mask_select_backend('cpu')})", "cpu", time_cpu(
            lambda b, i: ops.mask_select(b[0], attention_mask=b[1], seed=0, offset=i, **kw), batches,
            args.repeats), tokens))
    step_s = None
    if use_cuda:
        gb = [(ids.cuda(), attn.cuda(), None) for ids, attn, _ in batches]
        rows.append(summarise("reference", "cuda", time_cuda(
            lambda b, i: mask_tokens(b[0], attention_mask=b[1], seed=i, backend="reference", **kw), gb, args.repeats), tokens))
        rows.append(summarise(f"kernel ({ops.mask_select_backend('cuda')})", "cuda", time_cuda(
            lambda b, i: ops.mask_select(b[0], attention_mask=b[1], seed=0, offset=i, **kw), gb, args.repeats),
            tokens))
        if args.step:
            try:
                step_s = bert_step_seconds(batches, V, mask_id, specials, args.repeats)
            except Exception as exc:  # the model is another module: report, do not fail the benchmark
                print(f"# BERT-base step not timed: {type(exc).__name__}: {exc}", file=sys.stderr)

    base = {r["device"]: r["tokens_per_s_median"] for r in rows if r["method"] == "hf_collator"}.get("cpu")
    ext = ops.extension()
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if use_cuda else f"CPU: {platform.processor() or platform.machine()}",
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "twin_threads": ext.cpu_threads() if ext is not None else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "git_commit": git_commit(), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "batches": args.batches, "repeats": args.repeats, "vocab_size": V,
        "non_pad_fraction": sum(tokens) / (len(tokens) * args.batch_size * args.seq_len),
        "data": str(args.data),
    }
    for r in rows:
        r["speedup_vs_hf_collator"] = r["tokens_per_s_median"] / base if base else None
    print(f"\n### Masking throughput ({meta['date']}, {meta['device']}, {meta['cpu_cores']} cores, torch "
          f"{meta['torch']}, transformers {meta['transformers']}, commit {meta['git_commit']})\n")
    print(f"B={args.batch_size}, L={args.seq_len}, {args.batches} batches x {args.repeats} repeats, "
          f"non-pad fraction {meta['non_pad_fraction']:.3f}, vocab {V}\n")
    print("| method | device | median M tok/s | p20 | p80 | ms/batch | speedup vs HF collator |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        sp = f"{r['speedup_vs_hf_collator']:.1f}x" if r["speedup_vs_hf_collator"] else "-"
        print(f"| {r['method']} | {r['device']} | {r['tokens_per_s_median'] / 1e6:.2f} | "
              f"{r['tokens_per_s_p20'] / 1e6:.2f} | {r['tokens_per_s_p80'] / 1e6:.2f} | "
              f"{r['ms_per_batch_median']:.3f} | {sp} |")
    if step_s is not None:
        k = next(r for r in rows if r["device"] == "cuda" and r["method"].startswith("kernel"))
        meta["bert_base_step_ms"] = step_s * 1e3
        meta["kernel_share_of_step"] = k["ms_per_batch_median"] / (step_s * 1e3)
        print(f"\nBERT-base bf16 step: {step_s * 1e3:.2f} ms; mask_select kernel: {k['ms_per_batch_median']:.4f} ms "
              f"= {100 * meta['kernel_share_of_step']:.2f}% of the step (target < 2%)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
