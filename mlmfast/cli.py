"""The `mlmfast` command: train, prepare, eval, fill, tokenizer, info, bench.

Bad input ends with one line `error: ...` naming the problem and the fix and exit status 2; `--debug` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from .errors import UserError

# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS
    from .trainer import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="text files, directories or .jsonl files with a 'text' field "
                        "(default: the built-in corpus of Python documentation, no download)")
    g.add_argument("--out", default=d.out_dir, help=f"run directory (default: {d.out_dir})")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per row (default: {d.seq_len})")
    g.add_argument("--no-pack", action="store_true",
                   help="one document per row, padded (default: pack documents across rows)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"share of documents held out for validation (default: {d.val_fraction})")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes")
    g = p.add_argument_group("model and tokenizer")
    g.add_argument("--model", default=d.model,
                   help=f"preset ({', '.join(PRESETS)}) or a model directory to continue training "
                        f"(default: {d.model})")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the model directory's, or train one on the corpus)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"vocabulary size of a tokenizer trained here (default: {d.vocab_size})")
    g.add_argument("--attn", choices=["sdpa", "eager"], default=d.attn_implementation,
                   help="attention implementation (default: sdpa; eager is the explicit-softmax reference)")
    g.add_argument("--dropout", type=float, default=None, help="override hidden and attention dropout")
    g.add_argument("--path", choices=["fast", "reference"], default=d.path,
                   help="training step: fast (sparse MLM head, fused linear-CE and attention kernels; the default) "
                        "or reference (full logits, the oracle)")
    g = p.add_argument_group("masking")
    g.add_argument("--mlm-probability", type=float, default=d.mlm_probability,
                   help=f"share of (non-special, non-padding) tokens to predict (default: {d.mlm_probability})")
    g.add_argument("--mask-replace-prob", type=float, default=d.mask_replace_prob,
                   help=f"of those, the share replaced by [MASK] (default: {d.mask_replace_prob})")
    g.add_argument("--random-replace-prob", type=float, default=d.random_replace_prob,
                   help=f"the share replaced by a random token; the rest stay (default: {d.random_replace_prob})")
    g.add_argument("--masking-mode", choices=["bernoulli", "exact"], default=d.masking_mode)
    g.add_argument("--whole-word", action="store_true", help="whole-word masking")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help=f"optimizer steps (default: {d.max_steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per micro-batch (default: {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    g.add_argument("--warmup-steps", type=int, default=None, help="warmup steps (default: 6%% of --max-steps)")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], default=d.schedule,
                   help=f"learning rate after warmup (default: {d.schedule})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay, not on biases and LayerNorms (default: {d.weight_decay})")
    g.add_argument("--clip-grad-norm", type=float, default=d.clip_grad_norm, help="0 disables clipping")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=d.precision,
                   help="autocast precision (default: bf16 on CUDA when supported, fp32 on CPU)")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=d.seed, help=f"weights, data order, masks, dropout (default: {d.seed})")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"steps between validations (default: {d.eval_every})")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches, help="0 = the whole validation split")
    g.add_argument("--log-every", type=int, default=d.log_every,
                   help=f"steps between metrics.jsonl lines (default: {d.log_every})")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"steps between checkpoints (default: {d.save_every})")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help=f"newest checkpoints kept (default: {d.keep_checkpoints})")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="auto|CHECKPOINT",
                   help="continue the run in --out from its newest valid checkpoint (corrupt ones are named and "
                        "skipped); 'auto' also starts the run when --out holds none (for restart loops); or a "
                        "checkpoint directory RUN/checkpoints/step-N")
    g.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped; "
                        f"default: {d.max_bad_steps})")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): bit-identical resumes, and reruns with a fixed "
                        "--tokenizer (training a tokenizer is not deterministic in ties)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward: faster steps on a GPU (BERT-base on an H200: 1.2-1.5x "
                        "the eager fast path) after about a minute of compiling; not with --strategy fsdp")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("several processes (launch with torchrun)")
    g.add_argument("--strategy", choices=["ddp", "fsdp"], default=d.strategy,
                   help="ddp: replicated weights, all-reduced gradients (default); fsdp: FSDP2 fully_shard, "
                        "weights, gradients and optimizer state sharded over the processes")


_FIELD_OF = {"out": "out_dir", "no_pack": "pack", "attn": "attn_implementation", "no_progress": "progress"}


def _typed_train_fields(argv: Optional[list[str]]) -> Optional[set[str]]:
    """The TrainConfig fields whose flags appear in argv (None: unknown, e.g. cmd_train called directly)."""
    if argv is None:
        return None
    p = argparse.ArgumentParser(add_help=False)
    _add_train_args(p)
    typed = set()
    for action in p._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                typed.add(_FIELD_OF.get(action.dest, action.dest))
    return typed


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import TrainConfig, train

    cfg = TrainConfig(
        data=list(args.data), out_dir=args.out, seq_len=args.seq_len, pack=not args.no_pack,
        val_fraction=args.val_fraction, num_workers=args.num_workers, model=args.model,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, attn_implementation=args.attn, path=args.path,
        dropout=args.dropout, mlm_probability=args.mlm_probability, mask_replace_prob=args.mask_replace_prob,
        random_replace_prob=args.random_replace_prob, masking_mode=args.masking_mode,
        whole_word=args.whole_word, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule,
        weight_decay=args.weight_decay, clip_grad_norm=args.clip_grad_norm, precision=args.precision,
        device=args.device, seed=args.seed, eval_every=args.eval_every, eval_batches=args.eval_batches,
        log_every=args.log_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        progress=not args.no_progress, max_bad_steps=args.max_bad_steps, deterministic=args.deterministic,
        strategy=args.strategy, compile=args.compile,
    )
    r = train(cfg, resume=args.resume or False, explicit=_typed_train_fields(getattr(args, "_argv", None)))
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    print()
    if not r.train_losses:  # a finished run resumed with the same --max-steps
        print(f"the run is already at step {r.steps} (--max-steps {r.steps}): nothing to train; pass a larger "
              f"--max-steps to continue it")
    else:
        print(f"done: {r.steps} steps in {r.seconds:.0f}s ({r.tokens_per_s:,.0f} tokens/s)")
    if r.first_val and r.last_val:
        print(f"validation MLM loss: {r.first_val['val_loss']:.3f} -> {r.last_val['val_loss']:.3f} "
              f"(perplexity {r.first_val['val_ppl']:.0f} -> {r.last_val['val_ppl']:.1f}, "
              f"masked-token accuracy {100 * r.first_val['val_acc']:.1f}% -> {100 * r.last_val['val_acc']:.1f}%)")
    print(f"model:   {r.model_dir}   (try: mlmfast fill {r.run_dir} \"The [MASK] sat on the mat.\")")
    print(f"metrics: {os.path.join(r.run_dir, 'metrics.jsonl')}")
    if r.plot:
        print(f"plot:    {r.plot}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_datasets, make_loader
    from .inference import load_model_and_tokenizer
    from .trainer import MaskingSpec, TrainConfig, evaluate, load_documents, resolve_device

    device = resolve_device(args.device)
    model, tokenizer, model_dir = load_model_and_tokenizer(args.path, device)
    from .prepare import PreparedCorpus, is_prepared_dir

    run_cfg = None  # the run's TrainConfig when args.path is a run directory
    run_cfg_path = os.path.join(args.path, "train_config.json")
    if os.path.isfile(run_cfg_path):
        with open(run_cfg_path) as f:
            run_cfg = TrainConfig.from_json(json.load(f))
        run_cfg.seq_len = args.seq_len or run_cfg.seq_len
    data = list(args.data) or (run_cfg.data if run_cfg is not None else [])
    if len(data) == 1 and is_prepared_dir(data[0]):  # prepared shards (given, or the run's): their validation split
        corpus = PreparedCorpus(data[0])
        corpus.check_tokenizer(tokenizer)
        cfg = run_cfg if run_cfg is not None else TrainConfig(data=data, seq_len=args.seq_len or 128)
        ds = corpus.dataset("val", seq_len=cfg.seq_len, pack=cfg.pack)
        what = f"the validation split of the prepared shards {data[0]}"
    elif args.data:
        cfg = TrainConfig(data=list(args.data), seq_len=args.seq_len or (run_cfg.seq_len if run_cfg else 128))
        docs, source = load_documents(cfg.data)
        ds, _ = build_datasets(docs, tokenizer, seq_len=cfg.seq_len, pack=True, val_fraction=0.0, seed=0)
        what = f"all of {source}"
    elif run_cfg is not None:
        cfg = run_cfg
        docs, source = load_documents(cfg.data)
        _, ds = build_datasets(docs, tokenizer, seq_len=cfg.seq_len, pack=cfg.pack,
                               val_fraction=cfg.val_fraction, seed=cfg.seed, whole_word=cfg.whole_word)
        what = f"the validation split of the run ({source})"
    else:
        raise UserError(f"{args.path} is not a run directory: pass --data with text to evaluate on")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} > the model's max_position_embeddings "
                        f"({model.config.max_position_embeddings}); use a shorter --seq-len")
    if len(ds) == 0:
        raise UserError("nothing to evaluate: the data gave no rows")
    # masks are seeded per row (per batch with the PyTorch masking fallback): any batch size gives the numbers of
    # the run's evaluations on the whole split; the run's own batch size also matches its --eval-batches cut
    batch_size = args.batch_size or (run_cfg.batch_size if run_cfg is not None else 32)
    loader = make_loader(ds, batch_size, shuffle=False, drop_last=False)
    spec = MaskingSpec.from_config(cfg, tokenizer)
    t0 = time.time()
    r = evaluate(model, loader, spec, device, args.batches, None)
    r["seconds"] = time.time() - t0
    r["model"] = model_dir
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"model {model_dir} on {what}:")
        print(f"  MLM loss {r['val_loss']:.4f}   perplexity {r['val_ppl']:.2f}   "
              f"masked-token accuracy {100 * r['val_acc']:.2f}%   ({r['val_tokens']:,} masked tokens, "
              f"{r['seconds']:.1f}s)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# fill
# ---------------------------------------------------------------------------------------------------------


def cmd_fill(args: argparse.Namespace) -> int:
    from .inference import fill_mask, load_model_and_tokenizer
    from .trainer import resolve_device

    model, tokenizer, model_dir = load_model_and_tokenizer(args.path, resolve_device(args.device))
    preds = fill_mask(model, tokenizer, args.text, args.top_k)
    if args.json:
        print(json.dumps([{"position": p.position, "candidates": [{"token": t, "prob": pr} for t, pr in p.candidates]}
                          for p in preds], indent=2))
        return 0
    print(f"{args.text}")
    for i, p in enumerate(preds):
        cands = "  ".join(f"{t} ({100 * pr:.1f}%)" for t, pr in p.candidates)
        print(f"  [MASK] #{i + 1} (token {p.position}): {cands}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer
    from .trainer import load_documents

    if os.path.isfile(args.out):
        raise UserError(f"--out {args.out} is a file; pass a directory for the tokenizer")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out} is not empty (prepared shards or runs may depend on a tokenizer there); "
                        "choose another directory, or pass --overwrite")
    docs, source = load_documents(list(args.data))
    t0 = time.time()
    tok = train_tokenizer(docs, vocab_size=args.vocab_size, lowercase=not args.cased,
                          min_frequency=args.min_frequency)
    tok.save(args.out)
    print(f"trained a WordPiece tokenizer on {source} ({len(docs)} documents): {tok.vocab_size} tokens in "
          f"{time.time() - t0:.1f}s -> {args.out}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: {tok.vocab_size} < --vocab-size {args.vocab_size}: the corpus has no more pieces seen at least "
              f"--min-frequency {args.min_frequency} times (--vocab-size is an upper bound)")
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    from .tokenizer import MLMTokenizer

    path = args.dir
    if os.path.isdir(os.path.join(path, "tokenizer")):  # a run directory
        path = os.path.join(path, "tokenizer")
    tok = MLMTokenizer.load(path)
    ids = tok.encode_for_model(args.text)
    toks = tok.convert_ids_to_tokens(ids)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": toks}))
    else:
        print(" ".join(toks))
        print(" ".join(str(i) for i in ids))
    return 0


# ---------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------


def _distributed_info(torch) -> str:
    """Which torchrun backends this torch build has (gloo: CPU processes; nccl: GPUs) and FSDP2."""
    dist = torch.distributed
    if not dist.is_available():
        return "not available in this torch build (single process only)"
    backends = [name for name, ok in (("nccl", dist.is_nccl_available() and torch.cuda.is_available()),
                                      ("gloo", dist.is_gloo_available())) if ok]
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        fsdp = "FSDP2"
    except ImportError:
        fsdp = "no FSDP2"
    return f"torchrun with {', '.join(backends) or 'no backend'}; DDP, {fsdp}"


def cmd_info(args: argparse.Namespace) -> int:
    import importlib
    import platform

    import torch

    from . import __version__
    from .dispatch import all_status

    info: dict = {"mlmfast": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "triton", "numpy", "tokenizers", "safetensors", "transformers"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as exc:  # report, never fail
            info[mod] = f"not available ({type(exc).__name__})"
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        info["device"] = f"{torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})"
        info["torch_cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    info["distributed"] = _distributed_info(torch)
    ops = all_status()
    if args.json:
        info["ops"] = [{"op": s.name, "active": s.fast if s.available else s.reference,
                        "fast": s.fast, "reason": s.reason} for s in ops]
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print()
    if not ops:
        print("fast kernels: none registered in this build; every op uses its PyTorch reference")
    w = max((len(s.name) for s in ops), default=0)
    for s in ops:
        if s.available:
            print(f"{s.name:<{w}}  fast: {s.fast}")
        else:
            print(f"{s.name:<{w}}  reference: {s.reference}   (fast path off: {s.reason})")
    return 0


# ---------------------------------------------------------------------------------------------------------
# bench (the suite lives in the repository's benchmarks/, which is not installed with the package)
# ---------------------------------------------------------------------------------------------------------


def _benchmarks_package():
    """Import `benchmarks` from the checkout this mlmfast comes from (an editable install), or say why not."""
    import importlib
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "benchmarks", "__init__.py")
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or "")) == \
            os.path.dirname(init):
        return importlib.import_module("benchmarks.suite")
    if not os.path.isfile(init):
        raise UserError(f"`mlmfast bench` needs the repository checkout (benchmarks/ next to mlmfast/; not found at "
                        f"{os.path.dirname(init)}): clone the repository, `pip install -e .` there, and run it again")
    spec = importlib.util.spec_from_file_location("benchmarks", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("benchmarks.suite")


def cmd_bench(args: argparse.Namespace) -> int:
    suite = _benchmarks_package()
    return suite.run(suite.build_parser("mlmfast bench").parse_args(args.bench_args))


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlmfast", description="Fast masked-language-model training for BERT encoders.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train (or continue) an MLM run",
                       description="Train a BERT encoder with masked-language modeling. With no --data it "
                                   "trains on the built-in corpus (offline).")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    from .prepare import add_prepare_parser

    add_prepare_parser(sub)

    e = sub.add_parser("eval", help="MLM loss, perplexity and masked-token accuracy of a model",
                       description="Evaluate a run (on its validation split) or a model directory (on --data).")
    e.add_argument("path", help="run directory, checkpoint directory or HF BERT directory")
    e.add_argument("--data", nargs="+", default=[], metavar="PATH", help="evaluate on this text instead")
    e.add_argument("--seq-len", type=int, default=None, help="row length (default: the run's, or 128)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: the run's --batch-size, so the masks match its validation; "
                        "else 32)")
    e.add_argument("--batches", type=int, default=0, help="evaluate at most this many batches (0 = all)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_eval)

    f = sub.add_parser("fill", help="top-k predictions for each [MASK] in a text",
                       description='Example: mlmfast fill runs/default "The [MASK] sat on the mat."')
    f.add_argument("path", help="run directory, checkpoint directory or HF BERT directory")
    f.add_argument("text", help="text with one or more [MASK] tokens")
    f.add_argument("--top-k", type=int, default=5)
    f.add_argument("--device", default="auto")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=cmd_fill)

    tk = sub.add_parser("tokenizer", help="train a WordPiece tokenizer, or encode text with one",
                        description="Train a WordPiece tokenizer (HF-compatible directory) or encode text.")
    tsub = tk.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    tt = tsub.add_parser("train", help="train a WordPiece tokenizer on a corpus",
                         description="Train a BERT WordPiece tokenizer with the `tokenizers` library.")
    tt.add_argument("--data", nargs="+", default=[], metavar="PATH",
                    help="text files, directories or .jsonl (default: the built-in corpus)")
    tt.add_argument("--out", required=True, help="directory to write tokenizer.json, vocab.txt, ...")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.add_argument("--cased", action="store_true", help="keep case (default: lowercase, as bert-base-uncased)")
    tt.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    tt.set_defaults(func=cmd_tokenizer_train)
    te = tsub.add_parser("encode", help="show the tokens and ids of a text",
                         description="Encode a text with [CLS]/[SEP], printing tokens and ids.")
    te.add_argument("dir", help="tokenizer, model or run directory holding tokenizer.json or vocab.txt")
    te.add_argument("text")
    te.add_argument("--json", action="store_true")
    te.set_defaults(func=cmd_tokenizer_encode)

    i = sub.add_parser("info", help="versions, device, and which fast kernels are active (and why not)",
                       description="Print library versions, the device, and each op's active implementation.")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    # Every argument after `bench` goes to the suite's own parser (`mlmfast bench --help` prints its help); a
    # prefix character no option uses keeps argparse from reading them as options of this parser.
    b = sub.add_parser("bench", help="benchmarks: ops and training steps, fast vs reference vs HF (needs the repo)",
                       add_help=False, prefix_chars="\0")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    # --debug also after the command (`mlmfast train ... --debug`); SUPPRESS keeps the top-level value otherwise
    for parser in [*sub.choices.values(), *tsub.choices.values()]:
        if parser is not b and parser is not tk:
            parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="show tracebacks for errors")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `mlmfast info --json | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a path that cannot be written or read, a full disk: one line, not a traceback
        if args.debug:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}; check the path and free space (--debug shows the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from .trainer import TrainingStopped

        if isinstance(exc, TrainingStopped):
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops: rank 0 says so
                print(str(exc), file=sys.stderr)
        elif args.command == "train":
            print(f"interrupted; `mlmfast train --resume auto --out {args.out}` continues from the last checkpoint "
                  "(if one was written)", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
