"""MLM trainer: AdamW + warmup/decay, clipping, accumulation, autocast, evaluation, checkpoints, exact resume.

Run directory layout (everything a user or the next run needs):
    train_config.json          the TrainConfig of the run (resume re-reads it)
    tokenizer/                 the tokenizer (trained on the corpus, or copied from --tokenizer / --model)
    checkpoints/step-000100/   HF-format weights (config.json, model.safetensors, tokenizer files) +
                               trainer_state.pt (optimizer, scheduler, RNG states, data position, step)
    model/                     the final model, HF format: `BertForMaskedLM.from_pretrained` loads it
    metrics.jsonl              one JSON object per log line (train and val)
    loss.png                   training and validation loss curves

Determinism: the rows of optimizer step s are masked with the seed `mask_seed(cfg.seed, s)` and each row's index
in the step's global batch (the kernel's row offset), so the masks, like the data, do not depend on how the
global batch is cut into micro-batches and ranks; the data order of epoch e is a permutation seeded by (seed, e), and the torch
RNG state of every rank (dropout) is checkpointed, so a resumed run sees the same batches, masks and dropout as
an uninterrupted one: killed with SIGKILL at any moment and resumed with `--resume auto`, a CPU fp32 run ends
with bit-identical weights (tests/test_crash_resume.py).

Loss: the mean cross-entropy over every masked token of the optimizer step's global batch (all micro-batches
of all ranks), so gradient accumulation and data parallelism give the gradients of one big batch.

Data parallelism (torchrun; DDP or FSDP2) and its contract: mlmfast/distributed.py. Crash-safe checkpoints:
mlmfast/checkpoint.py. A step whose loss or gradients are not finite is skipped (weights and optimizer state
untouched) and counted; `max_bad_steps` of them in a row stop the run with the last good checkpoint kept.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ._io import atomic_savefig, atomic_write_json, atomic_write_text, replace_dir
from .checkpoint import (CKPT_PREFIX, STATE_FILE, checkpoint_dirs, latest_valid_checkpoint, save_checkpoint,
                         verify_checkpoint)
from .config import PRESETS, ModelConfig
from .errors import UserError

# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list)  # files/dirs/.jsonl; empty = the built-in corpus
    out_dir: str = "runs/default"  # run directory (created; --resume continues it)
    seq_len: int = 128  # tokens per row, [CLS] and [SEP] included
    pack: bool = True  # pack documents across rows (False: one document per row, padded)
    val_fraction: float = 0.05  # share of documents held out for validation
    num_workers: int = 0  # DataLoader worker processes
    # model and tokenizer
    model: str = "bert-mini"  # a preset name, or a model directory to continue from (domain adaptation)
    tokenizer: Optional[str] = None  # tokenizer directory; None = train one on the corpus (or the model's own)
    vocab_size: int = 8192  # size of a tokenizer trained here
    attn_implementation: str = "sdpa"  # "sdpa" or "eager" (the explicit-softmax reference)
    path: str = "fast"  # training step: "fast" (sparse head, fused kernels; mlmfast.fast) or "reference" (full logits)
    dropout: Optional[float] = None  # override hidden and attention dropout (None = the config's 0.1)
    # masking
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    masking_mode: str = "bernoulli"  # "bernoulli" (HF) or "exact" (original BERT)
    whole_word: bool = False  # whole-word masking
    # optimisation
    max_steps: int = 600  # optimizer steps (the quick start: ~3 min on 2 CPU cores)
    batch_size: int = 16  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    warmup_steps: Optional[int] = None  # None = 6% of max_steps
    schedule: str = "linear"  # "linear", "cosine" or "constant" after warmup
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    clip_grad_norm: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # "auto" (bf16 on CUDA if supported, else fp16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 100  # optimizer steps between evaluations (and at step 0 and the end)
    eval_batches: int = 20  # validation batches per evaluation (0 = the whole split)
    log_every: int = 10
    save_every: int = 200  # optimizer steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    progress: bool = True  # tqdm progress bar
    # robustness and scale-out
    max_bad_steps: int = 10  # non-finite steps in a row (skipped) before the run stops
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on GPU too)
    strategy: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (FSDP2 fully_shard)
    compile: bool = False  # torch.compile the training forward (the fast path has no graph break; builds ~1 min)

    def validate(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise UserError(f"mlm_probability={self.mlm_probability} must be in (0, 1), e.g. 0.15")
        if self.mask_replace_prob < 0 or self.random_replace_prob < 0:
            raise UserError("mask_replace_prob and random_replace_prob must be >= 0")
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-12:
            raise UserError(f"mask_replace_prob + random_replace_prob = "
                            f"{self.mask_replace_prob + self.random_replace_prob:g} > 1; they are shares of "
                            "the selected tokens (BERT uses 0.8 and 0.1)")
        if self.path not in ("fast", "reference"):
            raise UserError(f"path {self.path!r} is not known; use 'fast' or 'reference'")
        if self.masking_mode not in ("bernoulli", "exact"):
            raise UserError(f"masking mode {self.masking_mode!r} is not known; use 'bernoulli' or 'exact'")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise UserError(f"schedule {self.schedule!r} is not known; use linear, cosine or constant")
        if self.strategy not in ("ddp", "fsdp"):
            raise UserError(f"strategy {self.strategy!r} is not known; use ddp or fsdp")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"precision {self.precision!r} is not known; use auto, fp32, bf16 or fp16")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every", "save_every",
                     "keep_checkpoints", "seq_len", "vocab_size", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.seq_len < 3:
            raise UserError(f"seq-len={self.seq_len} is too short: a row needs [CLS], a token and [SEP]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val-fraction={self.val_fraction} must be in [0, 1)")
        if self.lr <= 0:
            raise UserError(f"lr={self.lr} must be > 0")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")
        if self.model not in PRESETS and not os.path.isdir(self.model):  # before any tokenizing
            raise UserError(f"--model {self.model!r} is neither a preset ({', '.join(PRESETS)}) nor a model "
                            "directory")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "adam_betas" in kw:
            kw["adam_betas"] = tuple(kw["adam_betas"])
        return cls(**kw)


def mask_seed(seed: int, micro_step: int) -> int:
    """The masking seed of one micro-batch: a pure function of (run seed, micro-step), so resume needs no state."""
    return (seed * 1_000_003 + micro_step * 7919 + 17) % (2**63 - 1)


EVAL_MASK_SEED = 1234  # validation batches are masked the same way at every evaluation

# ---------------------------------------------------------------------------------------------------------
# Devices, precision, optimizer and schedule
# ---------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"device {name!r} is not valid ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "fp16":
            raise UserError("fp16 autocast needs a CUDA device; use --precision fp32 or bf16 on CPU")
        return torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights (BERT's recipe); the fused kernel (CUDA, CPU)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    if device.type in ("cuda", "cpu"):
        kw["fused"] = True  # one kernel per step on CUDA and CPU (HF Trainer's default too): ~4x the foreach on CPU
    return torch.optim.AdamW(groups, **kw)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, int(0.06 * cfg.max_steps))
    total = cfg.max_steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return f


# ---------------------------------------------------------------------------------------------------------
# One step and evaluation (the seams where the fast path plugs in)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MaskingSpec:
    mask_token_id: int
    vocab_size: int
    special_token_ids: list[int]
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    mode: str = "bernoulli"

    @classmethod
    def from_config(cls, cfg: TrainConfig, tokenizer) -> "MaskingSpec":
        return cls(tokenizer.mask_token_id, tokenizer.vocab_size, list(tokenizer.special_token_ids),
                   cfg.mlm_probability, cfg.mask_replace_prob, cfg.random_replace_prob, cfg.masking_mode)

    def apply(self, batch: dict[str, torch.Tensor], seed: int, row_offset: int = 0):
        """Mask a batch. row_offset = the index of its first row in the global batch (data parallelism): with
        the counter-based kernel a row's mask depends on (seed, row_offset + row), not on the rank count."""
        from .masking import mask_tokens

        return mask_tokens(
            batch["input_ids"], self.mask_token_id, self.vocab_size,
            special_token_ids=self.special_token_ids, attention_mask=batch["attention_mask"],
            word_ids=batch.get("word_ids"), mlm_probability=self.mlm_probability,
            mask_replace_prob=self.mask_replace_prob, random_replace_prob=self.random_replace_prob,
            mode=self.mode, seed=seed, row_offset=row_offset,
        )


NUM_TOKENS_KEY = "num_tokens"  # a device batch's real-token count (a Python int from the host), under --compile


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def mlm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of CE over labelled positions, number of labelled positions, number predicted right)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss_sum = torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    sel = flat_labels != -100
    correct = ((flat_logits.argmax(-1) == flat_labels) & sel).sum()
    return loss_sum, sel.sum(), correct


def train_forward(model, path: str, masked, attention_mask: torch.Tensor, num_tokens: Optional[int] = None,
                  lengths: Optional[torch.Tensor] = None):
    """The model call of one training micro-step. Fast path: the compact targets (positions / position_labels,
    no compaction, no host sync); reference path: dense labels and full logits. Same targets, same loss.
    num_tokens (fast path): the batch's real-token count from the host, so that a padded batch runs the dense ops
    on its real tokens (`fast.unpad_plan`). The training loop passes it under --compile only: in the eager GPU
    step, bound by the host's launch rate, unpadding measured slower on an H200 (NOTES.md); eager on the CPU
    the model counts for free itself. lengths (fast path): the rows' lengths, which the attention_mask right-pads
    (our batches always do): the fused attention takes them instead of a per-key mask."""
    if path == "fast":
        extra = {} if num_tokens is None else {"num_tokens": num_tokens}
        if lengths is not None:
            extra["lengths"] = lengths
        return model(masked.input_ids, attention_mask=attention_mask, positions=masked.positions,
                     position_labels=masked.position_labels, **extra)
    return model(masked.input_ids, attention_mask=attention_mask, labels=masked.labels)


@torch.no_grad()
def evaluate(model, loader, spec: MaskingSpec, device: torch.device, max_batches: int = 0,
             autocast_dtype: Optional[torch.dtype] = None, env=None) -> dict[str, float]:
    """Token-weighted MLM loss, perplexity and masked-token accuracy over (up to max_batches of) a loader.

    Validation batches are masked with fixed seeds, so successive evaluations see the same masked tokens. With
    the counter-based masking kernel (C++ twin / CUDA) a row's mask depends on (seed, its index in the loader's
    row order) only, so the numbers do not depend on the batch size either; the PyTorch fallback seeds per batch.
    Always the reference computation, whatever the training path, so validation numbers of fast and reference
    runs are comparable; its MLM head runs on the masked rows only (`head_at_labels_only`: the same numbers as
    full logits, without a (B, L, V) logits tensor, which with a large vocabulary would need more memory than
    the training step). Data parallel (`env` of
    mlmfast.distributed): every rank iterates the same loader and computes batches i = rank (mod world size);
    the sums are all-reduced, so every rank returns the single-process numbers. Ranks with one batch fewer run
    one discarded forward, as FSDP2 needs every rank in every forward."""
    from .distributed import DistEnv

    from .ops import mask_select_backend

    env = env or DistEnv()
    per_row = mask_select_backend(device) != "torch"  # counter-based: row r's mask = f(seed, r)
    was_training = model.training
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, labelled tokens, correct
    own, n_batches, spare, row0 = 0, 0, None, 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        n_batches += 1
        spare = batch if spare is None else spare
        first_row, row0 = row0, row0 + int(batch["input_ids"].shape[0])
        if i % env.world_size != env.rank:
            continue
        batch = to_device(batch, device)
        if per_row:
            masked = spec.apply(batch, seed=EVAL_MASK_SEED, row_offset=first_row)
        else:
            masked = spec.apply(batch, seed=EVAL_MASK_SEED + i)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(masked.input_ids, attention_mask=batch["attention_mask"], labels=masked.labels,
                        head_at_labels_only=True)  # logits (N, V): the masked rows, row-major
        loss_sum, n, ok = mlm_loss_sum(out.logits, masked.labels[masked.labels != -100])
        tot += torch.stack([loss_sum.double(), n.double(), ok.double()])
        own += 1
    if env.enabled:
        for _ in range(-(-n_batches // env.world_size) - own):  # FSDP: same number of forwards on every rank
            b = to_device(spare, device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(b["input_ids"], attention_mask=b["attention_mask"], labels=torch.full_like(b["input_ids"], -100),
                      head_at_labels_only=True)  # nothing labelled: the encoder only
        env.all_reduce_sum_(tot)
    model.train(was_training)
    loss_sum, n, ok = tot.tolist()
    n = int(n)
    if n == 0:
        raise UserError("the validation split has no maskable tokens; use more data or a larger --val-fraction")
    loss = loss_sum / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": int(ok) / n, "val_tokens": n}


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

def _rng_state(device: torch.device) -> dict[str, Any]:
    import random

    import numpy as np

    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    import random

    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# ---------------------------------------------------------------------------------------------------------
# Metrics and plots
# ---------------------------------------------------------------------------------------------------------


class MetricsLog:
    def __init__(self, path: str, truncate_after_step: Optional[int] = None):
        self.path = path
        if truncate_after_step is not None and os.path.exists(path):
            # A resumed run rewrites what came after its checkpoint, so the log has no duplicate steps.
            rows = [r for r in self.rows() if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        elif truncate_after_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """The logged rows; a line torn by a killed process is skipped."""
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out


def plot_metrics(rows: list[dict[str, Any]], path: str, title: str = "") -> Optional[str]:
    """Training loss (raw and smoothed) and validation loss / accuracy against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    if not train and not val:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        xs = [r["step"] for r in train]
        ys = [r["loss"] for r in train]
        ax1.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="train (per log interval)")
        k = max(1, len(ys) // 20)
        sm = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        ax1.plot(xs, sm, color="tab:blue", lw=2, label="train (smoothed)")
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange", label="validation")
        ax2.plot([r["step"] for r in val], [100 * r["val_acc"] for r in val], "o-", color="tab:green")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("MLM loss (nats / masked token)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("masked-token accuracy (%)")
    ax2.set_title("validation accuracy")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Building the pieces of a run
# ---------------------------------------------------------------------------------------------------------


def load_documents(data: list[str]) -> tuple[list[str], str]:
    from .data import builtin_corpus, read_corpus

    if data:
        return read_corpus(list(data)), ", ".join(data)
    return builtin_corpus(), "built-in corpus (Python documentation + standard-library docstrings)"


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def prepare_tokenizer(cfg: TrainConfig, run_dir: str, fallback: Callable[[], Any],
                      check: Optional[Callable[[Any], None]] = None, reuse_own: bool = True):
    """The run's tokenizer: the run's own (resume), --tokenizer, the --model directory's, or `fallback()` (a
    tokenizer trained on the corpus, or the prepared shards' own). `check(tok)` runs before a new choice is saved
    into RUN/tokenizer, so a rejected tokenizer never becomes the run's. reuse_own=False (a new run): a
    RUN/tokenizer left by an attempt that failed before its first checkpoint is replaced, not reused."""
    from .tokenizer import MLMTokenizer

    own = os.path.join(run_dir, "tokenizer")
    if reuse_own and os.path.isfile(os.path.join(own, "tokenizer.json")):
        tok = MLMTokenizer.load(own)
        if check is not None:
            check(tok)
        return tok
    if cfg.tokenizer:
        tok = MLMTokenizer.load(cfg.tokenizer)
    elif cfg.model not in PRESETS and _is_model_dir(cfg.model):
        tok = MLMTokenizer.load(cfg.model)
    else:
        tok = fallback()
    if check is not None:
        check(tok)
    tok.save(own)
    return tok


def build_run_data(cfg: TrainConfig, run_dir: str, log: Callable[[str], None], env=None, reuse_own: bool = True):
    """(train dataset, val dataset (may be empty), tokenizer, description) of a run. `--data DIR` holding a
    `mlmfast prepare` manifest streams memory-mapped shards (checked against the run's tokenizer); anything else
    is read and tokenized in memory. Under torchrun rank 0 trains/saves the tokenizer, the others load it."""
    from .data import build_datasets
    from .distributed import DistEnv
    from .prepare import PreparedCorpus, is_prepared_dir
    from .tokenizer import MLMTokenizer

    env = env or DistEnv()
    t0 = time.time()

    def run_tokenizer(fallback, check=None):  # rank 0 chooses (and saves) it, the others load what it saved
        tok = prepare_tokenizer(cfg, run_dir, fallback, check, reuse_own) if env.is_main else None
        env.barrier()
        return tok if tok is not None else MLMTokenizer.load(os.path.join(run_dir, "tokenizer"))

    if len(cfg.data) == 1 and is_prepared_dir(cfg.data[0]):
        corpus = PreparedCorpus(cfg.data[0])
        if cfg.whole_word:
            raise UserError("--whole-word needs word boundaries, which prepared shards do not keep; train on the "
                            "text files instead, or drop --whole-word")
        tok = run_tokenizer(corpus.tokenizer, corpus.check_tokenizer)
        train_ds = corpus.dataset("train", seq_len=cfg.seq_len, pack=cfg.pack)
        val_ds = corpus.dataset("val", seq_len=cfg.seq_len, pack=cfg.pack)
        source = f"prepared shards in {cfg.data[0]}"
        if cfg.val_fraction != TrainConfig.val_fraction:
            log(f"note: --val-fraction {cfg.val_fraction} has no effect on prepared shards: their validation "
                f"split was chosen by `mlmfast prepare` (--val-fraction there; this one holds "
                f"{corpus.manifest['splits']['val']['documents']} documents)")
    else:
        documents, source = load_documents(cfg.data)
        bad = getattr(documents, "replaced_chars", 0)
        source = f"{source}: {len(documents)} documents" + \
            (f" ({bad} invalid UTF-8 sequence(s) replaced with U+FFFD)" if bad else "")

        def train_here():
            from .tokenizer import train_tokenizer

            t = time.time()
            tok = train_tokenizer(documents, vocab_size=cfg.vocab_size)
            log(f"trained a WordPiece tokenizer: {tok.vocab_size} tokens in {time.time() - t:.1f}s")
            return tok

        tok = run_tokenizer(train_here)
        train_ds, val_ds = build_datasets(documents, tok, seq_len=cfg.seq_len, pack=cfg.pack,
                                          val_fraction=cfg.val_fraction, seed=cfg.seed, whole_word=cfg.whole_word)
    log(f"data: {source} -> {len(train_ds):,} train rows, {len(val_ds):,} validation rows of {cfg.seq_len} tokens "
        f"({time.time() - t0:.1f}s)")
    return train_ds, val_ds, tok, source


def build_model(cfg: TrainConfig, tokenizer):
    return _build_model(cfg, tokenizer).set_path(cfg.path)


def _build_model(cfg: TrainConfig, tokenizer):
    from .model import BertForMLM

    if cfg.model in PRESETS:
        overrides: dict[str, Any] = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                                         max_position_embeddings=max(512, cfg.seq_len),
                                         attn_implementation=cfg.attn_implementation)
        if cfg.dropout is not None:
            overrides.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        return BertForMLM(ModelConfig.from_preset(cfg.model, **overrides))
    if not os.path.isdir(cfg.model):
        raise UserError(f"--model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    model = BertForMLM.from_pretrained(cfg.model, attn_implementation=cfg.attn_implementation)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {cfg.model} has "
                        f"vocab_size={model.config.vocab_size}: use the model's own tokenizer")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} > max_position_embeddings="
                        f"{model.config.max_position_embeddings} of {cfg.model}; use a shorter --seq-len")
    if cfg.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
    return model


# ---------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: str
    model_dir: str
    plot: Optional[str]
    steps: int
    first_val: Optional[dict[str, float]]
    last_val: Optional[dict[str, float]]
    seconds: float
    tokens_per_s: float
    train_losses: list[float]  # the loss of every optimizer step of this invocation


def _print(msg: str) -> None:
    print(msg, flush=True)


class NonFiniteError(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training: the run stopped at a step boundary with a checkpoint (str: what to do)."""


class _StopRequest:
    """SIGINT / SIGTERM during training: the first asks the loop to stop at a step boundary with a checkpoint, a
    second stops at once (KeyboardInterrupt).

    One process: it stops after the current step. Several (torchrun): every rank gets the signal (Ctrl-C reaches
    the whole process group, and torchrun forwards the SIGINT / SIGTERM it gets to its workers), maybe during
    different steps, so the ranks agree at the next check point, a step every rank visits (every step on the CPU,
    every --log-every steps on CUDA, where the loop syncs anyway): an all-reduce (max) of the flag. There, a repeat
    within REPEAT_WINDOW_S of the first signal is the same request (Ctrl-C under torchrun arrives twice: the
    terminal's SIGINT, then torchrun's forward). torchrun kills its workers 30 s after forwarding a SIGTERM."""

    REPEAT_WINDOW_S = 2.0

    def __init__(self, world_size: int, say: Callable[[str], None]):
        import signal
        import threading

        self.requested = False
        self._multi = world_size > 1
        self._first = 0.0
        self._say = say
        self._pid = os.getpid()  # DataLoader workers fork with this handler: they leave the stop to the trainer
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        now = time.monotonic()
        if self.requested:
            if self._multi and now - self._first < self.REPEAT_WINDOW_S:
                return
            raise KeyboardInterrupt
        self.requested, self._first = True, now
        where = "at the next step all processes check (within --log-every steps on a GPU)" if self._multi else \
            "after this step"
        self._say(f"stopping {where}; a checkpoint is written; press Ctrl-C again to stop at once")

    def agreed(self, env, device: torch.device) -> bool:
        """Stop now? Several processes: call it at the same steps on every rank (a collective and a host sync)."""
        if not self._multi:
            return self.requested
        flag = torch.full((1,), int(self.requested), dtype=torch.int32, device=device)
        return bool(env.all_reduce_max_(flag).item())

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _resolve_resume(resume, run_dir: str, log: Callable[[str], None]) -> tuple[bool, Optional[str], str]:
    """(resume at all, the checkpoint to load or None, run_dir) for resume = False | True | "latest" | "auto" |
    a checkpoint directory. "auto" continues the run in run_dir from its newest valid checkpoint if there is a
    run there, else starts one; True/"latest" require a run; a path names one checkpoint, which must verify."""
    if resume in (False, None, ""):
        return False, None, run_dir
    if resume is True or resume == "latest" or resume == "auto":
        if not os.path.isfile(os.path.join(run_dir, "train_config.json")):
            if resume == "auto":
                return False, None, run_dir
            raise UserError(f"--resume: {run_dir} is not a run directory (no train_config.json); start a new run "
                            "without --resume, or use --resume auto to start one when there is none")
        return True, latest_valid_checkpoint(run_dir, log, set_aside_corrupt=True), run_dir
    path = os.path.normpath(str(resume))
    if not os.path.isdir(path) or not os.path.basename(path).startswith(CKPT_PREFIX):
        raise UserError(f"--resume {resume}: not a checkpoint directory (RUN/checkpoints/{CKPT_PREFIX}NNNNNN); "
                        "use --resume auto to take the newest valid checkpoint of --out")
    verify_checkpoint(path)
    return True, path, os.path.dirname(os.path.dirname(path))


def train(cfg: TrainConfig, resume: bool | str = False, log: Callable[[str], None] = _print,
          stop_after: Optional[int] = None, explicit: Optional[set[str]] = None) -> TrainResult:
    """Train (or resume) a run described by `cfg`. resume: False, True / "latest" (the newest valid checkpoint of
    cfg.out_dir), "auto" (that, or a new run when cfg.out_dir holds none) or a checkpoint directory.
    `stop_after` ends this invocation after that optimizer step, with a checkpoint, as if the process had been
    stopped there (used by the resume tests). Under torchrun (WORLD_SIZE > 1) this is one rank of a
    data-parallel run: see mlmfast/distributed.py. `explicit`: on resume, the only fields of `cfg` that may
    replace the run's saved ones (the CLI passes the flags the user typed; None = every resumable field)."""
    from .distributed import setup_distributed, shutdown_distributed

    started = not torch.distributed.is_available() or not torch.distributed.is_initialized()
    env, dist_device = setup_distributed(cfg.device)
    # --deterministic switches a process-wide mode on: put it back afterwards, so a caller's later work (another
    # run, a test in the same process) does not inherit it
    det = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas_ws = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        return _train(cfg, resume, log if env.is_main else (lambda msg: None), stop_after, env, dist_device, explicit)
    finally:
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
        if cublas_ws is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if started:
            shutdown_distributed(env)


RESUMABLE = ("max_steps", "progress", "eval_every", "log_every", "save_every", "keep_checkpoints", "num_workers",
             "device", "max_bad_steps", "compile")  # what a resume may change; everything else defines the run
COMPILE_BACKEND_ENV = "MLMFAST_COMPILE_BACKEND"  # torch.compile backend for --compile (default inductor; tests:
# aot_eager, which traces the same graphs without generating code)


def _train(cfg: TrainConfig, resume, log: Callable[[str], None], stop_after: Optional[int], env,
           dist_device: Optional[torch.device], explicit: Optional[set[str]] = None) -> TrainResult:
    from .data import make_loader
    from .distributed import (full_model_state, full_optimizer_state, is_fsdp, load_full_model_state,
                              load_full_optimizer_state, unwrap, wrap_model)
    from .model import BertForMLM

    # Rank 0 inspects the run directory (a disk shared by all ranks) and tells the others what it chose.
    resume, ckpt, run_dir = env.broadcast_object(_resolve_resume(resume, cfg.out_dir, log) if env.is_main else None)
    if explicit is not None and "out_dir" in explicit and os.path.abspath(cfg.out_dir) != os.path.abspath(run_dir):
        raise UserError(f"--resume {ckpt} continues its own run in {run_dir}, not --out {cfg.out_dir}: drop --out, "
                        f"or start a new run from those weights with --model {ckpt} --out {cfg.out_dir}")
    cfg_path = os.path.join(run_dir, "train_config.json")
    if resume:
        with open(cfg_path) as f:
            saved = TrainConfig.from_json(json.load(f))
        # Everything that defines the run comes from the saved config; the step budget and logging may change
        # (only where asked: a bare `--resume auto --out RUN` keeps the run's own --max-steps etc.).
        keep = {k: getattr(cfg, k) for k in RESUMABLE if explicit is None or k in explicit}
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        ignored = sorted(k for k in (explicit or ()) if k in fields and k not in RESUMABLE and k != "out_dir"
                         and getattr(cfg, k) != getattr(saved, k))
        if ignored:
            log("resume: the run's own settings are kept for " + ", ".join(
                f"{k} ({getattr(saved, k)!r}, not {getattr(cfg, k)!r})" for k in ignored))
        cfg = dataclasses.replace(saved, **keep)
        cfg.out_dir = run_dir
    cfg.validate()
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        if not resume and checkpoint_dirs(run_dir):
            raise UserError(f"{run_dir} already holds a run; pass --resume auto to continue it or choose another "
                            "--out")
        atomic_write_json(cfg_path, cfg.to_json())
    env.barrier()

    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = dist_device if dist_device is not None else resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)

    torch.manual_seed(cfg.seed)  # every rank builds the same model
    train_ds, val_ds, tokenizer, source = build_run_data(cfg, run_dir, log, env, reuse_own=bool(resume))
    B, W = cfg.batch_size, env.world_size
    per_step = B * cfg.grad_accum * W
    if len(train_ds) < B * W:
        raise UserError(f"only {len(train_ds)} training rows for --batch-size {B}"
                        f"{f' x {W} processes' if W > 1 else ''}: use a smaller --batch-size or more data")

    # FSDP2 + bf16: gather the weights in bf16 (MixedPrecisionPolicy), gradients reduced in fp32. fp16 keeps fp32
    # gathers: its GradScaler unscales fp32 gradients.
    fsdp_param_dtype = amp_dtype if cfg.strategy == "fsdp" and amp_dtype == torch.bfloat16 else None
    model = wrap_model(build_model(cfg, tokenizer).to(device), env, cfg.strategy, device, fsdp_param_dtype)
    core = unwrap(model)  # the BertForMLM (the same module under FSDP2)
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    step_model = compile_for_training(model, cfg, log)  # what the training forward calls; `model` for the rest
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    spec = MaskingSpec.from_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed + 1_000_003 * env.rank)  # dropout: a different stream per rank
    from .ops import mask_select_backend

    # The counter-based kernel keys a row's mask by (step seed, row's index in the step's global batch), so the
    # masks do not depend on how the global batch is cut into micro-batches and ranks. The reference fallback
    # draws from a generator instead: there every micro-batch of every rank gets a seed of its own.
    split_invariant = mask_select_backend(device) != "torch"

    step, skipped_total = 0, 0
    if resume and ckpt:
        state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False)
        if state.get("train_rows") != len(train_ds) or state.get("tokenizer") != tokenizer.fingerprint():
            raise UserError(f"the data or tokenizer changed since {ckpt} was written "
                            f"({state.get('train_rows')} rows then, {len(train_ds)} now); resume needs the same data")
        if state.get("world_size", 1) != W or state.get("strategy", cfg.strategy) != cfg.strategy:
            raise UserError(f"{ckpt} was written by {state.get('world_size', 1)} process(es) with "
                            f"{state.get('strategy', 'ddp')}; resume with the same torchrun --nproc_per_node and "
                            "--strategy (the data order and masks depend on them)")
        load_full_model_state(model, BertForMLM.from_pretrained(ckpt).state_dict())
        load_full_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng_per_rank") or [state["rng"]]
        _set_rng_state(rngs[env.rank], device)
        step = int(state["step"])
        skipped_total = int(state.get("skipped_steps", 0))
        log(f"resumed from {ckpt} at step {step}")
    elif resume:
        log(f"--resume: no valid checkpoint in {run_dir} yet; starting from step 0")

    n_params = sum(p.numel() for p in {id(p): p for p in core.parameters()}.values())  # DTensors: global sizes
    log(f"model: {cfg.model} (~{n_params / 1e6:.1f}M parameters) on {device}"
        f"{'' if amp_dtype is None else ' with ' + str(amp_dtype).replace('torch.', '') + ' autocast'}"
        f"{f', {W} processes ({cfg.strategy}, {env.backend})' if W > 1 else ''}"
        f"{', FSDP2 gathers bf16 weights, reduces fp32 gradients' if W > 1 and fsdp_param_dtype is not None else ''}; "
        f"{cfg.max_steps} steps of {per_step} x {cfg.seq_len} tokens")

    # A resume keeps the log up to its checkpoint's step; a run (re)started at step 0 begins a new log.
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), truncate_after_step=step if step > 0 else None) \
        if env.is_main else None
    val_loader = make_loader(val_ds, B, shuffle=False, drop_last=False, pin_memory=device.type == "cuda") \
        if len(val_ds) else None

    def run_eval(at_step: int) -> Optional[dict[str, float]]:
        if val_loader is None:
            return None
        r = evaluate(model, val_loader, spec, device, cfg.eval_batches, amp_dtype, env)
        if metrics is not None:
            metrics.write({"split": "val", "step": at_step, **r})
        return r

    first_val = None
    if step == 0:
        first_val = run_eval(0)
        if first_val:
            log(f"step 0: val loss {first_val['val_loss']:.3f}, accuracy {100 * first_val['val_acc']:.1f}%")
    elif metrics is not None:
        prev = [r for r in metrics.rows() if r.get("split") == "val"]
        first_val = prev[0] if prev else None

    batches_per_epoch = len(train_ds) // (B * W)  # global batches
    micro = step * cfg.grad_accum  # micro-batches (global) consumed so far
    epoch, start_batch = divmod(micro, batches_per_epoch)

    def batches():
        nonlocal epoch, start_batch
        while True:
            loader = make_loader(train_ds, B, shuffle=True, seed=cfg.seed, epoch=epoch, num_workers=cfg.num_workers,
                                 drop_last=True, start_batch=start_batch, rank=env.rank, world_size=W,
                                 pin_memory=device.type == "cuda")  # a CPU run on a GPU host opens no context
            for b in loader:
                yield b
            epoch, start_batch = epoch + 1, 0

    def save(at_step: int) -> str:
        model_state = full_model_state(model) if is_fsdp(model) else None  # collectives: every rank
        optim_state = full_optimizer_state(model, optimizer)
        rngs = env.gather_object(_rng_state(device))
        path = ""
        if env.is_main:
            def write(tmp: str) -> None:
                _save_full_model(core, model_state, tmp, tokenizer)
                torch.save({
                    "step": at_step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "rng": rngs[0],
                    "rng_per_rank": rngs, "train_rows": len(train_ds), "tokenizer": tokenizer.fingerprint(),
                    "epoch": epoch, "micro_step": micro, "world_size": W, "strategy": cfg.strategy,
                    "skipped_steps": skipped_total,
                }, os.path.join(tmp, STATE_FILE))

            path = save_checkpoint(run_dir, at_step, write, cfg.keep_checkpoints)
        return env.broadcast_object(path)  # also waits for rank 0 to finish writing

    from tqdm.auto import tqdm

    end_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and env.is_main), unit="step",
               dynamic_ncols=True, desc="train")
    say = bar.write if cfg.progress and env.is_main else log  # a line that does not break the progress bar
    it = batches()
    last_val = None
    losses: list[float] = []
    t_start = time.time()
    tokens_seen = 0
    win_tokens, win_t = 0, time.time()
    pending: list[torch.Tensor] = []
    bad_run = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps in a row (device: no sync)
    worst_run = torch.zeros((), dtype=torch.int64, device=device)  # longest such run since the last check
    bad_count = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps since the last check
    check_every = 1 if device.type == "cpu" else cfg.log_every  # on CUDA: only where the log syncs anyway
    last_ckpt = ckpt

    def check_bad_steps() -> None:
        nonlocal skipped_total
        n_bad, worst = (int(x) for x in torch.stack([bad_count, worst_run]).tolist())
        bad_count.zero_()
        worst_run.copy_(bad_run)
        if n_bad:
            skipped_total += n_bad
            say(f"step {step}: skipped {n_bad} step(s) with a non-finite loss or gradient "
                f"({skipped_total} in this run)")
        if worst >= cfg.max_bad_steps:
            raise NonFiniteError(
                f"{worst} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient and were "
                f"skipped, so the run stopped (--max-bad-steps {cfg.max_bad_steps}). The weights were not updated "
                f"by them; the last good checkpoint is {last_ckpt or '(none yet)'}. Lower --lr, raise "
                "--warmup-steps, use --precision bf16 or fp32, or check the data; then resume with --resume auto")

    from .fast import unpads

    stop = _StopRequest(W, say)
    try:
        while step < end_step:
            # 1. Fetch and mask every micro-batch of the step (cheap), so the loss can be normalised by the
            #    number of masked tokens of the whole global batch before any backward.
            micro_batches = []
            for i in range(cfg.grad_accum):
                raw = next(it)
                n_tok = int(raw["lengths"].sum())  # counted on the host copy: no device sync
                batch = to_device(raw, device)
                if cfg.compile and unpads(n_tok, *raw["input_ids"].shape):
                    batch[NUM_TOKENS_KEY] = n_tok  # the host's count: compiled, the dense ops run on the real tokens
                part = i * W + env.rank  # this micro-batch's place in the step's global batch (rows part*B...)
                if split_invariant:
                    masked = spec.apply(batch, seed=mask_seed(cfg.seed, step), row_offset=part * B)
                else:
                    masked = spec.apply(batch, seed=mask_seed(cfg.seed, step * cfg.grad_accum * W + part))
                micro += 1
                micro_batches.append((batch, masked))
                win_tokens += n_tok
            # 2. One optimizer step (forward/backward of every micro-batch, clip, guard, step): no host sync.
            loss_acc, gnorm, bad = train_step(model, optimizer, scaler, micro_batches, cfg.path,
                                              cfg.clip_grad_norm, amp_dtype, env, forward_model=step_model)
            scheduler.step()
            step += 1
            bad_i = bad.to(torch.int64)
            bad_run.mul_(bad_i).add_(bad_i)
            torch.maximum(worst_run, bad_run, out=worst_run)
            bad_count.add_(bad_i)
            pending.append(loss_acc)  # stays on the device until the next log line: no per-step sync
            bar.update(1)
            at_check = step % check_every == 0 or step == end_step or step % cfg.save_every == 0  # same on every rank
            if at_check:
                check_bad_steps()
            # one process: stop after any step; several: at a check point, when any rank was asked to
            stop_now = stop.agreed(env, device) if (at_check or W == 1) else False
            if step % cfg.log_every == 0 or step == end_step:
                window = env.all_reduce_sum_(torch.stack(pending)) / W
                window = window.tolist()
                losses.extend(window)
                pending.clear()
                dt = max(time.time() - win_t, 1e-9)
                win_tokens = int(env.all_reduce_sum_(torch.tensor(win_tokens, device=device)))  # all ranks
                tokens_seen += win_tokens
                good = [x for x in window if math.isfinite(x)]
                row = {"split": "train", "step": step, "loss": sum(good) / len(good) if good else float("nan"),
                       "lr": scheduler.get_last_lr()[0], "tokens_per_s": win_tokens / dt,
                       "elapsed_s": time.time() - t_start, "grad_norm": float(gnorm), "skipped_steps": skipped_total}
                if metrics is not None:
                    metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
                win_tokens, win_t = 0, time.time()
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                last_val = run_eval(step)
                if last_val:
                    say(f"step {step}: val loss {last_val['val_loss']:.3f}, "
                              f"ppl {last_val['val_ppl']:.1f}, accuracy {100 * last_val['val_acc']:.1f}%")
            if step % cfg.save_every == 0 or step == end_step or stop_now:
                last_ckpt = save(step)
            if stop_now and step < end_step:
                raise TrainingStopped(f"stopped at step {step} of {cfg.max_steps} with a checkpoint ({last_ckpt}); "
                                      f"`mlmfast train --resume auto --out {run_dir}` continues from there")
    except torch.OutOfMemoryError as exc:
        raise UserError(
            f"out of {device.type.upper()} memory at --batch-size {B}, --seq-len {cfg.seq_len} on {device} "
            f"({str(exc).splitlines()[0][:160]}). Use a smaller --batch-size with a larger --grad-accum (same "
            f"global batch: e.g. --batch-size {max(1, B // 2)} --grad-accum {cfg.grad_accum * 2}), a shorter "
            f"--seq-len, or --strategy fsdp under torchrun; then --resume auto continues from "
            f"{last_ckpt or 'the start'}") from None
    finally:
        stop.restore()
        bar.close()
    seconds = time.time() - t_start

    model_dir = os.path.join(run_dir, "model")
    if step >= cfg.max_steps:
        model_state = full_model_state(model) if is_fsdp(model) else None
        if env.is_main:
            for stale in glob.glob(glob.escape(model_dir) + ".tmp-*") + glob.glob(glob.escape(model_dir) + ".old-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while writing the model
            tmp = f"{model_dir}.tmp-{os.getpid()}"
            _save_full_model(core, model_state, tmp, tokenizer)
            replace_dir(tmp, model_dir, aside=f"{model_dir}.old-{os.getpid()}")
        env.barrier()
    plot = None
    if metrics is not None:
        plot = plot_metrics(metrics.rows(), os.path.join(run_dir, "loss.png"),
                            title=f"{cfg.model}, L={cfg.seq_len}, batch {per_step}")
    return TrainResult(run_dir=run_dir, model_dir=model_dir, plot=plot, steps=step, first_val=first_val,
                       last_val=last_val, seconds=seconds, tokens_per_s=tokens_seen / max(seconds, 1e-9),
                       train_losses=losses)


def _save_full_model(core, full_state: Optional[dict[str, torch.Tensor]], directory: str, tokenizer) -> None:
    """Rank 0: write the model in HF format. full_state None: `core` holds every weight (one process, DDP);
    else the gathered FSDP2 state dict (`distributed.full_model_state`), loaded into a model built on "meta"."""
    from .model import BertForMLM

    if full_state is None:
        core.save_pretrained(directory, tokenizer=tokenizer)
        return
    with torch.device("meta"):
        plain = BertForMLM(core.config)
    plain.load_state_dict(full_state, assign=True)
    plain.save_pretrained(directory, tokenizer=tokenizer)


def compile_for_training(model, cfg: TrainConfig, log: Callable[[str], None]):
    """torch.compile(model) for --compile (else model itself). Only the training forward goes through it:
    evaluation, checkpoints and gradient sync use `model`, so state-dict keys and DDP's no_sync are unchanged.
    With FSDP2 it is refused (per-layer compilation of sharded modules is not wired up here)."""
    from .distributed import is_fsdp

    if not cfg.compile:
        if next(model.parameters()).device.type == "cuda" and cfg.path == "fast" and not is_fsdp(model):
            log("tip: --compile runs this step 1.2-1.5x faster on a GPU (BERT-base, H200: NOTES.md) after about a "
                "minute of graph building; without it the step waits on kernel launches")
        return model

    if is_fsdp(model):
        raise UserError("--compile with --strategy fsdp is not supported; use --strategy ddp, or leave out "
                        "--compile")
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    if next(model.parameters()).device.type == "cpu" and cfg.path == "fast":
        log("note: on a CPU the compiled fast step measured slower than the eager one (bert-small, L=128, 2-core "
            "Xeon: 286-443 ms vs 224-354 ms, NOTES.md); --compile pays on a GPU")
    log(f"torch.compile: on (backend {backend}); the first steps build the graphs (about a minute on a GPU; a "
        f"new batch shape, such as a short last batch, builds again; with padded rows the second batch builds "
        f"once more, taking the real-token count as a dynamic size)")
    return torch.compile(model, backend=backend)


def train_step(model, optimizer, scaler, micro_batches, path: str, clip_grad_norm: float,
               amp_dtype: Optional[torch.dtype], env=None,
               forward_model=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over the masked micro-batches [(batch, MaskingOutput), ...] of this rank's part of a
    global batch -> (loss, grad norm, bad) as device scalars: loss = this rank's share of the global mean
    (all-reduce and divide by the world size for the global loss), bad = 1.0 when the step was skipped because
    the loss or the gradient norm was not finite (on any rank). With fp16 loss scaling only a non-finite loss
    counts as bad: gradient overflows are the GradScaler's business (it skips them and lowers the scale).

    The loss is normalised by the masked-token count of the whole global batch (all micro-batches, all ranks;
    all-reduced on the device before the first backward). Gradients are synchronised on the last micro-batch
    only. With the fused AdamW (and with a GradScaler) there is no device->host sync: the skip is the fused
    kernel's found_inf flag. Gradients are zeroed at the end; the scheduler is the caller's. forward_model: what
    the forward calls (torch.compile(model) for --compile; default model)."""
    from .distributed import DistEnv

    env = env or DistEnv()
    W = env.world_size
    device = micro_batches[0][1].input_ids.device
    counts = torch.stack([m.num_selected.sum() for _, m in micro_batches])  # (accum,) masked tokens
    total = env.all_reduce_sum_(counts.sum())
    share = counts.to(torch.float32) * (W / total.clamp(min=1).to(torch.float32))  # (accum,)
    loss_acc = torch.zeros((), device=device)
    for i, (batch, masked) in enumerate(micro_batches):
        with _grad_sync(model, i == len(micro_batches) - 1):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = train_forward(forward_model if forward_model is not None else model, path, masked,
                                    batch["attention_mask"], batch.get(NUM_TOKENS_KEY), batch.get("lengths"))
            loss = out.loss.float() * share[i]  # this micro-batch's part of the global mean
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_acc += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm if clip_grad_norm > 0 else float("inf"))
    if hasattr(gnorm, "full_tensor"):  # FSDP2: a replicated DTensor
        gnorm = gnorm.full_tensor()
    bad = ~torch.isfinite(loss_acc)
    if scaler is None:  # fp16 loss scaling overflows now and then by design: the scaler skips those itself
        bad |= ~torch.isfinite(gnorm)
    bad = env.all_reduce_max_(bad.to(torch.float32))  # every rank skips the same steps
    if scaler is not None:
        scaler.step(optimizer)  # skips non-finite gradients itself (and lowers the scale)
        scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = bad  # the fused kernel leaves weights, moments and step count untouched when 1
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(bad):  # a host sync; only optimizers without the fused kernel get here
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_acc, gnorm, bad


def _grad_sync(model, sync: bool):
    """Context for one micro-batch's backward: gradient all-reduce only when `sync` (the step's last micro-batch).
    DDP: no_sync(); FSDP2: set_requires_gradient_sync; a plain module: nothing to do."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
