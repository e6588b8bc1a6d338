"""BERT for masked-language modelling, in one readable file.

The module tree reproduces transformers' `BertForMaskedLM` exactly, so `state_dict()` has the same keys and
shapes (no pooler, no buffers; with `tie_word_embeddings`, `cls.predictions.decoder.weight` is the word-embedding
matrix and `cls.predictions.decoder.bias` is `cls.predictions.bias`, the same Parameters under two names), and a
checkpoint loads both ways with `strict=True`.

    forward(ids) = loss(head(encode(ids)))

`encode` and `head` are the two seams the fast path replaces. Two paths, one flag (`set_path`):
  * "reference" (the default): full logits (B, L, V), loss over labels != -100; the oracle of every parity test.
  * "fast" (the trainer's default), taken when labels or positions are given:
        x    = layers[:-1](embeddings(ids))         attention via mlmfast.attention (Triton) or SDPA
        rows = last layer at the predicted positions only (keys / values from all), predicted rows first
        loss = linear_cross_entropy(transform(rows), decoder.weight, decoder.bias, labels)   no [rows, V] logits
    Without labels / positions (inference, evaluation) the fast path returns the reference's full logits.
    Dispatch rules: `mlmfast.fast` (backend "auto" | "kernel" | "torch").
Shapes: B batch, L sequence length, H hidden size, nh heads, D head dim, I intermediate size, V vocab size,
P predicted slots per row, N predicted rows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import INT, check_range, check_tensor, shape_str
from ._io import default_modes
from .config import ModelConfig
from .errors import UserError

IGNORE_INDEX = -100  # label of a position that is not predicted (HF convention)
PATHS = ("reference", "fast")  # BertForMLM.set_path
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64)  # attention_mask: any real dtype, 0 = padding
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # sharded HF checkpoints
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"

# Tied parameters: HF stores only the right-hand side, so do we (safetensors refuses shared tensors anyway).
TIED_DECODER_WEIGHT = ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
TIED_DECODER_BIAS = ("cls.predictions.decoder.bias", "cls.predictions.bias")
# Keys some BERT checkpoints carry that an MLM model does not use (pre-training heads, old persistent buffers).
_IGNORED_PREFIXES = ("bert.pooler.", "cls.seq_relationship.")
_IGNORED_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),  # erf form (BERT's)
    "gelu_new": lambda: nn.GELU(approximate="tanh"),  # same formula as HF NewGELU
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
    "swish": lambda: nn.SiLU(),
}


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise UserError(f"hidden_act={name!r} is not supported; use one of: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


@dataclass
class MLMOutput:
    """`loss`: scalar fp32 mean CE over labelled positions (None without labels). `logits`: (B, L, V) on the
    reference path; on the fast path None, or (N, V) for the predicted rows only when `return_logits=True`.

    Also indexable like HF's ModelOutput: `out["loss"]`, and `out[0]` is the first field that is not None.
    """
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(v for v in (self.loss, self.logits) if v is not None)

    def __getitem__(self, key: str | int) -> torch.Tensor | None:
        if isinstance(key, str):
            if key not in ("loss", "logits"):
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions with label != -100, computed in fp32.

    Differs from HF in one corner: with no labelled position HF returns NaN (0/0); this returns 0.0 (sum over
    nothing / max(count, 1)), which still has a (zero) gradient, so a batch without predictions is harmless.
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V).float()  # (B*L, V)
    target = labels.reshape(-1)  # (B*L,)
    total = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (target != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)


def attention_bias(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) bool key mask (True = attend) -> (B, 1, 1, L) additive bias: 0 or the dtype's most negative value.

    The finite minimum (not -inf), as HF does, keeps an all-padding row finite (uniform attention).
    """
    if key_mask is None:
        return None
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)  # (B, L)
    bias = bias.masked_fill(~key_mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]  # (B, 1, 1, L)


# ---- modules ------------------------------------------------------------------------------------------------

class Embeddings(nn.Module):
    """word + token_type + position embeddings -> LayerNorm -> dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pad = cfg.pad_token_id if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.vocab_size else None
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=pad)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        L = input_ids.shape[1]
        positions = torch.arange(L, device=input_ids.device)  # (L,)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, L)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, L, H)
        x = x + self.position_embeddings(positions)  # (B, L, H) + (L, H)
        return self.dropout(self.LayerNorm(x))  # (B, L, H)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with a key-padding mask; "eager" (reference) or "sdpa"."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout = nn.Dropout(cfg.attention_probs_dropout_prob)
        self.attn_implementation = cfg.attn_implementation

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, H = x.shape
        q = self.query(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, L, D)
        k = self.key(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, L, D)
        v = self.value(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, L, D)
        bias = attention_bias(key_mask, q.dtype)  # (B, 1, 1, L) or None
        if self.attn_implementation == "eager":
            att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, L, L)
            if bias is not None:
                att = att + bias  # padded keys -> ~-inf
            att = self.dropout(att.softmax(dim=-1))  # (B, nh, L, L)
            y = att @ v  # (B, nh, L, D)
        else:
            p = self.dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.scale)  # (B, nh, L, D)
        return y.transpose(1, 2).reshape(B, L, H)  # (B, L, H)


class DenseResidualNorm(nn.Module):
    """LayerNorm(dropout(dense(h)) + residual): BERT's post-LN sub-block output."""

    def __init__(self, d_in: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # (B, L, H)


class Layer(nn.Module):
    """One post-LN encoder block: attention sub-block, then MLP sub-block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = nn.ModuleDict({"self": SelfAttention(cfg), "output": DenseResidualNorm(cfg.hidden_size, cfg)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.intermediate_size)})
        self.output = DenseResidualNorm(cfg.intermediate_size, cfg)
        self.act = activation(cfg.hidden_act)  # no parameters

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, *, fast_backend: Optional[str] = None,
                queries: Optional[torch.Tensor] = None, unpadded: Any = None,
                seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reference: (B, L, H) -> (B, L, H), key_mask as SelfAttention takes it. With fast_backend (the fast
        path; key_mask is then the (B, L) bool keep-mask or None): mlmfast.fast.encoder_layer, (B, L, H) ->
        (B, L, H), or (B*P, H) at the (B, P) `queries` positions only. Both go through this module's __call__,
        so wrappers that hook it (FSDP2's fully_shard) see every layer call. unpadded (fast path, a
        `fast.unpad_plan`): x and the result are (T, H), the real tokens only. seqlens (fast path, (B,)): the
        key mask is right padding with these row lengths (the fused attention then takes lengths, not a mask)."""
        if fast_backend is not None:
            return self._fast_forward(x, key_mask, fast_backend, queries, unpadded, seqlens)
        a = self.attention["self"](x, key_mask)  # (B, L, H)
        x = self.attention["output"](a, x)  # (B, L, H)
        h = self.act(self.intermediate["dense"](x))  # (B, L, I)
        return self.output(h, x)  # (B, L, H)

    def _fast_forward(self, x: torch.Tensor, keep: Optional[torch.Tensor], backend: str,
                      queries: Optional[torch.Tensor], unpadded: Any = None,
                      seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        from . import fast

        sa = self.attention["self"]

        def ffn(h: torch.Tensor) -> torch.Tensor:
            return self.output(self.act(self.intermediate["dense"](h)), h)  # (..., H)

        return fast.encoder_layer(x, sa, sa.n_head, keep, sa.dropout.p if self.training else 0.0, backend,
                                  attn_output=self.attention["output"], ffn=ffn, scale=sa.scale, queries=queries,
                                  unpadded=unpadded, seqlens=seqlens)


class PredictionHead(nn.Module):
    """MLM head: dense -> act -> LayerNorm -> decoder (V x H, tied to the word embeddings) + bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.transform = nn.ModuleDict({
            "dense": nn.Linear(cfg.hidden_size, cfg.hidden_size),
            "transform_act_fn": activation(cfg.hidden_act),
            "LayerNorm": nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps),
        })
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)  # weight and bias tied by BertForMLM.tie_weights

    def transform_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """dense -> act -> LayerNorm: the head's input to the decoder, (..., H) -> (..., H)."""
        t = self.transform
        return t["LayerNorm"](t["transform_act_fn"](t["dense"](h)))  # (..., H)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform_hidden(h))  # (..., V)


class BertForMLM(nn.Module):
    """BERT encoder + MLM head with HF `BertForMaskedLM` parameter names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.bert = nn.ModuleDict({
            "embeddings": Embeddings(config),
            "encoder": nn.ModuleDict({"layer": nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))}),
        })
        self.cls = nn.ModuleDict({"predictions": PredictionHead(config)})
        self.apply(self._init_weights)
        self.tie_weights()
        self.path = "reference"  # "reference" | "fast": see set_path
        self.fast_backend = "auto"  # "auto" | "kernel" | "torch": see mlmfast.fast

    # ---- parameters ------------------------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        """HF BERT init: N(0, initializer_range) weights, zero biases, LayerNorm (1, 0), zero [PAD] row."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, PredictionHead):
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """If tie_word_embeddings: the decoder shares the word-embedding matrix and the head bias (same Parameters).

        As in HF, an untied model has a separate decoder.bias too (and cls.predictions.bias is then unused).
        """
        if self.config.tie_word_embeddings:
            pred = self.cls["predictions"]
            pred.decoder.bias = pred.bias
            pred.decoder.weight = self.bert["embeddings"].word_embeddings.weight

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/... may swap Parameters for new objects; re-tie afterwards.
        super()._apply(fn, *args, **kwargs)
        self.tie_weights()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.tie_weights()  # assign=True replaces Parameters
        return result

    def num_parameters(self) -> int:
        """Number of unique parameters (tied matrices counted once)."""
        return sum(p.numel() for p in self.parameters())

    def set_path(self, path: str, backend: Optional[str] = None) -> "BertForMLM":
        """Choose the training path: "fast" (sparse head + fused kernels) or "reference" (full logits).

        backend (fast path only): "auto" (Triton kernels on CUDA; SDPA + chunked PyTorch loss on CPU), "kernel"
        (Triton wherever it runs, incl. CPU under TRITON_INTERPRET=1) or "torch"; None keeps the current one.
        No change to the weights; returns self."""
        from . import fast

        if path not in PATHS:
            raise UserError(f"path {path!r} is not known; use one of {', '.join(PATHS)}")
        self.path = path
        if backend is not None:
            self.fast_backend = fast.check_backend(backend)
        return self

    def set_attn_implementation(self, name: str) -> None:
        """Switch every layer between "eager" and "sdpa" (no change to the weights)."""
        self.config = dataclasses.replace(self.config, attn_implementation=name)  # validates the name
        for layer in self.bert["encoder"]["layer"]:
            layer.attention["self"].attn_implementation = name

    # ---- forward ---------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, positions=None,
                      position_labels=None) -> None:
        """Validate every argument of forward with one clear UserError each (mlmfast._checks).

        Shapes, dtypes and devices: metadata only. Id ranges (input_ids, token_type_ids, labels / position_labels):
        exact on CPU tensors; on CUDA tensors an asynchronous device assert (no host sync on the training step)."""
        from . import fast

        cfg = self.config
        check_tensor("input_ids", input_ids, "a 2-D torch.Tensor of integer token ids [B, L]", dtypes=INT,
                     shape=(None, None))
        if input_ids.numel() == 0:
            raise UserError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token")
        B, L = input_ids.shape
        if L > cfg.max_position_embeddings:
            raise UserError(f"sequence length {L} > max_position_embeddings {cfg.max_position_embeddings}; "
                            f"use --seq-len <= {cfg.max_position_embeddings}")
        like = f"[B, L] = {shape_str(input_ids.shape)} (input_ids' shape)"
        same = dict(shape=(B, L), device=input_ids.device, device_of="input_ids", optional=True)
        check_tensor("attention_mask", attention_mask, f"a real tensor {like}, 0 = padding", dtypes=_MASK_DTYPES,
                     **same)
        check_tensor("token_type_ids", token_type_ids, f"an integer tensor {like}", dtypes=INT, **same)
        fast.check_targets(input_ids, labels, positions, position_labels)
        check_range("input_ids", input_ids, 0, cfg.vocab_size, what="token id", hi_name="vocab_size",
                    hint=": the tokenizer does not match the model; use the tokenizer the model was trained with, "
                         "or build the model with its vocab_size")
        if token_type_ids is not None:
            check_range("token_type_ids", token_type_ids, 0, cfg.type_vocab_size, what="token_type_id",
                        hi_name="type_vocab_size")
        name, targets = ("position_labels", position_labels) if positions is not None else ("labels", labels)
        if targets is not None:
            check_range(name, targets, 0, cfg.vocab_size, what="label", hi_name="vocab_size", ignore=IGNORE_INDEX,
                        hint=f"; use {IGNORE_INDEX} for positions that are not predicted")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, L) -> final hidden states (B, L, H). No input validation (forward does it).

        attention_mask (B, L): 1/True = real token, 0/False = padding (masked as a key); None = all real.
        Hidden states at padded positions are not meaningful.
        """
        key_mask = None if attention_mask is None else attention_mask != 0  # (B, L) bool
        x = self.bert["embeddings"](input_ids, token_type_ids)  # (B, L, H)
        for layer in self.bert["encoder"]["layer"]:
            x = layer(x, key_mask)  # (B, L, H)
        return x

    def _fast_layer(self, layer: Layer, x: torch.Tensor, keep: Optional[torch.Tensor],
                    queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One layer on the fast path: (B, L, H) -> (B, L, H), or (B*P, H) at `queries` (B, P) positions only."""
        return layer(x, keep, fast_backend=self.fast_backend, queries=queries)

    def encode_fast(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`encode` with the fast path's attention (mlmfast.fast.self_attention). Same weights, same hidden
        states at real tokens; padded positions may differ (the kernel returns 0 there)."""
        keep = None if attention_mask is None else attention_mask != 0  # (B, L) bool
        x = self.bert["embeddings"](input_ids, token_type_ids)  # (B, L, H)
        for layer in self.bert["encoder"]["layer"]:
            x = self._fast_layer(layer, x, keep)  # (B, L, H)
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., H) -> vocabulary logits (..., V)."""
        return self.cls["predictions"](hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, position_labels: torch.Tensor | None = None,
                return_logits: bool = False, num_tokens: int | None = None, lengths: torch.Tensor | None = None,
                head_at_labels_only: bool = False) -> MLMOutput:
        """loss = mean fp32 CE over the predicted positions (0.0 if there are none).

        Targets: HF-style labels (B, L) (-100 = not predicted), or positions / position_labels (B, P) (unused
        slots: label -100), as `MaskingOutput` gives them (the fast path then needs no compaction).
        Reference path: logits = head(encode(...)) (B, L, V), always returned. Fast path (labels or positions
        given): logits only when return_logits, and then (N, V) for the predicted rows in row-major order
        (== reference logits[labels != -100]).
        num_tokens (fast path, optional): the number of non-zero attention_mask positions, as counted on the host
        (on the CPU batch, before copying it). With it, a padded enough batch runs the encoder's dense ops on its
        real tokens only on a GPU and under torch.compile too, without a device->host sync (`fast.unpad_plan`;
        it pays when the step is GPU-bound, not in a launch-bound eager GPU step: NOTES.md).
        lengths (fast path, optional; (B,) integers, with attention_mask): the mask is right padding, row b real
        at positions [0, lengths[b]) (the trainer's batches, HF's default collators). The fused attention then
        takes the lengths instead of a per-key mask: no mask loads, and full rows run its unmasked blocks. The
        two must agree (exact check on CPU; a device assert on CUDA).
        head_at_labels_only (evaluation; needs labels or positions): the reference computation whatever the path,
        with the MLM head run on the labelled rows only: logits (N, V) in row-major order (== the full reference
        logits[labels != -100], row by row), the same loss, and no (B, L, V) logits tensor (with a large
        vocabulary that tensor, not the model, sets the memory of an evaluation). Reads the number of labelled
        rows (a host sync on CUDA): not for the training step.
        """
        from . import fast

        self._check_inputs(input_ids, attention_mask, token_type_ids, labels, positions, position_labels)
        fast.check_num_tokens(num_tokens, *input_ids.shape)
        fast.check_lengths(lengths, attention_mask, *input_ids.shape)
        if head_at_labels_only:
            if labels is None and positions is None:
                raise UserError("head_at_labels_only=True needs labels (or positions / position_labels)")
            if positions is not None:
                labels = fast.dense_labels(positions, position_labels, input_ids.shape[1])
            hidden = self.encode(input_ids, attention_mask, token_type_ids)  # (B, L, H)
            rows = labels != IGNORE_INDEX  # (B, L)
            logits = self.head(hidden[rows])  # (N, V): the head is row-wise
            return MLMOutput(loss=mlm_loss(logits, labels[rows]), logits=logits)
        if self.path == "fast" and (labels is not None or positions is not None):
            keep = None if attention_mask is None else attention_mask != 0  # (B, L) bool
            x = self.bert["embeddings"](input_ids, token_type_ids)  # (B, L, H)
            *layers, last = self.bert["encoder"]["layer"]
            plan = fast.unpad_plan(keep, self.fast_backend, num_tokens) if layers else None  # padded enough
            if plan is not None:
                x = plan.pack(x)  # (T, H): the layers' dense ops run on the real tokens only
            for layer in layers:
                x = layer(x, keep, fast_backend=self.fast_backend, unpadded=plan, seqlens=lengths)  # (B,L,H) / (T,H)
            if plan is not None:
                x = plan.unpack(x)  # (B, L, H), zeros at the padding (masked keys of the last layer)
            B, L, _ = x.shape
            pos, lab = fast.target_positions(B, L, x.device, labels if positions is None else None, positions,
                                             position_labels)  # (B, P) positions to predict
            rows = self._fast_layer(last, x, keep, queries=pos)  # (B*P, H): the last layer at those rows only
            sel = fast.compact_rows(rows, lab)  # (C, H) predicted rows first
            pred = self.cls["predictions"]
            loss, logits = fast.mlm_head_loss(sel, pred.transform_hidden, pred.decoder.weight, pred.decoder.bias,
                                              self.fast_backend, return_logits)
            return MLMOutput(loss=loss, logits=logits)
        if positions is not None:
            labels = fast.dense_labels(positions, position_labels, input_ids.shape[1])  # (B, L)
        logits = self.head(self.encode(input_ids, attention_mask, token_type_ids))  # (B, L, V)
        loss = mlm_loss(logits, labels) if labels is not None else None
        return MLMOutput(loss=loss, logits=logits)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None) -> None:
        """Write config.json + model.safetensors (HF layout, tied keys left out as HF does); then the tokenizer.

        Each file is written under a temporary name in `directory` and moved into place with os.replace.
        """
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        state = self.state_dict()
        skip = {TIED_DECODER_BIAS[0], TIED_DECODER_WEIGHT[0]} if self.config.tie_word_embeddings else set()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in skip}
        tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=directory)
        try:
            self.config.save(tmp)
            save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
            default_modes(tmp)  # safetensors writes 0600
            for name in ("config.json", WEIGHTS_NAME):
                os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if tokenizer is not None:
            from .tokenizer import MLMTokenizer

            if isinstance(tokenizer, MLMTokenizer):  # the model's positions bound what it may feed (HF truncation)
                tokenizer.save(directory, model_max_length=self.config.max_position_embeddings)
            else:  # any object with .save(directory)
                tokenizer.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, attn_implementation: str | None = None,
                        map_location: str | torch.device = "cpu") -> "BertForMLM":
        """Load a directory written by `save_pretrained` or by HF `BertForMaskedLM.save_pretrained`.

        Weights are copied into a freshly built fp32 model (a bf16 file is upcast).
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise UserError(f"{directory} is not a directory; pass a model directory (config.json + weights)")
        config = ModelConfig.load(directory)
        for flag in ("is_decoder", "add_cross_attention"):
            if config.extra.get(flag):
                raise UserError(f"{directory}/config.json has {flag}=true; only bidirectional MLM encoders load")
        if attn_implementation is not None:
            config = dataclasses.replace(config, attn_implementation=attn_implementation)
        state = _read_weights(directory, map_location)
        model = cls(config)
        model.load_state_dict(model._match_state_dict(state, directory), strict=True)
        return model.to(map_location)

    def _match_state_dict(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Normalise a checkpoint's keys to ours; UserError naming any missing, unexpected or mis-shaped key."""
        out = {}
        for k, v in state.items():
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if k in _IGNORED_KEYS or k.startswith(_IGNORED_PREFIXES):
                continue
            out[k] = v
        for alias, target in (TIED_DECODER_BIAS, TIED_DECODER_WEIGHT) if self.config.tie_word_embeddings else ():
            if target in out:
                out[alias] = out[target]  # the shared Parameter takes the stored (right-hand) value
            elif alias in out:
                out[target] = out[alias]  # a checkpoint that kept only the left-hand name
        expected = self.state_dict()
        missing = [k for k in expected if k not in out]
        if missing:
            raise UserError(f"{source}: checkpoint is missing {len(missing)} key(s), first {missing[0]!r}; "
                            "it is not a BertForMaskedLM checkpoint for this config")
        unexpected = [k for k in out if k not in expected]
        if unexpected:
            raise UserError(f"{source}: checkpoint has unexpected key {unexpected[0]!r} "
                            f"({len(unexpected)} in all); it is not a BertForMaskedLM checkpoint")
        for k, v in out.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise UserError(f"{source}: {k!r} has shape {tuple(v.shape)} in the checkpoint but "
                                f"{tuple(expected[k].shape)} from config.json; the files do not match")
        return out


def _read_weights(directory: str, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """Read model.safetensors (single or sharded) or, failing that, pytorch_model.bin (weights_only)."""
    from safetensors.torch import load_file

    device = str(map_location)
    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(single):
        return load_file(single, device=device)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard), device=device))
        return state
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location=map_location, weights_only=True)
    raise UserError(f"{directory} has config.json but no weights: expected {WEIGHTS_NAME}, "
                    f"{WEIGHTS_INDEX_NAME} or {LEGACY_WEIGHTS_NAME}")
