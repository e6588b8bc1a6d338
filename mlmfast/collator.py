"""`MLMCollator`: a drop-in for transformers' DataCollatorForLanguageModeling, masking with mlmfast's kernel.

    collator = MLMCollator(tokenizer, mlm_probability=0.15)              # where DataCollatorForLanguageModeling was
    loader = DataLoader(dataset, batch_size=32, collate_fn=collator)
    batch = next(iter(loader))   # {"input_ids" (masked), "attention_mask", ..., "labels" (-100 = not predicted)}

Same arguments in HF's order (tokenizer, mlm, whole_word_mask (False only), mlm_probability, mask_replace_prob,
random_replace_prob, pad_to_multiple_of, return_tensors="pt", seed; `collator(examples, return_tensors=)`), same
keys, shapes, padding (the tokenizer's own `pad`, so its padding side) and label convention. The padding happens
on the CPU, in the DataLoader worker; the masking is `mlmfast.ops.mask_select`:
  * device=None (default): on the CPU tensors, by the C++ twin (19x the HF collator's masking here), in the
    worker; works with every model and loop, accelerated or not.
  * device="cuda" (or any torch.device): the padded batch is moved there and masked by the CUDA kernel (one
    launch, no host sync); the batch comes back on that device. Main process only (num_workers=0): CUDA
    cannot be used from a forked DataLoader worker.
Masking follows HF's rule: each non-special, non-padding token is selected with probability mlm_probability
(Bernoulli); a selected token becomes the mask token with probability mask_replace_prob, a random token with
probability random_replace_prob, else stays. It is statistically, not bitwise, equal to HF's (another random
stream; random replacements never draw special tokens, HF's may).
Seeds: seed=None draws each batch's seed from torch's default CPU generator (so torch.manual_seed makes runs
repeat); seed=int gives a stream of its own: batch k of a process uses (seed + DataLoader worker id, k).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from ._checks import is_int as _is_int
from .errors import UserError
from .masking import IGNORE_INDEX


def _check_return_tensors(return_tensors) -> None:
    if return_tensors != "pt":
        raise UserError(f"MLMCollator supports return_tensors='pt' only, got {return_tensors!r} (the masking runs "
                        "on torch tensors); use DataCollatorForLanguageModeling for numpy")


class MLMCollator:
    """Pads a list of examples into a batch and masks it for MLM; see the module docstring."""

    # HF's parameter order (transformers 5.x), so positional calls mean the same thing in both
    def __init__(self, tokenizer: Any, mlm: bool = True, whole_word_mask: bool = False,
                 mlm_probability: Optional[float] = 0.15, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1, pad_to_multiple_of: Optional[int] = None,
                 return_tensors: str = "pt", seed: Optional[int] = None, *,
                 device: Union[str, torch.device, None] = None, mode: str = "bernoulli"):
        _check_return_tensors(return_tensors)
        if mlm_probability is None:
            if mlm:
                raise UserError("MLMCollator: mlm_probability=None needs mlm=False")
            mlm_probability = 0.15  # unused without MLM
        if whole_word_mask:
            raise UserError("MLMCollator: whole_word_mask=True is not supported (HF's needs offset mappings); use "
                            "mlmfast's trainer with --whole-word, or DataCollatorForLanguageModeling")
        for name, p in (("mlm_probability", mlm_probability), ("mask_replace_prob", mask_replace_prob),
                        ("random_replace_prob", random_replace_prob)):
            if not isinstance(p, numbers.Real) or isinstance(p, bool) or math.isnan(p) or not 0.0 <= p <= 1.0:
                raise UserError(f"MLMCollator: {name}={p!r} must be a probability in [0, 1]")
        if mask_replace_prob + random_replace_prob > 1.0 + 1e-12:
            raise UserError("MLMCollator: mask_replace_prob + random_replace_prob must not exceed 1")
        if mlm and not 0.0 < mlm_probability <= 1.0:
            raise UserError(f"MLMCollator: mlm_probability={mlm_probability} must be in (0, 1] (1.0: every token)")
        if pad_to_multiple_of is not None and (not _is_int(pad_to_multiple_of) or pad_to_multiple_of < 1):
            raise UserError(f"MLMCollator: pad_to_multiple_of={pad_to_multiple_of!r} must be a positive int or None")
        if seed is not None and not _is_int(seed):
            raise UserError(f"MLMCollator: seed={seed!r} must be an int or None")
        self.tokenizer = tokenizer
        self.mlm = bool(mlm)
        self.mlm_probability = float(mlm_probability)
        self.mask_replace_prob = float(mask_replace_prob)
        self.random_replace_prob = float(random_replace_prob)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = return_tensors
        self.seed = seed
        self.mode = mode
        self.device = None if device is None else torch.device(device)
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if self.mlm and self.mask_token_id is None:
            raise UserError("MLMCollator: the tokenizer has no mask token; MLM needs one (or pass mlm=False)")
        specials = getattr(tokenizer, "all_special_ids", None)
        if specials is None:
            specials = getattr(tokenizer, "special_token_ids", None)
        self.special_token_ids = sorted({int(i) for i in (specials or [])})
        try:
            self.vocab_size = len(tokenizer)  # HF: includes added tokens (what HF draws random tokens from)
        except TypeError:
            self.vocab_size = int(tokenizer.vocab_size)
        self._calls = 0
        self._pid = None

    # ---- padding ----------------------------------------------------------------------------------------
    def _pad(self, examples: list) -> Any:
        if isinstance(examples[0], Mapping):
            if hasattr(self.tokenizer, "pad"):
                return self.tokenizer.pad(examples, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of)
            return self._pad_mappings(examples)
        return {"input_ids": self._pad_rows([torch.as_tensor(e, dtype=torch.long) for e in examples],
                                            self.pad_token_id)}

    def _width(self, lengths: list[int]) -> int:
        width = max(lengths)
        m = self.pad_to_multiple_of
        return width if m is None else -(-width // m) * m

    def _pad_rows(self, rows: list[torch.Tensor], value: Optional[int]) -> torch.Tensor:
        width = self._width([r.shape[0] for r in rows])
        if all(r.shape[0] == width for r in rows):
            return torch.stack(rows)
        if value is None:
            raise UserError("MLMCollator: the examples need padding but the tokenizer has no pad token")
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        out = rows[0].new_full((len(rows), width), value)
        for i, r in enumerate(rows):
            if left:
                out[i, width - r.shape[0]:] = r
            else:
                out[i, : r.shape[0]] = r
        return out

    def _pad_mappings(self, examples: list) -> dict[str, torch.Tensor]:
        """Padding for a tokenizer without HF's `pad` (e.g. mlmfast's MLMTokenizer)."""
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}
        batch = {}
        for key in examples[0]:
            rows = [torch.as_tensor(e[key]) for e in examples]
            batch[key] = self._pad_rows([r.long() for r in rows], fill[key]) if key in fill else torch.stack(rows)
        if "attention_mask" not in batch:
            lengths = torch.tensor([len(e["input_ids"]) for e in examples])
            ones = [torch.ones(int(n), dtype=torch.long) for n in lengths]
            batch["attention_mask"] = self._pad_rows(ones, 0)
        return batch

    # ---- masking ----------------------------------------------------------------------------------------
    def _seed_offset(self) -> tuple[int, int]:
        import os

        if self._pid != os.getpid():  # a fresh process (a DataLoader worker): restart the stream
            self._pid, self._calls = os.getpid(), 0
        offset = self._calls
        self._calls += 1
        if self.seed is None:
            return int(torch.randint(0, 2**62, (1,)).item()), 0  # torch's default CPU generator: no device sync
        info = torch.utils.data.get_worker_info()
        return self.seed + (info.id if info is not None else 0), offset

    def __call__(self, examples: list, return_tensors: Optional[str] = None) -> Any:
        if return_tensors is not None:
            _check_return_tensors(return_tensors)
        if len(examples) == 0:
            raise UserError("MLMCollator: got an empty list of examples")
        batch = self._pad(examples)
        special_tokens_mask = batch.pop("special_tokens_mask", None)
        ids = batch["input_ids"]
        if self.device is not None:
            if torch.utils.data.get_worker_info() is not None and self.device.type == "cuda":
                raise UserError("MLMCollator(device='cuda') runs in the main process only; use num_workers=0, or "
                                "device=None (masking on the CPU in the workers)")
            for k, v in list(batch.items()):
                if isinstance(v, torch.Tensor):
                    batch[k] = v.to(self.device, non_blocking=True)
            ids = batch["input_ids"]
            if special_tokens_mask is not None:
                special_tokens_mask = special_tokens_mask.to(self.device, non_blocking=True)
        if not self.mlm:
            labels = ids.clone()
            if self.pad_token_id is not None:
                labels[labels == self.pad_token_id] = IGNORE_INDEX
            batch["labels"] = labels
            return batch
        from .ops import mask_select

        seed, offset = self._seed_offset()
        out = mask_select(
            ids, mask_token_id=int(self.mask_token_id), vocab_size=self.vocab_size,
            special_token_ids=self.special_token_ids, attention_mask=batch.get("attention_mask"),
            special_tokens_mask=special_tokens_mask, mlm_probability=self.mlm_probability,
            mask_replace_prob=self.mask_replace_prob, random_replace_prob=self.random_replace_prob,
            mode=self.mode, max_predictions=ids.shape[1],  # capacity L: no selected token is ever dropped
            seed=seed, offset=offset,
        )
        batch["input_ids"] = out.input_ids
        batch["labels"] = out.labels
        return batch
