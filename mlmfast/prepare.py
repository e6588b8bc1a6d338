"""`mlmfast prepare`: tokenize a corpus once into memory-mapped shards that training streams from.

    manifest = prepare_corpus(["data/"], "tok/", "prepared/", workers=8)
    corpus = PreparedCorpus("prepared/")
    corpus.check_tokenizer(tokenizer)                 # the run's tokenizer must be the one that prepared the data
    train = corpus.dataset("train", seq_len=128)      # a torch Dataset: rows built lazily from np.memmap'd shards
    order = train.epoch_order(seed=0, epoch=3)        # lazy shuffled order; order[k] = the k-th sample's row

Layout of a prepared directory (manifest.json is written last, so a directory with one is complete):

    manifest.json              see `prepare_corpus` for the fields
    tokenizer/                 a copy of the tokenizer (MLMTokenizer.save)
    train-00000.bin ...        token stream of the split: uint16 (vocab_size <= 65536) or uint32, native order;
                               documents concatenated with one [SEP] between neighbours, no leading or
                               trailing [SEP]; a shard holds whole documents (at most shard_tokens tokens,
                               unless it is a single longer document)
    train-00000.idx.npy ...    int64 [documents]: start offset of each document in the shard's stream
    val-00000.bin, val-00000.idx.npy ...

Documents are read with the rules of `mlmfast.data.read_corpus` (paragraphs, WikiText articles, .jsonl "text"),
one file at a time; documents with no tokens are dropped. Rows of a `PreparedDataset` are those of
`mlmfast.data._build_rows` applied to one shard's documents: rows never cross shards.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import operator
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mlmfast._io import atomic_write_json, default_modes, sha256_file
from mlmfast.data import TEXT_SUFFIXES, _jsonl_documents, _read_text, _text_documents, _walk
from mlmfast.errors import UserError
from mlmfast.tokenizer import MLMTokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
BATCH_DOCS = 1000  # documents per tokenization task
BATCH_CHARS = 1 << 22  # ... or fewer, when they hold this many characters
TASKS_PER_WORKER = 4  # tokenization tasks in flight per worker: bounds the memory held in results
MAX_OPEN_SHARDS = 64  # memmaps a dataset keeps open per process (each holds a file descriptor)
CACHED_ROW_TABLES = 4  # pack=False: shards whose row table a dataset keeps per process
_MASK64 = (1 << 64) - 1


# ====================================================================== preparing
def prepare_corpus(data: Sequence[str | os.PathLike], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   *, workers: int = 0, shard_tokens: int = 2 ** 26, val_fraction: float = 0.005, seed: int = 0,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize the corpus at `data` (files and directories, as `read_corpus` takes them) with the tokenizer in
    `tokenizer_dir` into shards under `out_dir`; returns the manifest (also written to out_dir/manifest.json).

    workers: tokenizer processes (0 = os.cpu_count(); 1 = tokenize in this process, where `tokenizers` may
    use its own threads). The output is
    byte-identical for every value. shard_tokens: a new shard starts when the next document would take the
    current one past this many tokens. val_fraction: share of documents held out (see `_val_mask`: document
    k goes to val when a hash of (seed, k) falls below val_fraction; the first document always goes to train
    and, when val_fraction > 0, the second always to val). A non-empty `out_dir` must be an earlier prepared
    directory, replaced only with `overwrite=True`. The result is built in a hidden sibling directory and
    renamed into place, so an interrupted run leaves `out_dir` as it was.

    Manifest fields: format_version, created (UTC, ISO 8601), tokenizer_fingerprint, vocab_size, dtype
    ("uint16" | "uint32"), cls_id, sep_id, pad_id, seed, val_fraction, shard_tokens, documents, tokens (both
    splits, [SEP]s excluded), empty_documents (dropped: no tokens), source_files, source_bytes,
    replaced_chars (invalid UTF-8 sequences replaced with U+FFFD), splits: {"train" | "val": {documents,
    tokens ([SEP]s included), shards: [{file, index, tokens, documents, sha256, index_sha256, max_id}]}}.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    if workers < 0:
        raise UserError(f"workers must be >= 0 (0 = one per CPU core), got {workers}")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = workers or os.cpu_count() or 1
    out = Path(os.path.abspath(out_dir))  # absolute: "." has no name for the sibling temporary directory
    _check_out_dir(out, overwrite)
    files = _corpus_files(data, exclude=out)
    source_bytes = sum(f.stat().st_size for f in files)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        MLMTokenizer.load(tokenizer_dir).save(tmp / TOKENIZER_DIR)
        tok = MLMTokenizer.load(tmp / TOKENIZER_DIR)  # the copy: what workers and later runs load
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
        writers = {split: _ShardWriter(tmp, split, dtype, tok.sep_token_id, shard_tokens) for split in SPLITS}
        stats = _ReadStats()
        kept = empty = text_tokens = 0  # documents with tokens, documents without, tokens ([SEP]s excluded)
        results = _tokenize(_batches(files, stats), tok, tmp / TOKENIZER_DIR, dtype, workers)
        with contextlib.closing(results), tqdm(total=source_bytes, unit="B", unit_scale=True, desc="prepare",
                                               disable=not progress, dynamic_ncols=True) as bar:
            for (flat, lengths), done_bytes in results:
                nonempty = lengths > 0
                empty += int((~nonempty).sum())
                lengths = lengths[nonempty]
                in_val = _val_mask(np.arange(kept, kept + len(lengths)), seed, val_fraction)
                kept += len(lengths)
                text_tokens += int(lengths.sum())
                token_in_val = np.repeat(in_val, lengths)
                writers["train"].add(flat[~token_in_val], lengths[~in_val])
                writers["val"].add(flat[token_in_val], lengths[in_val])
                bar.update(done_bytes)
                bar.set_postfix(docs=kept, tokens=text_tokens, refresh=False)
        splits = {split: writers[split].close() for split in SPLITS}
        if kept == 0:
            where = ", ".join(str(p) for p in data)
            raise UserError(f"the corpus at {where} is empty: no tokens in {len(files)} file(s) (directories are "
                            f"searched for {', '.join(TEXT_SUFFIXES)} files); pass files with text")
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "cls_id": tok.cls_token_id,
            "sep_id": tok.sep_token_id,
            "pad_id": tok.pad_token_id,
            "seed": seed,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "documents": kept,
            "tokens": text_tokens,
            "empty_documents": empty,
            "source_files": [str(f) for f in files],
            "source_bytes": source_bytes,
            "replaced_chars": stats.replaced_chars,
            "splits": splits,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s: %d documents, %d tokens in %.1f s", out, kept, manifest["tokens"],
             time.perf_counter() - started)
    return manifest


def _remove_stale_siblings(out: Path) -> None:
    """Delete `.NAME.tmp-PID-*` / `.NAME.old-PID-*` next to `out` whose process no longer runs (a prepare that
    was killed); those of a live process (a concurrent prepare) are left alone."""
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*-*"):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """UserError unless `out` may receive a prepared corpus: absent, an empty directory, or (with overwrite)
    an earlier prepared directory."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory for the prepared corpus")
    if not any(out.iterdir()):
        return
    if not is_prepared_dir(out):
        raise UserError(f"--out {out} is a non-empty directory that is not a prepared corpus (no {MANIFEST}): "
                        f"pass a new or empty directory; nothing there was changed")
    if not overwrite:
        raise UserError(f"--out {out} already holds a prepared corpus: pass --overwrite (overwrite=True) to "
                        f"replace it, or another directory")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory `tmp` to `out` (checked again: another process may have written there)."""
    _check_out_dir(out, overwrite)
    default_modes(tmp)  # mkdtemp's 0700: readable by the other ranks / users, as a mkdir would be
    if out.exists() and any(out.iterdir()):  # an earlier prepared directory: swap it out, then delete it
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)


def _corpus_files(paths: Sequence[str | os.PathLike], exclude: Path) -> list[Path]:
    """The files `read_corpus` would read for `paths`, in its order, except those that a directory walk finds
    under `exclude` (the output directory: its tokenizer/vocab.txt is no corpus)."""
    if not paths:
        raise UserError("no corpus given: pass one or more text files or directories")
    excluded = exclude.resolve()
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(f for f in _walk(path) if excluded not in f.resolve().parents)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"no such file or directory: {path}")
    return files


@dataclasses.dataclass
class _ReadStats:
    replaced_chars: int = 0  # invalid UTF-8 sequences replaced with U+FFFD so far


def _batches(files: list[Path], stats: _ReadStats) -> Iterator[tuple[list[str], int]]:
    """(documents, bytes): batches of up to BATCH_DOCS documents (or BATCH_CHARS characters), reading one file
    at a time; `bytes` = the size of the files whose last document is in this batch or an earlier one but was
    not counted yet (for the progress bar). The last batch may hold no documents."""
    batch: list[str] = []
    chars = done = 0
    for file in files:
        text, bad = _read_text(file)
        stats.replaced_chars += bad
        docs = _jsonl_documents(text, file) if file.suffix.lower() == ".jsonl" else _text_documents(text)
        del text
        for doc in docs:
            batch.append(doc)
            chars += len(doc)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch, done
                batch, chars, done = [], 0, 0
        done += file.stat().st_size
    yield batch, done


# ---------------------------------------------------------------------- tokenizing
_WORKER_TOKENIZER: MLMTokenizer | None = None
_WORKER_DTYPE: np.dtype | None = None


def _encode(tok: MLMTokenizer, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat, lengths): the token ids of all documents concatenated, `dtype` [sum(lengths)], and the token
    count of each document, int64 [len(docs)] (0 for a document without tokens)."""
    ids = tok.encode_batch(docs)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _worker_init(tokenizer_dir: str, dtype: str) -> None:
    global _WORKER_TOKENIZER, _WORKER_DTYPE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER_TOKENIZER = MLMTokenizer.load(tokenizer_dir)
    _WORKER_DTYPE = np.dtype(dtype)


def _worker_encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_WORKER_TOKENIZER, docs, _WORKER_DTYPE)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of the block (restored after)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _tokenize(batches: Iterator[tuple[list[str], int]], tok: MLMTokenizer, tokenizer_dir: Path, dtype: np.dtype,
              workers: int) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], int]]:
    """((flat, lengths), bytes) per batch, in input order (see `_encode`); workers > 1 tokenizes in that many
    processes, at most TASKS_PER_WORKER batches each in flight."""
    if workers == 1:
        for docs, done in batches:
            yield _encode(tok, docs, dtype), done
        return
    start = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    # TOKENIZERS_PARALLELISM=false here for the pool's lifetime (it forks its workers at the first submit), so
    # that `tokenizers` does not warn in each child about a fork after its thread pool was used.
    with _env("TOKENIZERS_PARALLELISM", "false"):
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(start), initializer=_worker_init,
            initargs=(str(tokenizer_dir), dtype.name))
        try:
            pending: collections.deque = collections.deque()
            for docs, done in batches:
                pending.append((pool.submit(_worker_encode, docs), done))
                if len(pending) >= workers * TASKS_PER_WORKER:
                    future, done = pending.popleft()
                    yield future.result(), done
            while pending:
                future, done = pending.popleft()
                yield future.result(), done
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer of uint64 values (wrapping arithmetic): a fast, well-mixed 64-bit hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _val_mask(index: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """bool [n]: whether the documents with these running indices (int, among documents with tokens) go to
    val: hash(seed, index) / 2**64 < val_fraction, except that document 0 always goes to train and document 1
    (when val_fraction > 0) always to val, so both splits are non-empty whenever there are >= 2 documents."""
    index = np.asarray(index, dtype=np.uint64)
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    u = (_splitmix64(index ^ key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
    mask = u < val_fraction
    mask[index == 0] = False
    if val_fraction > 0:
        mask[index == 1] = True
    return mask


# ---------------------------------------------------------------------- writing shards
class _ShardWriter:
    """Appends the documents of one split to `{split}-{k:05d}.bin` files (see the module docstring)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, sep_id: int, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.sep = np.array([sep_id], dtype=dtype)
        self.shards: list[dict] = []
        self._file = None

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):05d}"
        self._file = open(self.directory / f"{self._name}.bin", "wb")
        self._sha = hashlib.sha256()
        self._offsets: list[np.ndarray] = []
        self._tokens = self._docs = self._max_id = 0

    def _write(self, data: np.ndarray) -> None:
        self._file.write(memoryview(data))
        self._sha.update(memoryview(data))
        self._tokens += len(data)
        self._max_id = max(self._max_id, int(data.max()))

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        buf = io.BytesIO()
        np.save(buf, np.concatenate(self._offsets).astype(np.int64), allow_pickle=False)
        index = buf.getvalue()
        (self.directory / f"{self._name}.idx.npy").write_bytes(index)
        self.shards.append({"file": f"{self._name}.bin", "index": f"{self._name}.idx.npy", "tokens": self._tokens,
                            "documents": self._docs, "sha256": self._sha.hexdigest(),
                            "index_sha256": hashlib.sha256(index).hexdigest(), "max_id": self._max_id})

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: flat `dtype` [sum(lengths)] = their tokens concatenated, lengths int64 (all > 0)."""
        starts = np.concatenate([[0], np.cumsum(lengths)])
        n, i = len(lengths), 0
        while i < n:
            if self._file is None:
                self._open()
            # Size of this shard after adding documents i..k-1: tokens + k-i documents + k-i [SEP]s (one
            # fewer when the shard is empty).
            sep_first = 1 if self._docs else 0
            after = self._tokens + sep_first - 1 + (starts[i + 1:] - starts[i]) + np.arange(1, n - i + 1)
            k = i + int(np.searchsorted(after, self.shard_tokens, side="right"))
            if k == i:
                if self._docs:  # the next document does not fit: start a new shard
                    self._close_shard()
                    continue
                k = i + 1  # one document longer than a shard gets a shard of its own
            piece = flat[starts[i]:starts[k]]
            rel = starts[i:k] - starts[i]  # document starts within `piece`
            seps = rel if sep_first else rel[1:]
            self._offsets.append(self._tokens + sep_first + rel + np.arange(k - i))
            self._docs += k - i
            self._write(np.insert(piece, seps, self.sep[0]) if len(seps) else piece)
            i = k
            if i < n:  # document i did not fit
                self._close_shard()

    def close(self) -> dict:
        """Finish the last shard; the split's manifest entry {documents, tokens, shards}."""
        if self._file is not None:
            self._close_shard()
        return {"documents": sum(s["documents"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


# ====================================================================== reading
def is_prepared_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `prepare_corpus`: it holds manifest.json (written last) and the
    tokenizer/ copy (token shards, no text to read)."""
    return (Path(path) / MANIFEST).is_file() and (Path(path) / TOKENIZER_DIR).is_dir()


class PreparedCorpus:
    """A directory written by `prepare_corpus`. Opening it reads the manifest and checks that every shard
    file exists with the size the manifest gives (UserError naming the first that does not); `verify()`
    also checks their contents."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not is_prepared_dir(self.path):
            raise UserError(f"{self.path} is not a prepared corpus (no {MANIFEST}): create one with `mlmfast "
                            f"prepare --data FILES --tokenizer DIR --out {self.path}`")
        try:
            self.manifest: dict = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {self.path / MANIFEST}: {exc}; re-run `mlmfast prepare --overwrite` "
                            f"for {self.path}") from exc
        version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
        if version != FORMAT_VERSION:
            raise UserError(f"{self.path} was prepared in format version {version!r}; this mlmfast reads version "
                            f"{FORMAT_VERSION}: re-run `mlmfast prepare --overwrite` for {self.path}")
        missing = [k for k in ("dtype", "splits", "tokenizer_fingerprint", "cls_id", "sep_id", "pad_id")
                   if k not in self.manifest]
        if missing or set(self.manifest.get("splits", {})) != set(SPLITS):
            raise UserError(f"{self.path / MANIFEST} is damaged (missing {', '.join(missing) or 'splits'}): "
                            f"re-run `mlmfast prepare --overwrite` for {self.path}")
        self.dtype = np.dtype(self.manifest["dtype"])
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                file = self.path / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                size = file.stat().st_size if file.is_file() else None
                if size != expected:
                    what = "is missing" if size is None else f"has {size} bytes, the manifest says {expected}"
                    raise UserError(f"shard {file} {what}: the prepared corpus is damaged or incomplete; re-run "
                                    f"`mlmfast prepare --overwrite` for {self.path}")
                if not (self.path / shard["index"]).is_file():
                    raise UserError(f"document index {self.path / shard['index']} is missing: the prepared corpus "
                                    f"is damaged; re-run `mlmfast prepare --overwrite` for {self.path}")

    def __repr__(self) -> str:
        m = self.manifest
        return (f"PreparedCorpus({str(self.path)!r}, documents={m['documents']}, tokens={m['tokens']}, "
                f"dtype={m['dtype']}, shards={sum(len(s['shards']) for s in m['splits'].values())})")

    def tokenizer(self) -> MLMTokenizer:
        """The tokenizer the corpus was prepared with (the copy in `path/tokenizer`)."""
        return MLMTokenizer.load(self.path / TOKENIZER_DIR)

    def check_tokenizer(self, tok: MLMTokenizer) -> None:
        """UserError unless `tok` can train on this corpus: every token id < tok.vocab_size, and tok is the
        tokenizer that prepared it (same fingerprint)."""
        max_id = max((s["max_id"] for split in self.manifest["splits"].values() for s in split["shards"]),
                     default=-1)
        if tok.vocab_size <= max_id:
            raise UserError(f"token ids out of range: {self.path} holds ids up to {max_id}, the run's tokenizer has "
                            f"vocab_size {tok.vocab_size}; use the prepared directory's tokenizer "
                            f"({self.path / TOKENIZER_DIR}) or re-run `mlmfast prepare` with the run's tokenizer")
        theirs, ours = self.manifest["tokenizer_fingerprint"], tok.fingerprint()
        if theirs != ours:
            raise UserError(f"{self.path} was prepared with tokenizer {theirs[:12]}, the run uses {ours[:12]}: "
                            f"re-run `mlmfast prepare` with the run's tokenizer, or pass the prepared directory's "
                            f"tokenizer ({self.path / TOKENIZER_DIR})")

    def verify(self) -> None:
        """Recompute the sha256 of every shard and document index; UserError naming the first that differs
        from the manifest."""
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                for name, digest in ((shard["file"], shard["sha256"]), (shard["index"], shard["index_sha256"])):
                    if _sha256_file(self.path / name) != digest:
                        raise UserError(f"{self.path / name} is corrupt (its sha256 differs from {MANIFEST}): "
                                        f"re-run `mlmfast prepare --overwrite` for {self.path}")

    def dataset(self, split: str = "train", seq_len: int = 128, pack: bool = True) -> PreparedDataset:
        """Rows of `seq_len` tokens from one split (see `PreparedDataset`)."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: a prepared corpus has {', '.join(SPLITS)}")
        m = self.manifest
        shards = m["splits"][split]["shards"]
        return PreparedDataset([self.path / s["file"] for s in shards], [self.path / s["index"] for s in shards],
                               [s["tokens"] for s in shards], [s["documents"] for s in shards], self.dtype,
                               seq_len=seq_len, pack=pack, cls_id=m["cls_id"], sep_id=m["sep_id"],
                               pad_id=m["pad_id"])


def _sha256_file(path: Path) -> str | None:
    """sha256 hex digest of a file's bytes; None if it cannot be read."""
    try:
        return sha256_file(path)
    except OSError:
        return None


class PreparedDataset(Dataset):
    """Fixed-length rows [CLS] chunk [SEP] [PAD]... built on access from memory-mapped shards.

    Item i: {"input_ids": int64 [L], "attention_mask": int64 [L], "length": int}, as `MLMDataset`, so
    `mlmfast.data.collate` and `make_loader` work unchanged. Rows never cross shards:
    - pack=True: shard s of T tokens gives ceil(T / (L-2)) rows; row r holds stream[r*(L-2) : (r+1)*(L-2)]
      (only the shard's last row is padded; a row may start or end at a [SEP] between documents).
    - pack=False: each document gives ceil(n / (L-2)) rows of consecutive pieces of it.
    Memory: per-shard counts only; memmaps (at most MAX_OPEN_SHARDS) and pack=False row tables (the
    CACHED_ROW_TABLES most recent shards) are opened on first use in each process and never pickled, so
    DataLoader workers open their own. pack=False reads every document index once, at construction, to count
    rows.
    """

    def __init__(self, files: Sequence[Path], index_files: Sequence[Path], tokens: Sequence[int],
                 documents: Sequence[int], dtype: np.dtype, *, seq_len: int = 128, pack: bool = True,
                 cls_id: int, sep_id: int, pad_id: int):
        if not isinstance(seq_len, int) or seq_len < 3:
            raise UserError(f"seq_len must be at least 3 ([CLS] token [SEP]), got {seq_len}")
        self.files, self.index_files = list(files), list(index_files)
        self.dtype, self.pack = np.dtype(dtype), pack
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self._seq_len = seq_len
        self._body = seq_len - 2
        self._shard_tokens = np.asarray(tokens, dtype=np.int64)  # [S], [SEP]s included
        documents = np.asarray(documents, dtype=np.int64)
        self._maps: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()
        self._tables: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        if pack:
            rows = -(-self._shard_tokens // self._body)
            text_tokens = int(self._shard_tokens.sum())
        else:
            rows = np.array([len(self._row_table(s)[0]) for s in range(len(self.files))], dtype=np.int64)
            text_tokens = int((self._shard_tokens - np.maximum(documents - 1, 0)).sum())
        self.rows_per_shard = rows.astype(np.int64).reshape(-1)  # [S]
        self._first_row = np.concatenate([[0], np.cumsum(self.rows_per_shard)])  # [S + 1]
        self._num_tokens = text_tokens + 2 * int(self._first_row[-1])
        self._positions = torch.arange(seq_len)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"], state["_tables"] = collections.OrderedDict(), collections.OrderedDict()
        return state

    def __len__(self) -> int:
        return int(self._first_row[-1])

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens in all rows ([CLS] and [SEP] included), as `MLMDataset.num_tokens`."""
        return self._num_tokens

    def __repr__(self) -> str:
        return (f"PreparedDataset(rows={len(self)}, seq_len={self.seq_len}, tokens={self.num_tokens}, "
                f"shards={len(self.files)}, pack={self.pack})")

    def _tokens(self, s: int) -> np.memmap:
        """Shard s's token stream, `dtype` [T] (memory-mapped, read-only)."""
        m = self._maps.get(s)
        if m is None:
            m = np.memmap(self.files[s], dtype=self.dtype, mode="r", shape=(int(self._shard_tokens[s]),))
            self._maps[s] = m
            if len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(s)
        return m

    def _row_table(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """pack=False: (start int64 [R], length int64 [R]) of shard s's rows in its stream."""
        table = self._tables.get(s)
        if table is not None:
            self._tables.move_to_end(s)
            return table
        offsets = np.load(self.index_files[s]).astype(np.int64)  # [D] document starts
        ends = np.append(offsets[1:] - 1, self._shard_tokens[s])  # one [SEP] before each next document
        lens = ends - offsets
        rows_per_doc = -(-lens // self._body)
        row_doc = np.repeat(np.arange(len(lens)), rows_per_doc)
        k = np.arange(len(row_doc)) - (np.cumsum(rows_per_doc) - rows_per_doc)[row_doc]  # row within document
        table = (offsets[row_doc] + k * self._body, np.minimum(lens[row_doc] - k * self._body, self._body))
        self._tables[s] = table
        if len(self._tables) > CACHED_ROW_TABLES:
            self._tables.popitem(last=False)
        return table

    def __getitem__(self, i: int) -> dict:
        n_rows = len(self)
        i = operator.index(i)
        if not -n_rows <= i < n_rows:
            raise IndexError(f"row {i} out of range for a dataset of {n_rows} rows")
        i %= n_rows
        s = int(np.searchsorted(self._first_row, i, side="right")) - 1
        r = i - int(self._first_row[s])
        if self.pack:
            start = r * self._body
            n = min(self._body, int(self._shard_tokens[s]) - start)
        else:
            starts, lens = self._row_table(s)
            start, n = int(starts[r]), int(lens[r])
        ids = torch.full((self._seq_len,), self.pad_id, dtype=torch.long)
        ids[0] = self.cls_id
        ids[1:n + 1] = torch.from_numpy(self._tokens(s)[start:start + n].astype(np.int64))
        ids[n + 1] = self.sep_id
        return {"input_ids": ids, "attention_mask": (self._positions < n + 2).long(), "length": n + 2}

    def epoch_order(self, seed: int, epoch: int, buffer_rows: int = 8192) -> EpochOrder:
        """The shuffled order of the rows in one epoch (see `EpochOrder`)."""
        return EpochOrder(self.rows_per_shard, seed, epoch, buffer_rows)


class EpochOrder(Sequence):
    """A lazy permutation of range(sum(rows_per_shard)): order[k] = the global row index of an epoch's k-th
    sample. The shards come in an order permuted by (seed, epoch); each shard's rows are taken in windows of
    `buffer_rows` consecutive rows, in window order, each window permuted by (seed, epoch, shard, window).

    order[k] costs a binary search over shards plus (at a new window) one permutation of buffer_rows; the
    last windows used are cached, so reading the order front to back costs O(1) per element. Memory
    O(num_shards + buffer_rows). order[a:b] is a list of ints. Seeds and epochs are taken modulo 2**64.
    """

    def __init__(self, rows_per_shard: np.ndarray, seed: int, epoch: int, buffer_rows: int = 8192):
        if buffer_rows < 1:
            raise UserError(f"buffer_rows must be at least 1, got {buffer_rows}")
        self.seed, self.epoch, self.buffer_rows = seed & _MASK64, epoch & _MASK64, buffer_rows
        rows = np.asarray(rows_per_shard, dtype=np.int64)
        self._shard_first_row = np.concatenate([[0], np.cumsum(rows)])[:-1]  # [S] first global row of shard
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch])))
        self._shards = rng.permutation(len(rows))  # [S] shard visited at each position
        self._rows = rows[self._shards]  # [S] rows of the shard at each position
        self._pos_first = np.concatenate([[0], np.cumsum(self._rows)])  # [S + 1] first sample of each position
        self._windows: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()

    def __len__(self) -> int:
        return int(self._pos_first[-1])

    def _window(self, shard: int, w: int, size: int) -> np.ndarray:
        """The permutation int64 [size] of window w of `shard` (cached: the two most recent)."""
        key = (shard, w)
        perm = self._windows.get(key)
        if perm is None:
            seq = np.random.SeedSequence([self.seed, self.epoch, shard, w])
            perm = np.random.Generator(np.random.PCG64(seq)).permutation(size)
            self._windows[key] = perm
            if len(self._windows) > 2:
                self._windows.popitem(last=False)
        return perm

    def _locate(self, k: int) -> tuple[int, np.ndarray, int]:
        """(base, perm, o) for sample k: its row is base + perm[o], perm = the permutation of its window."""
        p = bisect.bisect_right(self._pos_first, k) - 1  # position in the shard order
        shard, rows = int(self._shards[p]), int(self._rows[p])
        w, o = divmod(k - int(self._pos_first[p]), self.buffer_rows)
        size = min(self.buffer_rows, rows - w * self.buffer_rows)
        return int(self._shard_first_row[shard]) + w * self.buffer_rows, self._window(shard, w, size), o

    def __getitem__(self, k):
        n = len(self)
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(n))]
        k = operator.index(k)
        if not -n <= k < n:
            raise IndexError(f"sample {k} out of range for an epoch of {n} samples")
        base, perm, o = self._locate(k % n)
        return base + int(perm[o])

    def iter_from(self, start: int = 0) -> Iterator[int]:
        """order[start], order[start + 1], ... to the end of the epoch (for resuming at sample `start`)."""
        n = len(self)
        if not 0 <= start <= n:
            raise UserError(f"cannot start at sample {start} of an epoch of {n} samples")
        while start < n:
            base, perm, o = self._locate(start)
            yield from (base + perm[o:]).tolist()
            start += len(perm) - o

    def __iter__(self) -> Iterator[int]:
        return self.iter_from(0)


# ====================================================================== command line
def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    """Register `prepare` on an argparse subparsers object; the parsed args run `cmd_prepare` (args.func)."""
    p = subparsers.add_parser(
        "prepare", help="tokenize a corpus once into memory-mapped shards for training",
        description="Tokenize text files, directories or .jsonl files in parallel into uint16/uint32 token "
                    "shards with a manifest; `mlmfast train` streams from the result.")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="text files, directories or .jsonl files with a 'text' field (required unless --verify)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (required unless --verify; with "
                                                      "--verify, also check that it matches the prepared data)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the prepared corpus to")
    p.add_argument("--workers", "--num-workers", dest="workers", type=int, default=0,
                   help="tokenizer processes (default: 0 = one per CPU core); --num-workers is the same flag, as "
                        "`mlmfast train` spells it")
    p.add_argument("--shard-tokens", type=int, default=2 ** 26, help="tokens per shard file (default: 2**26)")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents held out for validation (default: 0.005)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prepared corpus in --out")
    p.add_argument("--verify", action="store_true",
                   help="only check the prepared corpus in --out (sizes and sha256 of every shard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
    return p


def cmd_prepare(args: argparse.Namespace) -> int:
    """Run `mlmfast prepare`: prepare (or with --verify, check) a corpus and print a short summary."""
    if args.verify:
        corpus = PreparedCorpus(args.out)
        corpus.verify()
        if args.tokenizer:
            corpus.check_tokenizer(MLMTokenizer.load(args.tokenizer))
        m = corpus.manifest
        shards = sum(len(s["shards"]) for s in m["splits"].values())
        print(f"OK: {args.out}: {m['documents']:,} documents, {m['tokens']:,} tokens in {shards} shard(s)")
        return 0
    if not args.data or not args.tokenizer:
        raise UserError("`mlmfast prepare` needs --data and --tokenizer (or --verify to check an existing --out)")
    start = time.perf_counter()
    m = prepare_corpus(args.data, args.tokenizer, args.out, workers=args.workers, shard_tokens=args.shard_tokens,
                       val_fraction=args.val_fraction, seed=args.seed, overwrite=args.overwrite,
                       progress=not args.no_progress)
    seconds = time.perf_counter() - start
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(f"prepared {args.out}: {m['documents']:,} documents ({train['documents']:,} train, "
          f"{val['documents']:,} val), {m['tokens']:,} tokens in {len(train['shards'])} + {len(val['shards'])} "
          f"shard(s) ({m['dtype']}), {m['replaced_chars']:,} invalid UTF-8 sequence(s) replaced, {seconds:.1f} s, "
          f"{m['tokens'] / max(seconds, 1e-9):,.0f} tokens/s")
    return 0
