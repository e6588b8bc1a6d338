"""Benchmark inputs: real text -> tokenizer -> fixed-shape batches -> one masked copy shared by every path.

Text: `--data` (files, directories, .jsonl; as `mlmfast train --data`) or the built-in corpus (Python's help
topics and standard-library docstrings; offline on every machine). The tokenizer is a WordPiece trained on that
text with `mlmfast.tokenizer.train_tokenizer` (as `mlmfast train` does); the model's vocabulary may be larger
(e.g. BERT's 30522): the extra rows are simply never the input, as with any tokenizer smaller than the model.

Two row-length distributions per (L, B):
  real  one document per row (`build_datasets(pack=False)`: a long document is cut into rows of L, its last
        piece padded), so the non-pad lengths are those of the text; the n*B rows are a stratified sample (one
        from each of n*B equal slices of the rows sorted by length), shuffled into the n batches
  full  documents packed across rows (`pack=True`): every row is L real tokens
Masking: `mlmfast.ops.mask_select` (BERT's 15% with 80/10/10, Bernoulli) with a fixed seed and offset = batch
index; the op is deterministic, so a path that masks inside its step (the fast paths, as the trainer does) gets
exactly the masked batch the other paths were given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

MASK_SEED = 20261127


@dataclass
class Batches:
    """n batches of one (distribution, B, L), on the benchmark's device, with their masked copies."""
    dist: str  # "real" or "full"
    B: int
    L: int
    input_ids: list[torch.Tensor]  # each (B, L) int64, unmasked
    attention_mask: list[torch.Tensor]  # each (B, L) int64, 1 = token, 0 = pad
    tokens: list[int]  # non-pad tokens per batch
    masked: list[Any] = field(default_factory=list)  # MaskingOutput per batch
    mask_kwargs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def fill(self) -> float:
        """Share of non-pad positions."""
        return sum(self.tokens) / (len(self.tokens) * self.B * self.L)

    def mask(self, j: int):
        """mask_select of batch j: bit for bit `self.masked[j]` (same seed, offset j)."""
        from mlmfast.ops import mask_select

        return mask_select(self.input_ids[j], attention_mask=self.attention_mask[j], seed=MASK_SEED, offset=j,
                           **self.mask_kwargs)


class TextSource:
    """The corpus and its tokenizer, built once; datasets per (L, packing) are built on first use."""

    def __init__(self, data: Optional[list[str]] = None, tokenizer_vocab: int = 8192):
        from mlmfast.tokenizer import train_tokenizer
        from mlmfast.trainer import load_documents

        self.documents, self.source = load_documents(list(data or []))
        self.tokenizer = train_tokenizer(self.documents, vocab_size=tokenizer_vocab)
        self._datasets: dict[tuple[int, bool], Any] = {}

    def dataset(self, L: int, pack: bool):
        from mlmfast.data import build_datasets

        key = (L, pack)
        if key not in self._datasets:
            self._datasets[key], _ = build_datasets(self.documents, self.tokenizer, seq_len=L, pack=pack,
                                                    val_fraction=0.0, seed=0)
        return self._datasets[key]

    def batches(self, dist: str, B: int, L: int, n: int, vocab_size: int, device, seed: int = 0) -> Batches:
        """n batches of B rows; vocab_size is the model's (random replacement draws from all of it)."""
        if dist not in ("real", "full"):
            raise ValueError(f"dist must be 'real' or 'full', got {dist!r}")
        ds = self.dataset(L, pack=(dist == "full"))
        g = torch.Generator().manual_seed(seed * 1009 + L * 31 + B + (7 if dist == "full" else 0))
        if dist == "full":  # packed rows; the corpus's last row may be short: leave it out
            full = torch.nonzero(ds.lengths == L).flatten()
            picks = full[torch.randint(len(full), (n * B,), generator=g)]
        else:  # stratified: one row from each of n*B equal slices of the rows sorted by length, then shuffled, so
            # the batches' fill is the text's and not the luck of a few draws (the lengths are very skewed)
            by_length = torch.argsort(ds.lengths, stable=True)
            k = torch.arange(n * B, dtype=torch.float64)
            at = ((k + torch.rand(n * B, generator=g, dtype=torch.float64)) / (n * B) * len(ds)).long()
            picks = by_length[at.clamp(max=len(ds) - 1)][torch.randperm(n * B, generator=g)]
        tok = self.tokenizer
        out = Batches(dist, B, L, [], [], [], mask_kwargs=dict(
            mask_token_id=tok.mask_token_id, vocab_size=vocab_size,
            special_token_ids=sorted(set(tok.special_token_ids))))
        for j in range(n):
            pick = picks[j * B:(j + 1) * B]
            ids = ds.input_ids[pick].long()  # (B, L)
            lengths = ds.lengths[pick].long()  # (B,)
            attn = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L)
            out.input_ids.append(ids.to(device))
            out.attention_mask.append(attn.to(device))
            out.tokens.append(int(lengths.sum()))
        out.masked = [out.mask(j) for j in range(n)]
        again = out.mask(0)  # the paths that mask inside their step rely on this
        first = out.masked[0]
        if not (torch.equal(again.input_ids, first.input_ids) and torch.equal(again.labels, first.labels)):
            raise RuntimeError("mask_select is not deterministic here: the paths would not see the same batches")
        return out


def hf_tokenizer(tokenizer):
    """The suite's tokenizer as a transformers PreTrainedTokenizerFast (for HF's DataCollatorForLanguageModeling)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
