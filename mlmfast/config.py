"""Model configuration: one dataclass, named presets, a 1:1 mapping to HF's BertConfig / config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


@dataclass
class ModelConfig:
    # Field names follow transformers' BertConfig, so a config.json maps 1:1 both ways.
    vocab_size: int = 30522  # size of the word-piece vocabulary (rows of the tied embedding / decoder)
    hidden_size: int = 768  # width of the residual stream
    num_hidden_layers: int = 12  # encoder blocks
    num_attention_heads: int = 12  # heads per block; head dim = hidden_size / num_attention_heads
    intermediate_size: int = 3072  # MLP width (4 x hidden in every BERT preset)
    hidden_act: str = "gelu"  # MLP activation: "gelu" (erf), "gelu_new"/"gelu_pytorch_tanh" (tanh), "relu"
    hidden_dropout_prob: float = 0.1  # dropout after embeddings, attention output and MLP output
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention probabilities
    max_position_embeddings: int = 512  # longest sequence the learned position table covers
    type_vocab_size: int = 2  # segment (token type) ids: sentence A / sentence B
    initializer_range: float = 0.02  # std of the normal init of every weight matrix (as HF BERT)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT's value)
    pad_token_id: int = 0  # id of [PAD]; its embedding row is initialised to zero
    attn_implementation: str = "sdpa"  # "eager" (explicit softmax, the reference) or "sdpa"
    tie_word_embeddings: bool = True  # MLM decoder weight is the word-embedding matrix
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown config.json keys, kept round-trip

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise UserError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}; pick a head count that divides the hidden size"
            )
        if self.attn_implementation not in ("eager", "sdpa"):
            raise UserError(
                f"attn_implementation={self.attn_implementation!r} is not known; use 'eager' or 'sdpa'"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be a positive integer")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update(overrides)
        return cls(**kw)

    # ---- HF config.json ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra",)}
        d.pop("attn_implementation")
        d.update(self.extra)
        d.update({
            "model_type": "bert",
            "architectures": ["BertForMaskedLM"],
            "position_embedding_type": "absolute",
            "mlmfast_attn_implementation": self.attn_implementation,
        })
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in names}
        if "mlmfast_attn_implementation" in d:
            kw["attn_implementation"] = d["mlmfast_attn_implementation"]
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise UserError(f"position_embedding_type={pet!r} is not supported; only 'absolute' is")
        skip = names | {"mlmfast_attn_implementation", "model_type", "architectures", "position_embedding_type"}
        extra = {k: v for k, v in d.items() if k not in skip}
        return cls(**kw, extra=extra)

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ModelConfig":
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise UserError(f"{directory} has no config.json: it is not a model directory "
                            "(pass a run directory, a checkpoint, or an HF BERT directory)")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _preset(layers: int, hidden: int, heads: int) -> dict[str, int]:
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                intermediate_size=4 * hidden)


# The BERT family of Turc et al. (2019) plus the two original sizes.
PRESETS: dict[str, dict[str, int]] = {
    "bert-tiny": _preset(2, 128, 2),
    "bert-mini": _preset(4, 256, 4),
    "bert-small": _preset(4, 512, 8),
    "bert-medium": _preset(8, 512, 8),
    "bert-base": _preset(12, 768, 12),
    "bert-large": _preset(24, 1024, 16),
}
