"""`mlmfast.accelerate(model)`: the fast MLM training step for transformers' own Bert/RobertaForMaskedLM models.

    model = transformers.BertForMaskedLM.from_pretrained(...)
    mlmfast.accelerate(model)                      # in place; returns the model
    loss = model(input_ids=ids, attention_mask=am, labels=labels).loss      # the user's loop is unchanged
    mlmfast.accelerate(model, path="reference")    # back to HF's own forward (one flag away)

What changes: the instance's `forward` (an attribute on the model object; the class is untouched). With
`labels` (HF-style, -100 = ignore) or `positions` / `position_labels`, it runs
    HF embeddings ─▶ per layer: HF q/k/v projections ─▶ fused attention (mlmfast.fast.self_attention)
    ─▶ HF attention-output / intermediate / output modules (the last layer only at the labelled positions)
    ─▶ labelled rows first (no host sync on CUDA) ─▶ HF head transform ─▶ fused linear + cross-entropy
    against the HF decoder's weight and bias
and returns `MaskedLMOutput(loss=..., logits=None)`; logits only with `return_logits=True`, and then only for
the labelled rows ((N, V), row-major: HF's logits[labels != -100]). Without labels (inference, pipelines), and
in eval mode (`model.eval()`: HF Trainer's evaluate / predict / compute_metrics want the full logits) it calls
HF's own forward, full logits and all; `positions=` or `return_logits=True` keep the fast path in eval mode.
Padding: on the CPU the encoder's dense ops skip padded positions by themselves; on a GPU and under
torch.compile they do when the call passes `num_tokens=` (the number of attention_mask positions that are not
0, counted on the host copy of the batch, e.g. `int(batch["attention_mask"].sum())` before `.to("cuda")`).
Right padding (HF's default): `lengths=attention_mask.sum(1)` lets the fused attention take row lengths instead
of a per-key mask (a mask without holes already runs its unmasked blocks; the lengths save the edge loads).
What does not change: the weights are the model's own Parameters (no copy), so optimizers, save_pretrained,
from_pretrained, state_dict and tied embeddings behave as before. Dropout modules are HF's.

Differences from HF that a user can see: the loss of a batch without any labelled token is 0.0 (HF: NaN);
labels are not range-checked (no host sync); hidden states of padded positions are not computed the same way
(they reach no loss; a label at a padded position is an error: UserError on CPU, a device assert on CUDA);
`return_dict=False` gives (loss, logits) with logits None unless requested. Unsupported models and configs
raise a UserError saying what is unsupported, never a silently different loss: decoders, cross-attention,
relative position embeddings, quantized or offloaded (device_map hooks) models, subclasses that override the
forward of a module the fast path bypasses, hooks on those modules (checked at every call), non-2-D attention
masks, inputs_embeds, output_attentions / output_hidden_states (argument or config).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import fast
from ._checks import INT, check_all, check_tensor, shape_str
from .errors import UserError

PATHS = ("fast", "reference")
# class name -> head kind; subclasses of these are accepted too (found through the MRO).
SUPPORTED = {"BertForMaskedLM": "bert", "RobertaForMaskedLM": "roberta", "XLMRobertaForMaskedLM": "roberta"}


# ---- support checks ----------------------------------------------------------------------------------------
def _head_kind(model: nn.Module) -> Optional[str]:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    return None


def unsupported_reasons(model: nn.Module) -> list[str]:
    """Why `accelerate` cannot run this model's fast path (empty list: it can)."""
    kind = _head_kind(model)
    if kind is None:
        return [f"{type(model).__name__} is not supported; supported: {', '.join(SUPPORTED)} "
                "(for mlmfast's own BertForMLM, accelerate() switches it to its fast path)"]
    why = []
    cfg = model.config
    if getattr(cfg, "is_decoder", False):
        why.append("config.is_decoder=True (causal attention); the fast path is bidirectional only")
    if getattr(cfg, "add_cross_attention", False):
        why.append("config.add_cross_attention=True; the fast path has no cross-attention")
    pet = getattr(cfg, "position_embedding_type", None)
    if pet not in (None, "absolute"):
        why.append(f"config.position_embedding_type={pet!r}; only absolute position embeddings are supported")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        why.append("the model is quantized; the fused head needs the decoder weight as a plain tensor")
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        why.append("the model has accelerate device-map / offload hooks; load it on one device instead")
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if base is None or getattr(base, "embeddings", None) is None or layers is None:
        why.append("the model has no <base>.embeddings / <base>.encoder.layer modules (an unknown layout)")
        return why
    for i, layer in enumerate(layers):
        sa = getattr(getattr(layer, "attention", None), "self", None)
        if sa is None or not all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value")):
            why.append(f"layer {i}: no attention.self.query/key/value linears (an unknown attention module)")
            break
        if getattr(sa, "all_head_size", cfg.hidden_size) != cfg.hidden_size:
            why.append(f"layer {i}: all_head_size {sa.all_head_size} != hidden_size {cfg.hidden_size}")
            break
        if hasattr(layer, "crossattention"):
            why.append(f"layer {i} has cross-attention")
            break
        if not all(hasattr(layer, n) for n in ("intermediate", "output")) or not hasattr(layer.attention, "output"):
            why.append(f"layer {i}: no attention.output / intermediate / output modules (an unknown layout)")
            break
    try:
        _head(model)
    except (AttributeError, TypeError) as exc:
        why.append(f"the MLM head has an unknown layout ({exc})")
        return why
    for name, m in _bypassed_modules(model):
        cls = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
        if not cls.__module__.startswith(("transformers.", "torch.nn.")):
            why.append(f"{name}: its forward is overridden by {cls.__module__}.{cls.__qualname__}, which the fast path "
                       "would skip (it calls the module's parts); accelerate the stock transformers class")
    why += _hook_reasons(model)
    return why


def _bypassed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose own forward the fast path does not call (it calls their parts), the
    model included. Modules it calls (embeddings, q/k/v, attention.output, intermediate, output, the head
    transform) run as usual, hooks and all."""
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    out = [("the model", model), (prefix, base), (f"{prefix}.encoder", base.encoder)]
    for i, layer in enumerate(base.encoder.layer):
        at = f"{prefix}.encoder.layer.{i}"
        out += [(at, layer), (f"{at}.attention", layer.attention), (f"{at}.attention.self", layer.attention.self)]
    if _head_kind(model) == "bert":
        out += [("cls", model.cls), ("cls.predictions", model.cls.predictions)]
    else:
        out += [("lm_head", model.lm_head)]
    out.append(("the decoder (output embeddings)", model.get_output_embeddings()))
    return out


def _hook_reasons(model: nn.Module) -> list[str]:
    """Hooks the fast path would not run: those on the modules it bypasses (the model's own run as usual)."""
    return [f"{name} has {kind.strip('_').replace('_', ' ')} that the fast path would not run; remove them, or "
            "use mlmfast.accelerate(model, path='reference')"
            for name, m in _bypassed_modules(model)[1:] for kind in fast.MODULE_HOOKS if getattr(m, kind, None)]


def _head(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """(transform: rows (N, H) -> (N, H), decoder Linear) of the model's MLM head, HF's own modules."""
    decoder = model.get_output_embeddings()
    if not isinstance(decoder, nn.Linear):
        raise TypeError(f"the output embeddings are a {type(decoder).__name__}, not an nn.Linear")
    if _head_kind(model) == "bert":
        return model.cls.predictions.transform, decoder
    head = model.lm_head
    gelu = getattr(sys.modules.get(type(head).__module__), "gelu", None) or F.gelu  # the function HF's head calls
    dense, norm = head.dense, head.layer_norm

    def transform(x: torch.Tensor) -> torch.Tensor:
        return norm(gelu(dense(x)))  # RobertaLMHead.forward without its decoder

    return transform, decoder


# ---- the forward that replaces HF's ------------------------------------------------------------------------
_IGNORED_KWARGS = ("num_items_in_batch", "use_cache", "return_dict")  # HF ignores them for an MLM loss too


def _fast_forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                  token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                  inputs_embeds: Optional[torch.Tensor] = None, encoder_hidden_states: Optional[torch.Tensor] = None,
                  encoder_attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                  positions: Optional[torch.Tensor] = None, position_labels: Optional[torch.Tensor] = None,
                  return_logits: bool = False, num_tokens: Optional[int] = None,
                  lengths: Optional[torch.Tensor] = None, **kwargs: Any):
    """HF's MLM forward signature, plus positions / position_labels (B, P), return_logits, num_tokens (the
    number of attention_mask positions that are not 0, counted on the host copy of the batch: with it a padded
    batch runs the encoder's dense ops on its real tokens on a GPU and under torch.compile too; see the module)
    and lengths ((B,) row lengths of a right-padded attention_mask: the fused attention takes them instead of a
    per-key mask; checked against the mask)."""
    from transformers.modeling_outputs import MaskedLMOutput

    if positions is None and not return_logits and (labels is None or not self.training):
        # inference, and evaluation in eval mode (HF Trainer's evaluate / predict / compute_metrics read the full
        # logits): HF's own forward, full logits and all
        if labels is None and self.training and not getattr(self, "_mlmfast_warned_no_labels", False):
            self._mlmfast_warned_no_labels = True
            warnings.warn("mlmfast.accelerate: the model was called in training mode without labels, so HF's own "
                          "forward ran (not accelerated). HF's Trainer does this when label_smoothing_factor > 0 "
                          "(it computes the loss itself); pass labels to the model to use the fast path.",
                          stacklevel=5)  # the caller of model(...)
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  encoder_hidden_states=encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, labels=labels, **kwargs)
    for name, value in (("inputs_embeds", inputs_embeds), ("encoder_hidden_states", encoder_hidden_states),
                        ("encoder_attention_mask", encoder_attention_mask)):
        if value is not None:
            raise UserError(f"mlmfast.accelerate: {name} is not supported on the fast path; pass input_ids, or "
                            "switch back with mlmfast.accelerate(model, path='reference')")
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.get(name, getattr(self.config, name, False)):
            raise UserError(f"mlmfast.accelerate: {name}=True (argument or config) is not supported on the fast path "
                            "(the fused kernels keep neither); set it False, or switch back with "
                            "mlmfast.accelerate(model, path='reference')")
    hooks = _hook_reasons(self)  # hooks may be added after accelerate()
    if hooks:
        raise UserError("mlmfast.accelerate: " + "; ".join(hooks))
    return_dict = kwargs.get("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    _check_inputs(input_ids, attention_mask, token_type_ids, labels)
    if labels is not None:
        labels = labels.to(input_ids.device)
    fast.check_targets(input_ids, labels, positions, position_labels)
    backend = self._mlmfast_backend
    base = getattr(self, self.base_model_prefix)
    keep = None if attention_mask is None else attention_mask.to(input_ids.device) != 0  # (B, L) bool
    x = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)  # (B, L, H)
    *layers, last = base.encoder.layer
    fast.check_num_tokens(num_tokens, *input_ids.shape)
    if lengths is not None:
        lengths = lengths.to(input_ids.device)
    fast.check_lengths(lengths, keep, *input_ids.shape)
    plan = fast.unpad_plan(keep, backend, num_tokens) if layers else None  # padded enough: dense ops on real tokens
    if plan is not None:
        x = plan.pack(x)  # (T, H)
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(_layer, layer, x, keep, backend, self.training, None, plan,
                                                  lengths, use_reentrant=False)
        else:
            x = _layer(layer, x, keep, backend, self.training, None, plan, lengths)
    if plan is not None:
        x = plan.unpack(x)  # (B, L, H), zeros at the padding
    B, L, _ = x.shape
    pos, lab = fast.target_positions(B, L, x.device, labels if positions is None else None, positions,
                                     position_labels)  # (B, P) positions to predict
    if keep is not None:  # a label at a padded position: HF computes it (from a padded query row), we cannot
        lab_ok = lab != fast.IGNORE_INDEX
        at_token = keep.gather(1, pos.clamp(max=L - 1))
        check_all(~lab_ok | at_token, "mlmfast.accelerate: a label (!= -100) sits at a padded position "
                  "(attention_mask == 0); HF's collators never do that: set those labels to -100")
    rows = _layer(last, x, keep, backend, self.training, pos)  # (B*P, H): the last layer at those rows only
    sel = fast.compact_rows(rows, lab)  # (C, H), labelled rows first
    transform, decoder = _head(self)
    loss, logits = fast.mlm_head_loss(sel, transform, decoder.weight, decoder.bias, backend, return_logits)
    if not return_dict:
        return (loss, logits)  # HF's order; logits None unless return_logits=True
    return MaskedLMOutput(loss=loss, logits=logits)


def _layer(layer: nn.Module, x: torch.Tensor, keep: Optional[torch.Tensor], backend: str, training: bool,
           queries: Optional[torch.Tensor] = None, unpadded: Optional[fast.Unpadded] = None,
           seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One HF encoder layer with the fast attention core (at `queries` only, when given; on the real tokens
    (T, H) only with `unpadded`: see fast.encoder_layer); every other module is HF's own."""
    sa = layer.attention.self
    return fast.encoder_layer(
        x, sa, sa.num_attention_heads, keep, sa.dropout.p if training else 0.0, backend,
        attn_output=layer.attention.output,  # dense -> dropout -> LayerNorm(+ x)
        ffn=lambda h: layer.output(layer.intermediate(h), h),  # feed-forward (HF's chunking does not change the math)
        scale=getattr(sa, "scaling", None), queries=queries, unpadded=unpadded, seqlens=seqlens)


def _check_inputs(input_ids, attention_mask, token_type_ids, labels) -> None:
    """Shapes and dtypes only (mlmfast._checks): nothing here reads a tensor's values (no host sync). As in HF,
    attention_mask and labels may sit on another device (they are moved)."""
    op = dict(op="mlmfast.accelerate")
    check_tensor("input_ids", input_ids, "a 2-D tensor of integer token ids [B, L]", dtypes=INT, shape=(None, None),
                 **op)
    like = f"[B, L] = {shape_str(input_ids.shape)} (input_ids' shape; 4-D attention masks are not supported on " \
           "the fast path)"
    same = dict(shape=tuple(input_ids.shape), optional=True, **op)
    check_tensor("attention_mask", attention_mask, f"a tensor {like}", **same)
    check_tensor("token_type_ids", token_type_ids, f"an integer tensor {like}", dtypes=INT,
                 device=input_ids.device, device_of="input_ids", **same)
    check_tensor("labels", labels, f"an integer tensor {like}", dtypes=INT, **same)


# ---- the public function -------------------------------------------------------------------------------------
def accelerate(model: nn.Module, *, path: str = "fast", backend: str = "auto") -> nn.Module:
    """Run `model`'s MLM training step on mlmfast's fast path, in place; returns the model.

    model: transformers BertForMaskedLM / RobertaForMaskedLM / XLMRobertaForMaskedLM (or subclasses), or
    mlmfast's BertForMLM (then this is `model.set_path(path, backend)`). path "fast" | "reference" (HF's own
    forward). backend "auto" | "kernel" | "torch" (see mlmfast.fast). Raises UserError, listing every reason,
    when the model or its config cannot run the fast path.
    """
    from .model import BertForMLM

    if path not in PATHS:
        raise UserError(f"mlmfast.accelerate: path {path!r} is not known; use one of {', '.join(PATHS)}")
    fast.check_backend(backend)
    if isinstance(model, BertForMLM):
        return model.set_path(path, backend)
    if path == "reference":
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_mlmfast_backend", None)
        return model
    why = unsupported_reasons(model)
    if why:
        raise UserError("mlmfast.accelerate cannot run this model's fast path: " + "; ".join(why))
    model._mlmfast_backend = backend
    model.forward = _FastForward(model)
    return model


class _FastForward:
    """The instance's forward: `_fast_forward` bound to the model. A class rather than a bound method, so that
    `torch.save(model)` / pickle round-trip (a bound method pickles as getattr(model, "_fast_forward"))."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any):
        return _fast_forward(self.model, *args, **kwargs)


def is_accelerated(model: nn.Module) -> bool:
    from .model import BertForMLM

    if isinstance(model, BertForMLM):
        return model.path == "fast"
    return isinstance(model.__dict__.get("forward"), _FastForward)
