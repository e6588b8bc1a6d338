"""MLM trainer: AdamW + warmup/decay, clipping, accumulation, autocast, evaluation, checkpoints, exact resume.

Run directory layout (everything a user or the next run needs):
    train_config.json          the TrainConfig of the run (resume re-reads it)
    tokenizer/                 the tokenizer (trained on the corpus, or copied from --tokenizer / --model)
    checkpoints/step-000100/   HF-format weights (config.json, model.safetensors, tokenizer files) +
                               trainer_state.pt (optimizer, scheduler, RNG states, data position, step)
    model/                     the final model, HF format: `BertForMaskedLM.from_pretrained` loads it
    metrics.jsonl              one JSON object per log line (train and val)
    loss.png                   training and validation loss curves

Determinism: the masking of micro-step s uses the seed `mask_seed(cfg.seed, s)`, the data order of epoch e is
a permutation seeded by (seed, e), and the torch RNG state (dropout) is checkpointed, so a resumed run sees the
same batches, masks and dropout as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

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
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"precision {self.precision!r} is not known; use auto, fp32, bf16 or fp16")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every", "save_every",
                     "keep_checkpoints", "seq_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.seq_len < 3:
            raise UserError(f"seq-len={self.seq_len} is too short: a row needs [CLS], a token and [SEP]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val-fraction={self.val_fraction} must be in [0, 1)")
        if self.lr <= 0:
            raise UserError(f"lr={self.lr} must be > 0")

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

    def apply(self, batch: dict[str, torch.Tensor], seed: int):
        from .masking import mask_tokens

        return mask_tokens(
            batch["input_ids"], self.mask_token_id, self.vocab_size,
            special_token_ids=self.special_token_ids, attention_mask=batch["attention_mask"],
            word_ids=batch.get("word_ids"), mlm_probability=self.mlm_probability,
            mask_replace_prob=self.mask_replace_prob, random_replace_prob=self.random_replace_prob,
            mode=self.mode, seed=seed,
        )


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


def train_forward(model, path: str, masked, attention_mask: torch.Tensor):
    """The model call of one training micro-step. Fast path: the compact targets (positions / position_labels,
    no compaction, no host sync); reference path: dense labels and full logits. Same targets, same loss."""
    if path == "fast":
        return model(masked.input_ids, attention_mask=attention_mask, positions=masked.positions,
                     position_labels=masked.position_labels)
    return model(masked.input_ids, attention_mask=attention_mask, labels=masked.labels)


@torch.no_grad()
def evaluate(model, loader, spec: MaskingSpec, device: torch.device, max_batches: int = 0,
             autocast_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Token-weighted MLM loss, perplexity and masked-token accuracy over (up to max_batches of) a loader.

    Validation batches are masked with fixed seeds, so successive evaluations see the same masked tokens.
    Always the reference computation (full logits: the model is called without labels), whatever the training
    path, so validation numbers of fast and reference runs are comparable."""
    was_training = model.training
    model.eval()
    tot_loss = torch.zeros((), dtype=torch.float64, device=device)
    tot_n = torch.zeros((), dtype=torch.int64, device=device)
    tot_ok = torch.zeros((), dtype=torch.int64, device=device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = to_device(batch, device)
        masked = spec.apply(batch, seed=EVAL_MASK_SEED + i)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(masked.input_ids, attention_mask=batch["attention_mask"])
        loss_sum, n, ok = mlm_loss_sum(out.logits, masked.labels)
        tot_loss += loss_sum.double()
        tot_n += n
        tot_ok += ok
    model.train(was_training)
    n = int(tot_n)
    if n == 0:
        raise UserError("the validation split has no maskable tokens; use more data or a larger --val-fraction")
    loss = float(tot_loss) / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": int(tot_ok) / n, "val_tokens": n}


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

CKPT_PREFIX = "step-"


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first (temporary directories of an interrupted save are ignored)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(CKPT_PREFIX) and n[len(CKPT_PREFIX):].isdigit()]
    names.sort(key=lambda n: int(n[len(CKPT_PREFIX):]))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, "trainer_state.pt"))]


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


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, scheduler, scaler,
                    device: torch.device, extra: dict[str, Any], keep: int) -> str:
    """Write a checkpoint into a temporary directory, then rename it into place (atomic on POSIX)."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{CKPT_PREFIX}{step:06d}")
    tmp = os.path.join(root, f".tmp-{CKPT_PREFIX}{step:06d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tokenizer)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(device),
        **extra,
    }
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------
# Metrics and plots
# ---------------------------------------------------------------------------------------------------------


class MetricsLog:
    def __init__(self, path: str, truncate_after_step: Optional[int] = None):
        self.path = path
        if truncate_after_step is not None and os.path.exists(path):
            # A resumed run rewrites what came after its checkpoint, so the log has no duplicate steps.
            with open(path) as f:
                rows = [json.loads(l) for l in f if l.strip()]
            rows = [r for r in rows if r.get("step", 0) <= truncate_after_step]
            with open(path, "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        elif truncate_after_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(l) for l in f if l.strip()]


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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
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


def prepare_tokenizer(cfg: TrainConfig, documents: list[str], run_dir: str, log: Callable[[str], None]):
    """The run's tokenizer: the run's own (resume), --tokenizer, the --model directory's, or trained here."""
    from .tokenizer import MLMTokenizer, train_tokenizer

    own = os.path.join(run_dir, "tokenizer")
    if os.path.isfile(os.path.join(own, "tokenizer.json")):
        return MLMTokenizer.load(own)
    if cfg.tokenizer:
        tok = MLMTokenizer.load(cfg.tokenizer)
    elif cfg.model not in PRESETS and _is_model_dir(cfg.model):
        tok = MLMTokenizer.load(cfg.model)
    else:
        t0 = time.time()
        tok = train_tokenizer(documents, vocab_size=cfg.vocab_size)
        log(f"trained a WordPiece tokenizer: {tok.vocab_size} tokens in {time.time() - t0:.1f}s")
    tok.save(own)
    return tok


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


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = _print,
          stop_after: Optional[int] = None) -> TrainResult:
    """Train (or resume) a run described by `cfg`. `stop_after` ends this invocation after that optimizer
    step, with a checkpoint, as if the process had been stopped there (used by the resume tests)."""
    from .data import build_datasets, make_loader

    run_dir = cfg.out_dir
    cfg_path = os.path.join(run_dir, "train_config.json")
    ckpts = checkpoint_dirs(run_dir) if resume else []
    if resume:
        if not os.path.isfile(cfg_path):
            raise UserError(f"--resume: {run_dir} is not a run directory (no train_config.json); "
                            "start a new run without --resume")
        with open(cfg_path) as f:
            saved = TrainConfig.from_json(json.load(f))
        # Everything that defines the run comes from the saved config; the step budget and logging may change.
        keep = {k: getattr(cfg, k) for k in ("max_steps", "progress", "eval_every", "log_every", "save_every",
                                               "keep_checkpoints", "num_workers", "device")}
        cfg = dataclasses.replace(saved, **keep)
        cfg.out_dir = run_dir
    cfg.validate()
    os.makedirs(run_dir, exist_ok=True)
    if not resume and checkpoint_dirs(run_dir):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    with open(cfg_path + ".tmp", "w") as f:
        json.dump(cfg.to_json(), f, indent=2)
    os.replace(cfg_path + ".tmp", cfg_path)

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)

    t0 = time.time()
    documents, source = load_documents(cfg.data)
    tokenizer = prepare_tokenizer(cfg, documents, run_dir, log)
    train_ds, val_ds = build_datasets(documents, tokenizer, seq_len=cfg.seq_len, pack=cfg.pack,
                                      val_fraction=cfg.val_fraction, seed=cfg.seed, whole_word=cfg.whole_word)
    log(f"data: {source}: {len(documents)} documents -> {len(train_ds)} train rows, {len(val_ds)} validation "
        f"rows of {cfg.seq_len} tokens ({time.time() - t0:.1f}s)")
    per_step = cfg.batch_size * cfg.grad_accum
    if len(train_ds) < cfg.batch_size:
        raise UserError(f"only {len(train_ds)} training rows for --batch-size {cfg.batch_size}: "
                        "use a smaller --batch-size or more data")

    model = build_model(cfg, tokenizer).to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    spec = MaskingSpec.from_config(cfg, tokenizer)

    step = 0
    if resume and ckpts:
        from .model import BertForMLM

        latest = ckpts[-1]
        state = torch.load(os.path.join(latest, "trainer_state.pt"), map_location="cpu", weights_only=False)
        if state.get("train_rows") != len(train_ds) or state.get("tokenizer") != tokenizer.fingerprint():
            raise UserError(f"the data or tokenizer changed since {latest} was written "
                            f"({state.get('train_rows')} rows then, {len(train_ds)} now); resume needs the same data")
        loaded = BertForMLM.from_pretrained(latest)
        model.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], device)
        step = int(state["step"])
        log(f"resumed from {latest} at step {step}")
    elif resume:
        log(f"--resume: no checkpoint in {run_dir} yet; starting from step 0")

    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log(f"model: {cfg.model} ({n_params / 1e6:.1f}M parameters) on {device}"
        f"{'' if amp_dtype is None else ' with ' + str(amp_dtype).replace('torch.', '') + ' autocast'}; "
        f"{cfg.max_steps} steps of {per_step} x {cfg.seq_len} tokens")

    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), truncate_after_step=step if resume else None)
    val_loader = make_loader(val_ds, cfg.batch_size, shuffle=False, drop_last=False) if len(val_ds) else None

    def run_eval(at_step: int) -> Optional[dict[str, float]]:
        if val_loader is None:
            return None
        r = evaluate(model, val_loader, spec, device, cfg.eval_batches, amp_dtype)
        metrics.write({"split": "val", "step": at_step, **r})
        return r

    first_val = None
    if step == 0:
        first_val = run_eval(0)
        if first_val:
            log(f"step 0: val loss {first_val['val_loss']:.3f}, accuracy {100 * first_val['val_acc']:.1f}%")
    else:
        prev = [r for r in metrics.rows() if r.get("split") == "val"]
        first_val = prev[0] if prev else None

    batches_per_epoch = len(train_ds) // cfg.batch_size
    micro = step * cfg.grad_accum  # micro-batches consumed so far
    epoch, start_batch = divmod(micro, batches_per_epoch)

    def batches():
        nonlocal epoch, start_batch
        while True:
            loader = make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                 num_workers=cfg.num_workers, drop_last=True, start_batch=start_batch)
            for b in loader:
                yield b
            epoch, start_batch = epoch + 1, 0

    from tqdm.auto import tqdm

    end_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True,
               desc="train")
    it = batches()
    last_val = None
    losses: list[float] = []
    t_start = time.time()
    tokens_seen = 0
    win_tokens, win_t = 0, time.time()
    pending: list[torch.Tensor] = []
    while step < end_step:
        loss_acc = torch.zeros((), device=device)
        for _ in range(cfg.grad_accum):
            raw = next(it)
            n_tok = int(raw["lengths"].sum())  # counted on the host copy: no device sync
            batch = to_device(raw, device)
            masked = spec.apply(batch, seed=mask_seed(cfg.seed, micro))
            micro += 1
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = train_forward(model, cfg.path, masked, batch["attention_mask"])
            loss = out.loss / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_acc += loss.detach()
            tokens_seen += n_tok
            win_tokens += n_tok
        if scaler is not None:
            scaler.unscale_(optimizer)
        gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                 if cfg.clip_grad_norm > 0 else None)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        pending.append(loss_acc)  # stays on the device until the next log line: no per-step sync
        bar.update(1)
        if step % cfg.log_every == 0 or step == end_step:
            window = torch.stack(pending).tolist()
            losses.extend(window)
            pending.clear()
            dt = max(time.time() - win_t, 1e-9)
            row = {"split": "train", "step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": win_tokens / dt, "elapsed_s": time.time() - t_start}
            if gnorm is not None:
                row["grad_norm"] = float(gnorm)
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            win_tokens, win_t = 0, time.time()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last_val = run_eval(step)
            if last_val:
                (bar.write if cfg.progress else log)(f"step {step}: val loss {last_val['val_loss']:.3f}, "
                          f"ppl {last_val['val_ppl']:.1f}, accuracy {100 * last_val['val_acc']:.1f}%")
        if step % cfg.save_every == 0 or step == end_step:
            save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, scaler, device,
                            {"train_rows": len(train_ds), "tokenizer": tokenizer.fingerprint(),
                             "epoch": epoch, "micro_step": micro},
                            cfg.keep_checkpoints)
    bar.close()
    seconds = time.time() - t_start

    model_dir = os.path.join(run_dir, "model")
    if step >= cfg.max_steps:
        tmp = model_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, tokenizer=tokenizer)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    plot = plot_metrics(metrics.rows(), os.path.join(run_dir, "loss.png"),
                        title=f"{cfg.model}, L={cfg.seq_len}, batch {per_step}")
    return TrainResult(run_dir=run_dir, model_dir=model_dir, plot=plot, steps=step, first_val=first_val,
                       last_val=last_val, seconds=seconds, tokens_per_s=tokens_seen / max(seconds, 1e-9),
                       train_losses=losses)
