"""BERT-style WordPiece tokenizer: train, encode, save and load, built on the `tokenizers` library.

`MLMTokenizer` wraps a `tokenizers.Tokenizer` and adds what pretraining needs: the ids of the special tokens
(looked up by their strings, so real BERT vocabularies with [UNK]=100 ... [MASK]=103 work), batched encoding
without [CLS]/[SEP] (the dataset adds them per row), per-token word ids for whole-word masking, a fingerprint
that checkpoints store, and a directory format that `transformers.BertTokenizerFast` / `AutoTokenizer` load.

    tok = train_tokenizer(texts, vocab_size=8192)       # [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
    tok.save("out/tokenizer")                           # tokenizer.json, vocab.txt, tokenizer_config.json, ...
    tok = MLMTokenizer.load("out/tokenizer")            # tokenizer.json, else vocab.txt (+ tokenizer_config.json)

Parallelism: `tokenizers` encodes a batch on all cores unless TOKENIZERS_PARALLELISM says otherwise; this
module never sets that variable (see `mlmfast.data.make_loader` for how worker forks stay quiet).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mlmfast._io import atomic_write_text
from mlmfast.errors import UserError

# Role -> default token string; training puts them at ids 0..4 in this order.
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_ENCODE_CHUNK = 8192  # texts per `encode_batch` call: bounds the memory held in `Encoding` objects


class MLMTokenizer:
    """A `tokenizers.Tokenizer` plus the special-token bookkeeping MLM pretraining needs.

    `special_tokens` maps role ("pad", "unk", "cls", "sep", "mask") to token string; every one must be in the
    vocabulary. Padding and truncation are switched off on the wrapped tokenizer (rows are built by
    `mlmfast.data`), so `encode_batch` returns every token of every text.
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str] | None = None, *,
                 model_max_length: int | None = None, source: str = "the tokenizer"):
        if tokenizer.padding is not None:
            tokenizer.no_padding()
        if tokenizer.truncation is not None:
            tokenizer.no_truncation()
        self._tok = tokenizer
        self._tokens = {**SPECIAL_TOKENS, **(special_tokens or {})}
        self.model_max_length = model_max_length
        ids = {role: tokenizer.token_to_id(tok) for role, tok in self._tokens.items()}
        missing = [self._tokens[role] for role, i in ids.items() if i is None]
        if missing:
            raise UserError(
                f"{source} has no {', '.join(missing)} in its vocabulary: MLM pretraining needs "
                f"{', '.join(self._tokens.values())}; add them to the vocabulary or train a new tokenizer "
                f"with `mlmfast tokenizer`")
        self._ids: dict[str, int] = ids  # type: ignore[assignment]
        # max id + 1, not the token count: a vocab.txt with a repeated line leaves a gap in the ids
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    # ---------------------------------------------------------------- special tokens and vocabulary
    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs: the largest token id + 1."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_token_id(self) -> int:
        return self._ids["unk"]

    @property
    def cls_token_id(self) -> int:
        return self._ids["cls"]

    @property
    def sep_token_id(self) -> int:
        return self._ids["sep"]

    @property
    def mask_token_id(self) -> int:
        return self._ids["mask"]

    @property
    def mask_token(self) -> str:
        return self._tokens["mask"]

    @property
    def special_token_ids(self) -> list[int]:
        """Sorted ids of [PAD], [UNK], [CLS], [SEP], [MASK] (the tokens masking never selects)."""
        return sorted(set(self._ids.values()))

    @property
    def lowercase(self) -> bool:
        return bool(_normalizer_flags(self._tok)["do_lower_case"])

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    # ---------------------------------------------------------------- encoding
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without [CLS]/[SEP]; batched and parallel in `tokenizers`."""
        texts = _check_texts(texts)
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: skips offsets
        out: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            out.extend(enc.ids for enc in encode(texts[start:start + _ENCODE_CHUNK], add_special_tokens=False))
        return out

    def encode_batch_with_words(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(ids, word_ids): word_ids[t][k] = index of the word of token k within text t (BertPreTokenizer
        words: punctuation is its own word); -1 for a token that belongs to no word (an added token)."""
        texts = _check_texts(texts)
        ids: list[list[int]] = []
        words: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            for enc in self._tok.encode_batch(texts[start:start + _ENCODE_CHUNK], add_special_tokens=False):
                ids.append(enc.ids)
                words.append([-1 if w is None else w for w in enc.word_ids])
        return ids, words

    def encode_for_model(self, text: str) -> list[int]:
        """[CLS] tokens [SEP]: the input of one sequence for the model (e.g. for `mlmfast fill`)."""
        return [self.cls_token_id, *self._tok.encode(text, add_special_tokens=False).ids, self.sep_token_id]

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids):
        """One id -> token string; a sequence (or tensor) of ids -> list of strings (None for unknown ids)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        """One token -> id; a list of tokens -> list of ids; tokens not in the vocabulary map to [UNK]."""
        if isinstance(tokens, str):
            i = self._tok.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer (vocabulary, normalizer, ...): checkpoints store it."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return (f"MLMTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase}, "
                f"mask={self.mask_token}:{self.mask_token_id}, fingerprint={self.fingerprint()[:12]})")

    # ---------------------------------------------------------------- save / load
    def save(self, directory: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write tokenizer.json, vocab.txt (one token per line, in id order), tokenizer_config.json and
        special_tokens_map.json; `transformers.AutoTokenizer.from_pretrained(directory)` loads the result.
        Each file is written to a temporary file and renamed, so a reader never sees half a file.
        model_max_length: recorded when the tokenizer has no bound of its own (a model's positions: HF truncation)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = self.get_vocab()
        tokens = [""] * len(vocab)
        for tok, i in vocab.items():
            if not 0 <= i < len(tokens) or tokens[i]:
                raise UserError(f"cannot write vocab.txt: the token ids of {self!r} are not 0..{len(vocab) - 1}")
            tokens[i] = tok
        bad = [t for t in tokens if "\n" in t or "\r" in t]
        if bad:
            raise UserError(f"cannot write vocab.txt: tokens contain line breaks: {bad[:3]!r}")
        specials = {f"{role}_token": tok for role, tok in self._tokens.items()}
        config = {"tokenizer_class": "BertTokenizer", **_normalizer_flags(self._tok), **specials}
        bound = self.model_max_length if self.model_max_length is not None else model_max_length
        if bound is not None:
            config["model_max_length"] = int(bound)
        atomic_write_text(directory / "tokenizer.json", self._tok.to_str(pretty=True))
        atomic_write_text(directory / "vocab.txt", "".join(t + "\n" for t in tokens))
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(directory / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MLMTokenizer:
        """Load from a directory with tokenizer.json (ours or one `transformers` saved), else vocab.txt (a BERT
        WordPiece vocabulary; lowercasing from tokenizer_config.json `do_lower_case`, default True)."""
        path = Path(directory)
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise UserError(f"tokenizer directory {path} {what}: pass a directory that holds tokenizer.json or "
                            f"vocab.txt, or train one with `mlmfast tokenizer`")
        config = _read_json(path / "tokenizer_config.json")
        specials = {role: _token_str(config.get(f"{role}_token"), default)
                    for role, default in SPECIAL_TOKENS.items()}
        max_len = config.get("model_max_length")
        max_len = int(max_len) if isinstance(max_len, (int, float)) and 0 < max_len < 1e9 else None
        if (path / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:  # tokenizers raises its own Exception subclass for a bad file
                raise UserError(f"could not read {path / 'tokenizer.json'}: {exc}; re-save the tokenizer or "
                                f"delete the file to load vocab.txt instead") from exc
        elif (path / "vocab.txt").is_file():
            tok = _bert_wordpiece_from_vocab(path / "vocab.txt", config, specials)
        else:
            raise UserError(f"no tokenizer in {path}: expected tokenizer.json or vocab.txt; train one with "
                            f"`mlmfast tokenizer` or point to a BERT tokenizer directory")
        return cls(tok, specials, model_max_length=max_len, source=f"the tokenizer in {path}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, lowercase: bool = True,
                    min_frequency: int = 2, show_progress: bool = False) -> MLMTokenizer:
    """Train a BERT WordPiece tokenizer (BertNormalizer, BertPreTokenizer, "##" continuations, [CLS] A [SEP]
    / [CLS] A [SEP] B [SEP] templates) with [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.

    `vocab_size` is an upper bound: a small corpus may give fewer tokens. The alphabet is limited to
    min(1000, vocab_size - 5) characters, as BERT does, so rare characters become [UNK].
    """
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < len(specials) + 1:
        raise UserError(f"vocab_size {vocab_size} is too small: it must be at least {len(specials) + 1}")
    if min_frequency < 0:
        raise UserError(f"min_frequency must be >= 0, got {min_frequency}")
    if isinstance(texts, str):
        raise TypeError("train_tokenizer expects an iterable of texts, not one string")
    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk"], continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=show_progress,
        limit_alphabet=min(1000, vocab_size - len(specials)), continuing_subword_prefix="##")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts) if hasattr(texts, "__len__") else None)
    if tok.get_vocab_size() <= len(specials):
        raise UserError("the training texts are empty: the tokenizer learned no tokens; pass a corpus with text")
    # The trainer assigns ids in hash-map order (its alphabet differs run to run), so the same corpus gives the
    # same token set under different ids. Renumber canonically (specials first, then sorted) so that a run,
    # its resume and a rerun agree on every id.
    learned = tok.get_vocab()
    ordered = specials + sorted(t for t in learned if t not in specials)
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(ordered)}, unk_token=SPECIAL_TOKENS["unk"],
                                 continuing_subword_prefix="##")
    cls_id, sep_id = tok.token_to_id(SPECIAL_TOKENS["cls"]), tok.token_to_id(SPECIAL_TOKENS["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return MLMTokenizer(tok, source="the trained tokenizer")


# -------------------------------------------------------------------- helpers
def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, not one string (wrap it in a list)")
    return texts if isinstance(texts, list) else list(texts)


def _normalizer_flags(tok: Tokenizer) -> dict:
    """tokenizer_config.json flags (`do_lower_case`, ...) that match the tokenizer's normalizer."""
    norm = tok.normalizer
    if isinstance(norm, normalizers.BertNormalizer):
        return {"do_lower_case": bool(norm.lowercase), "tokenize_chinese_chars": bool(norm.handle_chinese_chars),
                "strip_accents": norm.strip_accents}
    return {"do_lower_case": norm is not None and '"Lowercase"' in json.dumps(json.loads(tok.to_str())["normalizer"])}


def _bert_wordpiece_from_vocab(vocab_path: Path, config: dict, specials: dict[str, str]) -> Tokenizer:
    """The BERT WordPiece pipeline over a vocab.txt (what `transformers` builds for a vocab-only directory)."""
    from tokenizers.implementations import BertWordPieceTokenizer

    try:
        vocab = models.WordPiece.read_file(str(vocab_path))
    except Exception as exc:
        raise UserError(f"could not read {vocab_path}: {exc}") from exc
    missing = [t for t in specials.values() if t not in vocab]
    if missing:
        raise UserError(f"{vocab_path} has no {', '.join(missing)}: MLM pretraining needs "
                        f"{', '.join(specials.values())}; add them to the vocabulary or train a new tokenizer "
                        f"with `mlmfast tokenizer`")
    wrapper = BertWordPieceTokenizer(
        vocab, unk_token=specials["unk"], sep_token=specials["sep"], cls_token=specials["cls"],
        pad_token=specials["pad"], mask_token=specials["mask"],
        lowercase=bool(config.get("do_lower_case", True)), strip_accents=config.get("strip_accents"),
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)))
    return wrapper._tokenizer  # the public wrapper only forwards to this `tokenizers.Tokenizer`


def _token_str(value, default: str) -> str:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return default


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"could not read {path}: {exc}; fix or delete the file") from exc
    return data if isinstance(data, dict) else {}


