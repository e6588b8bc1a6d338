"""Test data shared by test_masking.py and test_mask_select.py: a BERT-like small vocabulary, padded batches of
[CLS] words [SEP], and the binomial bound the statistics tests use."""
import math

import torch

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # BERT-like special ids at the front of the vocabulary
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 50  # small, so a random replacement hits the original id often enough to matter (1 / 45)


def binomial_ok(count: int, n: int, p: float, sigmas: float) -> bool:
    """count successes of n trials is within `sigmas` binomial sigmas of n * p."""
    sigma = math.sqrt(max(n * p * (1.0 - p), 1e-12))
    return abs(count - n * p) <= sigmas * sigma


def mlm_batch(B: int, L: int, seed: int, dtype=torch.long):
    """[CLS] w1 .. wn [SEP] [PAD]...: random non-special ids, random lengths; returns (ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), VOCAB, (B, L), generator=g)
    lengths = torch.randint(max(1, L // 2), L + 1, (B,), generator=g)
    attn = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    ids[attn == 0] = PAD
    return ids.to(dtype), attn
