"""mlmfast: fast masked-language-model pretraining for BERT-style encoders.

Public API (imported lazily so that `import mlmfast` stays cheap and never fails on a missing optional piece):
    ModelConfig, PRESETS            model configuration and named presets
    BertForMLM                      one-file BERT with an HF-compatible state dict
    mask_tokens, MaskingOutput      reference MLM masking in plain PyTorch
    accelerate                      the fast MLM training step for transformers' Bert/RobertaForMaskedLM (in place)
    MLMCollator                     drop-in for DataCollatorForLanguageModeling, masking with mlmfast's kernel
    linear_cross_entropy            fused linear + cross-entropy (the sparse MLM head's loss)
    attention                       fused bidirectional attention (also `mlmfast.attention(q, k, v, ...)`)
    UserError                       the error raised for bad input
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "mlmfast.config",
    "PRESETS": "mlmfast.config",
    "UserError": "mlmfast.errors",
    "BertForMLM": "mlmfast.model",
    "MLMOutput": "mlmfast.model",
    "mask_tokens": "mlmfast.masking",
    "MaskingOutput": "mlmfast.masking",
    "accelerate": "mlmfast.hf",
    "MLMCollator": "mlmfast.collator",
    "linear_cross_entropy": "mlmfast.linear_ce",
    "attention": "mlmfast.attention",
}
# Entries whose value is the submodule itself: `mlmfast.attention` is a callable module (calling it runs the
# `attention` function), so that `mlmfast.attention(q, k, v)` and `mlmfast.attention.attention_reference` both work
# in any import order.
_SUBMODULES = {"attention"}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(_LAZY[name])
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlmfast' has no attribute {name!r}")


def __dir__():
    return __all__
