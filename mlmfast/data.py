"""Text in, fixed-length rows out: corpus readers, the built-in corpus, datasets and a resumable loader.

    docs = read_corpus("data/")                     # or builtin_corpus(): offline, in every Python install
    train, val = build_datasets(docs, tokenizer, seq_len=128)
    loader = make_loader(train, batch_size=32, seed=0, epoch=0, start_batch=0)
    batch = next(iter(loader))                      # input_ids [B, L], attention_mask [B, L], lengths [B]

Rows are [CLS] tokens [SEP] [PAD]...; a dataset stores them as one int32 tensor [N, L] plus lengths [N]
(and word ids [N, L] for whole-word masking), never as Python lists.

Documents and rows:
- .txt / .md / other text files: a document is a paragraph (lines up to a blank line, joined with "\\n").
  WikiText files (first non-empty line " = Title = ") are split into articles instead: a document runs from
  one " = Title = " line to the next; section headings (" = = Section = = ") stay in it as plain lines.
- .jsonl: one document per line, its "text" field.
- pack=True: documents are concatenated with one [SEP] between neighbours and cut into chunks of L-2 tokens;
  each row is [CLS] chunk [SEP] (only the last row is padded). No token is dropped.
- pack=False: one document per row; a document longer than L-2 tokens continues in further rows of the
  same shape (it is split, not truncated), so no token is dropped either.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import re
import sys
import warnings
from array import array
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mlmfast.errors import UserError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")  # what a directory walk reads
MIN_DOC_CHARS = 40  # built-in corpus: shorter docstrings ("Return self==value.") carry no language

# ====================================================================== built-in corpus
# Standard-library modules not imported for the built-in corpus: GUI toolkits, modules that act on import
# (print, open a browser, change readline), the test suite, and packages that are slow, huge or mostly
# generated (encodings: one codec per file; distutils: replaced by setuptools' copy when installed).
_SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "lib2to3", "distutils",
    "readline", "rlcompleter", "test", "tests", "idle_test", "encodings", "pydoc_data",
})
_BUILTIN_CORPUS: list[str] | None = None
_RST_UNDERLINE = re.compile(r"^[ \t]*([-=*~^#+])\1{3,}[ \t]*\n", re.MULTILINE)  # "*****" under a heading


def builtin_corpus() -> list[str]:
    """The default corpus, offline in every CPython >= 3.10: the help topics of `pydoc_data.topics` (the
    language reference, one document per topic) plus the docstrings of standard-library modules, classes,
    functions and methods (one document per distinct docstring of >= 40 characters).

    Deterministic for a given Python build: modules are walked in sorted order (packages recursively), members
    in sorted order, and duplicates dropped. Imports run with warnings ignored and stdout/stderr silenced; a
    module that fails to import is skipped. Nothing here opens windows or starts threads. CPython 3.11:
    about 1.9 MB of text in about 6,200 documents, built in well under a second; cached after the first call.
    Under `python -OO` docstrings are stripped and only the help topics remain.
    """
    global _BUILTIN_CORPUS
    if _BUILTIN_CORPUS is None:
        _BUILTIN_CORPUS = _builtin_corpus_in_fresh_interpreter()
    return list(_BUILTIN_CORPUS)


def _builtin_corpus_in_fresh_interpreter() -> list[str]:
    """Collect the corpus in a new interpreter: what a docstring walk finds depends on what the current process
    has imported and patched (pytest, torch, ...), so the same corpus on every run needs a fresh process."""
    import json
    import subprocess

    code = "import json, sys; from mlmfast.data import _collect_builtin_corpus as c; json.dump(c(), sys.stdout)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=300, check=True).stdout
        return json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("could not build the built-in corpus in a fresh interpreter (%s); building it here, "
                    "which may differ slightly between processes", exc)
        return _collect_builtin_corpus()


def _collect_builtin_corpus() -> list[str]:
    """Walk the help topics and the standard library (see `builtin_corpus`); run in a fresh interpreter."""
    docs = _DocCollector()
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        docs.add_text(_RST_UNDERLINE.sub("", topics[key]))
    modules = []
    for name in sorted(sys.stdlib_module_names):
        if not name.startswith("_") and name not in _SKIP_MODULES:
            modules.extend(_import_tree(name))
    with warnings.catch_warnings():  # reading some attributes warns (typing.io, typing.re on 3.11)
        warnings.simplefilter("ignore")
        for module in modules:
            docs.add_module(module)
    return docs.texts


def _quiet_import(name: str):
    """Import a module with warnings ignored and stdout/stderr captured; None if it fails in any way."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):
        return None


def _import_tree(name: str) -> list:
    """The module `name` and, for a package, its public submodules (recursively), in sorted order."""
    module = _quiet_import(name)
    if module is None:
        return []
    out = [module]
    path = getattr(module, "__path__", None)
    if path is not None:
        for sub in sorted(info.name for info in pkgutil.iter_modules(path)):
            if not sub.startswith("_") and sub not in _SKIP_MODULES:
                out.extend(_import_tree(f"{name}.{sub}"))
    return out


def _from_stdlib(obj) -> bool:
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        return False
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top == "builtins"


class _DocCollector:
    """Distinct docstrings in visiting order (deduplicated by text; objects visited once)."""

    def __init__(self):
        self.texts: list[str] = []
        self._seen_text: set[str] = set()
        self._seen_obj: set[int] = set()
        self._keep: list = []  # holds visited objects so that their id()s stay unique

    def add_text(self, text) -> None:
        if isinstance(text, str):
            text = text.strip()
            if len(text) >= MIN_DOC_CHARS and text not in self._seen_text:
                self._seen_text.add(text)
                self.texts.append(text)

    def _visit(self, obj) -> bool:
        if id(obj) in self._seen_obj:
            return False
        self._seen_obj.add(id(obj))
        self._keep.append(obj)
        return True

    def add_doc(self, obj) -> None:
        try:
            self.add_text(inspect.getdoc(obj))
        except Exception:  # a broken __doc__ property
            pass

    def add_module(self, module) -> None:
        self.add_doc(module)
        members = vars(module)
        for key in sorted(members):
            value = members[key]
            if inspect.isclass(value):
                if _from_stdlib(value):
                    self.add_class(value)
            elif inspect.isroutine(value) and _from_stdlib(value) and self._visit(value):
                self.add_doc(value)

    def add_class(self, cls) -> None:
        if not self._visit(cls):
            return
        self.add_doc(cls)
        members = vars(cls)
        for key in sorted(members):
            value = members[key]
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isclass(value):
                if _from_stdlib(value):
                    self.add_class(value)
            elif (isinstance(value, property) or inspect.isroutine(value) or inspect.isdatadescriptor(value)) \
                    and self._visit(value):
                self.add_doc(value)


# ====================================================================== reading files
class Corpus(list):
    """A list of documents (str) read by `read_corpus`, plus where they came from.

    files: the files read, in order. replaced_chars: how many invalid UTF-8 sequences became U+FFFD.
    """

    def __init__(self, docs=(), files=(), replaced_chars: int = 0):
        super().__init__(docs)
        self.files = list(files)
        self.replaced_chars = replaced_chars


def read_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Corpus:
    """Documents from text files, directories (recursive; .txt, .text, .md, .jsonl; sorted; hidden entries
    skipped) and .jsonl files (a JSON object with a "text" string per line). See the module docstring for
    how files are split into documents. Invalid UTF-8 is replaced (and counted), never fatal."""
    from mlmfast.prepare import is_prepared_dir  # prepare reads text with this module's readers

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no corpus given: pass one or more text files or directories")
    files: list[Path] = []
    for path in paths:
        if path.is_dir() and is_prepared_dir(path):
            raise UserError(f"{path} holds prepared shards (mlmfast prepare), not text: pass it alone to "
                            "`mlmfast train --data` or `mlmfast eval --data`, or pass the text files")
        if path.is_dir():
            files.extend(_walk(path))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"no such file or directory: {path}")
    docs: list[str] = []
    replaced = 0
    for file in files:
        text, bad = _read_text(file)
        replaced += bad
        docs.extend(_jsonl_documents(text, file) if file.suffix.lower() == ".jsonl" else _text_documents(text))
    if not docs:
        where = ", ".join(str(p) for p in paths)
        raise UserError(f"the corpus at {where} is empty: no text found in {len(files)} file(s) "
                        f"(directories are searched for {', '.join(TEXT_SUFFIXES)} files)")
    return Corpus(docs, [str(f) for f in files], replaced)


def _walk(directory: Path) -> list[Path]:
    """Text files under `directory`, sorted by relative path; hidden files and directories, and directories of
    prepared shards (`mlmfast prepare` output), skipped."""
    from mlmfast.prepare import is_prepared_dir

    found, seen = [], set()
    for root, dirs, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink cycle
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not is_prepared_dir(Path(root, d))]
        found.extend(Path(root, n) for n in names if not n.startswith(".") and n.lower().endswith(TEXT_SUFFIXES))
    return sorted(found, key=lambda p: p.relative_to(directory).parts)


def _read_text(file: Path) -> tuple[str, int]:
    """UTF-8 text (a BOM dropped) and the number of invalid sequences replaced with U+FFFD."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {file}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
        bad = 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))
        log.warning("%s: %d invalid UTF-8 sequence(s) replaced with U+FFFD", file, bad)
    return text.removeprefix("\ufeff"), bad


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = "; sections are " = = Section = = "


def _text_documents(text: str) -> list[str]:
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if _WIKITEXT_TITLE.match(first):
        return _wikitext_documents(lines)
    docs, para = [], []
    for line in chain(lines, [""]):
        line = line.strip()
        if line:
            para.append(line)
        elif para:
            docs.append("\n".join(para))
            para = []
    return docs


def _wikitext_documents(lines: list[str]) -> list[str]:
    docs, article = [], []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) and article:
            docs.append("\n".join(article))
            article = []
        line = line.strip()
        if line.startswith("= ") and line.endswith(" ="):  # a title or section heading: keep its words
            line = line.strip("= ")
        if line:
            article.append(line)
    if article:
        docs.append("\n".join(article))
    return docs


def _jsonl_documents(text: str, file: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}:{lineno}: not valid JSON ({exc.msg}); each line of a .jsonl corpus must "
                            f'be an object like {{"text": "..."}}') from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{file}:{lineno}: no "text" string field; each line of a .jsonl corpus must be an '
                            f'object like {{"text": "..."}}')
        if record["text"].strip():
            docs.append(record["text"].strip())
    return docs


# ====================================================================== datasets
class MLMDataset(Dataset):
    """Fixed-length rows [CLS] ... [SEP] [PAD]...: input_ids int32 [N, L], lengths int32 [N] (non-pad tokens
    per row), word_ids int32 [N, L] or None (per row: equal ids >= 0 = one word; -1 = special or pad)."""

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, word_ids: torch.Tensor | None = None):
        if input_ids.dim() != 2 or lengths.shape != input_ids.shape[:1]:
            raise ValueError(f"input_ids must be [N, L] and lengths [N], got {tuple(input_ids.shape)} and "
                             f"{tuple(lengths.shape)}")
        if word_ids is not None and word_ids.shape != input_ids.shape:
            raise ValueError(f"word_ids must have the shape of input_ids, got {tuple(word_ids.shape)}")
        self.input_ids = input_ids.to(torch.int32).contiguous()
        self.lengths = lengths.to(torch.int32).contiguous()
        self.word_ids = None if word_ids is None else word_ids.to(torch.int32).contiguous()
        self._positions = torch.arange(input_ids.shape[1])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens in all rows ([CLS] and [SEP] included)."""
        return int(self.lengths.sum())

    def __getitem__(self, i: int) -> dict:
        length = int(self.lengths[i])
        item = {"input_ids": self.input_ids[i].long(), "attention_mask": (self._positions < length).long(),
                "length": length}
        if self.word_ids is not None:
            item["word_ids"] = self.word_ids[i].long()
        return item

    def __repr__(self) -> str:
        return (f"MLMDataset(rows={len(self)}, seq_len={self.seq_len}, tokens={self.num_tokens}, "
                f"whole_word={self.word_ids is not None})")


def collate(batch: list[dict]) -> dict:
    """Stack dataset items: input_ids [B, L], attention_mask [B, L], lengths [B] (+ word_ids [B, L])."""
    out = {"input_ids": torch.stack([b["input_ids"] for b in batch]),
           "attention_mask": torch.stack([b["attention_mask"] for b in batch]),
           "lengths": torch.tensor([b["length"] for b in batch], dtype=torch.long)}
    if "word_ids" in batch[0]:
        out["word_ids"] = torch.stack([b["word_ids"] for b in batch])
    return out


def build_datasets(documents: Sequence[str], tokenizer, seq_len: int = 128, pack: bool = True,
                   val_fraction: float = 0.05, seed: int = 0, whole_word: bool = False
                   ) -> tuple[MLMDataset, MLMDataset]:
    """Split documents into train/val (by document, deterministic in `seed`), tokenize them once (batched,
    no specials) and build rows of `seq_len` tokens; see the module docstring for packing.

    val gets round(n * val_fraction) documents, at least 1 when val_fraction > 0 and n >= 2, and never all
    of them; val_fraction == 0 gives an empty val. Each split keeps the documents' original order.
    """
    if isinstance(documents, str):
        raise TypeError("build_datasets expects a list of documents, not one string")
    if not isinstance(seq_len, int) or seq_len < 3:
        raise UserError(f"seq_len must be at least 3 ([CLS] token [SEP]), got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    documents = list(documents)
    n = len(documents)
    if n == 0:
        raise UserError("no documents to build a dataset from: pass a non-empty corpus")
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = sorted(order[:n_val])
    train_idx = sorted(order[n_val:])

    if whole_word:
        ids, words = tokenizer.encode_batch_with_words(documents)
    else:
        ids, words = tokenizer.encode_batch(documents), None
    specials = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)

    def rows(index: list[int]) -> MLMDataset:
        return _build_rows([ids[i] for i in index], None if words is None else [words[i] for i in index],
                           seq_len, pack, *specials)

    train, val = rows(train_idx), rows(val_idx)
    if len(train) == 0:
        raise UserError(f"the {len(train_idx)} training document(s) contain no tokens: pass a corpus with text")
    return train, val


def _flat_int32(pieces: list[list[int]]) -> torch.Tensor:
    buf = array("i", chain.from_iterable(pieces))
    if len(buf) == 0:
        return torch.zeros(0, dtype=torch.int32)
    return torch.frombuffer(buf, dtype=torch.int32).clone()


def _build_rows(ids: list[list[int]], words: list[list[int]] | None, seq_len: int, pack: bool,
                cls_id: int, sep_id: int, pad_id: int, block_rows: int = 1 << 16) -> MLMDataset:
    """Rows [CLS] chunk [SEP] [PAD]... from tokenized documents (empty documents skipped)."""
    body = seq_len - 2  # tokens of text per row
    keep = [i for i, doc in enumerate(ids) if doc]
    ids = [ids[i] for i in keep]
    words = None if words is None else [words[i] for i in keep]
    if not ids:
        empty = torch.zeros(0, seq_len, dtype=torch.int32)
        return MLMDataset(empty, torch.zeros(0, dtype=torch.int32), None if words is None else empty.clone())

    # 1. One flat token stream; segments = the spans that rows may not cross.
    if pack:  # doc0 [SEP] doc1 [SEP] doc2 ...: one segment
        pieces = [ids[0]]
        for doc in ids[1:]:
            pieces += [[sep_id], doc]
    else:  # one segment per document
        pieces = ids
    flat = _flat_int32(pieces)
    seg_len = torch.tensor([flat.numel()] if pack else [len(doc) for doc in ids], dtype=torch.long)
    seg_start = torch.cumsum(seg_len, 0) - seg_len

    flat_words = None
    if words is not None:  # word ids made unique over the whole stream: offset each document's ids
        word_pieces = [words[0]]
        for doc_words in words[1:]:
            word_pieces += [[-1], doc_words]
        doc_offsets = torch.tensor([0] + [max(w, default=-1) + 1 for w in words[:-1]], dtype=torch.long)
        doc_offsets = torch.cumsum(doc_offsets, 0)
        lens = torch.tensor([len(w) for w in words], dtype=torch.long)
        if pack:  # separator pieces: offset 0 (their word id stays -1)
            piece_offsets = torch.stack([doc_offsets, torch.zeros_like(doc_offsets)], 1).flatten()[:-1]
            piece_lens = torch.stack([lens, torch.ones_like(lens)], 1).flatten()[:-1]
        else:
            word_pieces = words
            piece_offsets, piece_lens = doc_offsets, lens
        raw = _flat_int32(word_pieces).long()
        flat_words = torch.where(raw >= 0, raw + torch.repeat_interleave(piece_offsets, piece_lens), -1)

    # 2. Rows: segment s gives ceil(len / body) rows starting every `body` tokens.
    rows_per_seg = (seg_len + body - 1) // body
    row_seg = torch.repeat_interleave(torch.arange(len(seg_len)), rows_per_seg)
    first_row = torch.cumsum(rows_per_seg, 0) - rows_per_seg
    k = torch.arange(len(row_seg)) - first_row[row_seg]  # row index within its segment
    row_start = seg_start[row_seg] + k * body
    row_len = torch.minimum(seg_len[row_seg] - k * body, torch.tensor(body))
    num_rows = len(row_seg)

    # 3. Gather each row's chunk, in blocks of rows to bound the [rows, body] index tensor.
    input_ids = torch.full((num_rows, seq_len), pad_id, dtype=torch.int32)
    word_ids = None if flat_words is None else torch.full((num_rows, seq_len), -1, dtype=torch.int32)
    cols = torch.arange(body)
    last = flat.numel() - 1
    for lo in range(0, num_rows, block_rows):
        hi = min(lo + block_rows, num_rows)
        index = (row_start[lo:hi, None] + cols).clamp_(max=last)  # (R, body)
        valid = cols < row_len[lo:hi, None]  # (R, body)
        r = torch.arange(lo, hi)
        input_ids[lo:hi, 1:seq_len - 1] = torch.where(valid, flat[index], pad_id)
        input_ids[lo:hi, 0] = cls_id
        input_ids[r, row_len[lo:hi] + 1] = sep_id
        if flat_words is not None:  # renumber per row from 0: the smallest word id of the row
            w = torch.where(valid, flat_words[index], -1)  # (R, body)
            row_min = torch.where(w >= 0, w, torch.iinfo(torch.long).max).amin(1, keepdim=True)
            word_ids[lo:hi, 1:seq_len - 1] = torch.where(w >= 0, w - row_min, -1).to(torch.int32)
    return MLMDataset(input_ids, (row_len + 2).to(torch.int32), word_ids)


# ====================================================================== loading
class ResumableSampler(Sampler[int]):
    """Indices of one epoch: a permutation from torch.Generator seeded with seed + epoch (or 0..n-1 when not
    shuffling; or the dataset's own `epoch_order(seed, epoch)` when given as `order_fn`), starting at
    `start_index`, so a resumed run continues at the exact sample.

    Data parallel (world_size > 1): the epoch's order is cut into global batches of batch_size * world_size
    samples; this rank yields its part [r*B, (r+1)*B) of each, from global batch start_index // (B * W) on, so
    the ranks read disjoint samples and their union is what one process with the global batch would read.
    Only whole global batches are yielded then.
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 start_index: int = 0, order_fn=None, rank: int = 0, world_size: int = 1, batch_size: int = 1):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world size {world_size})")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.order_fn = order_fn
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.set_epoch(epoch, start_index)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch to iterate (and where to start in it; 0 = from the beginning)."""
        if not 0 <= start_index <= self.num_samples:
            raise UserError(f"cannot start at sample {start_index} of an epoch of {self.num_samples} samples")
        self.epoch = epoch
        self.start_index = start_index

    def order(self):
        """All indices of the current epoch, in order (a tensor, or the dataset's lazy sequence)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        if self.order_fn is not None:
            return self.order_fn(self.seed, self.epoch)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def _own_slices(self):
        g = self.batch_size * self.world_size
        for k in range(self.start_index // g, self.num_samples // g):
            lo = k * g + self.rank * self.batch_size
            yield lo, lo + self.batch_size

    def __iter__(self):
        order = self.order()
        if self.world_size == 1:
            if torch.is_tensor(order):
                return iter(order[self.start_index:].tolist())
            return order.iter_from(self.start_index)
        return (int(order[i]) for lo, hi in self._own_slices() for i in range(lo, hi))

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.num_samples - self.start_index
        return sum(hi - lo for lo, hi in self._own_slices())


class _Loader(DataLoader):
    """DataLoader whose worker processes start with TOKENIZERS_PARALLELISM=false when the variable is unset.

    Forking after `tokenizers` used its thread pool makes every child print a warning and turn parallelism
    off; setting the variable for the fork alone silences that, keeps the workers safe and leaves the parent's
    own setting (unset = parallel) as it was.
    """

    def _get_iterator(self):
        if self.num_workers == 0 or "TOKENIZERS_PARALLELISM" in os.environ:
            return super()._get_iterator()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return super()._get_iterator()
        finally:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                drop_last: bool = True, start_batch: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1, pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader with a deterministic order per (seed, epoch); `start_batch=k` yields exactly the batches
    k, k+1, ... of the same epoch without resuming. `loader.sampler.set_epoch(e)` moves to another epoch.
    A dataset with an `epoch_order(seed, epoch)` method (mlmfast.prepare.PreparedDataset) supplies its own
    shuffled order. With world_size > 1 this is rank `rank`'s loader: batches are the rank's part of global
    batches of batch_size * world_size (see ResumableSampler; start_batch counts global batches).
    Workers are persistent; memory is pinned only when CUDA is available."""
    n = len(dataset)
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if n == 0:
        raise UserError("the dataset is empty: use more data (or a smaller --val-fraction)")
    global_batch = batch_size * world_size
    if drop_last and global_batch > n:
        raise UserError(f"batch size {batch_size}{f' x {world_size} processes' if world_size > 1 else ''} is larger "
                        f"than the dataset ({n} rows), so an epoch has no full batch: use a smaller --batch-size "
                        "or more data")
    num_batches = n // global_batch if drop_last or world_size > 1 else -(-n // batch_size)
    if not 0 <= start_batch <= num_batches:
        raise UserError(f"cannot resume at batch {start_batch}: an epoch has {num_batches} batches")
    sampler = ResumableSampler(n, shuffle=shuffle, seed=seed, epoch=epoch,
                               start_index=min(n, start_batch * global_batch),
                               order_fn=getattr(dataset, "epoch_order", None), rank=rank, world_size=world_size,
                               batch_size=batch_size)
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                   drop_last=drop_last, persistent_workers=num_workers > 0,
                   pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                   generator=torch.Generator().manual_seed(seed))
