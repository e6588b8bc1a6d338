"""Loading a trained model from a run, checkpoint or HF directory; fill-mask predictions."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from .errors import UserError


def resolve_model_dir(path: str) -> str:
    """A directory holding config.json + weights: the path itself, a run's final model, or its newest checkpoint."""
    from .checkpoint import latest_valid_checkpoint

    if not os.path.exists(path):
        raise UserError(f"no such directory: {path}")
    if not os.path.isdir(path):
        raise UserError(f"{path} is a file; pass a run directory, a checkpoint directory or a model directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    final = os.path.join(path, "model")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    ckpt = latest_valid_checkpoint(path, log=lambda msg: print(msg, file=sys.stderr))
    if ckpt:
        return ckpt
    raise UserError(f"{path} is not a checkpoint: it holds no config.json, no model/ and no checkpoints/; "
                    "pass the --out directory of a training run or an HF BERT directory")


def load_model_and_tokenizer(path: str, device: torch.device | str = "cpu"):
    from .model import BertForMLM
    from .tokenizer import MLMTokenizer

    model_dir = resolve_model_dir(path)
    model = BertForMLM.from_pretrained(model_dir).to(device).eval()
    tokenizer = MLMTokenizer.load(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but the model's "
                        f"vocab_size is {model.config.vocab_size}: they do not belong together")
    return model, tokenizer, model_dir


@dataclass
class MaskPrediction:
    position: int  # index of the [MASK] in the encoded sequence ([CLS] at 0)
    candidates: list[tuple[str, float]]  # (token, probability), best first


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[MaskPrediction]:
    """Top-k predictions for every [MASK] in `text`."""
    if top_k < 1:
        raise UserError(f"--top-k {top_k} must be >= 1")
    ids = tokenizer.encode_for_model(text)
    max_len = model.config.max_position_embeddings
    if len(ids) > max_len:
        raise UserError(f"the text is {len(ids)} tokens long, more than the model's {max_len} positions; "
                        "shorten it")
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
    if not positions:
        raise UserError(f"the text has no {tokenizer.mask_token} token (upper case, with the brackets); write e.g. "
                        f"\"The {tokenizer.mask_token} sat on the mat.\"")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    logits = model(input_ids).logits[0, positions].float()  # (M, V)
    special = [i for i in getattr(tokenizer, "special_token_ids", []) if 0 <= i < logits.shape[-1]]
    if len(special) >= logits.shape[-1]:
        special = []
    if special:  # [PAD], [CLS], [MASK], ... are never a fill
        logits[:, special] = float("-inf")
    probs = logits.softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1] - len(special)), dim=-1)
    out = []
    for pos, p_row, i_row in zip(positions, top.values.tolist(), top.indices.tolist()):
        toks = tokenizer.convert_ids_to_tokens(i_row)
        out.append(MaskPrediction(pos, list(zip(toks, p_row))))
    return out
