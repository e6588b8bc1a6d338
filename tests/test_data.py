"""Corpus readers, the built-in corpus, row building (packing, word ids, splits) and the resumable loader."""
import collections
import hashlib
import inspect
import json
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mlmfast.data import (MLMDataset, ResumableSampler, build_datasets, builtin_corpus, collate, make_loader,
                          read_corpus)
from mlmfast.errors import UserError

CLS, SEP, PAD = 2, 3, 0


class PieceTokenizer:
    """Exact, transparent tokenizer for row-building tests: a word of n letters is ceil(n / 3) tokens whose ids
    encode (word length, piece index); every token's word id is the word's index in its text."""

    cls_token_id, sep_token_id, pad_token_id = CLS, SEP, PAD

    @staticmethod
    def _encode(text):
        ids, words = [], []
        for w, word in enumerate(text.split()):
            for piece in range(-(-len(word) // 3)):
                ids.append(10 + 100 * len(word) + piece)
                words.append(w)
        return ids, words

    def encode_batch(self, texts):
        return [self._encode(t)[0] for t in texts]

    def encode_batch_with_words(self, texts):
        pairs = [self._encode(t) for t in texts]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _docs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        num_words = int(torch.randint(0, 40, (), generator=g))
        lens = torch.randint(1, 10, (num_words,), generator=g).tolist()
        docs.append(" ".join("x" * k for k in lens))
    return docs


def _check_rows(ds: MLMDataset, seq_len: int):
    assert ds.input_ids.dtype == torch.int32 and ds.lengths.dtype == torch.int32
    assert ds.input_ids.shape == (len(ds), seq_len)
    for i in range(len(ds)):
        item = ds[i]
        row, n = item["input_ids"], item["length"]
        assert item["input_ids"].dtype == torch.long and item["attention_mask"].dtype == torch.long
        assert 3 <= n <= seq_len
        assert row[0] == CLS and row[n - 1] == SEP and (row[n:] == PAD).all()
        assert (row[1:n - 1] != PAD).all()
        assert item["attention_mask"].tolist() == [1] * n + [0] * (seq_len - n)
    assert ds.num_tokens == int(ds.lengths.sum())


def _contents(ds):
    return [ds.input_ids[i, 1:int(ds.lengths[i]) - 1].tolist() for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------- built-in corpus
def test_builtin_corpus_is_large_distinct_and_cached():
    threads = threading.active_count()
    docs = builtin_corpus()
    assert threading.active_count() == threads
    assert len(docs) > 3000 and sum(map(len, docs)) > 1_000_000
    assert all(isinstance(d, str) and len(d) >= 40 for d in docs)
    assert len(set(docs)) == len(docs)
    assert any('The "assert" statement' in d for d in docs)  # pydoc topics
    assert inspect.getdoc(json.dumps) in docs and inspect.getdoc(collections.OrderedDict) in docs
    start = time.perf_counter()
    again = builtin_corpus()
    assert time.perf_counter() - start < 0.1 and again == docs
    again.clear()  # a copy: the cache is untouched
    assert builtin_corpus() == docs


def test_builtin_corpus_is_deterministic_across_processes():
    docs = builtin_corpus()
    code = ("import hashlib; from mlmfast.data import builtin_corpus; "
            "print(hashlib.sha256('\\0'.join(builtin_corpus()).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == hashlib.sha256("\0".join(docs).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- read_corpus
def test_read_txt_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\n  second line  \n\n\n\nnext para\n   \nlast\n", encoding="utf-8")
    assert read_corpus(str(f)) == ["first line\nsecond line", "next para", "last"]


def test_read_directory_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# md doc\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("txt one\n\ntxt two", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "json one"}\n\n{"text": "  "}\n{"text": "json two", "id": 2}\n',
                                      encoding="utf-8")
    (tmp_path / "skip.py").write_text("print('no')", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    corpus = read_corpus(tmp_path)
    assert corpus == ["txt one", "txt two", "# md doc", "json one", "json two"]
    assert [f.rsplit("/", 1)[-1] for f in corpus.files] == ["a.txt", "z.md", "c.jsonl"]
    assert read_corpus([tmp_path / "a.txt", tmp_path / "c.jsonl"]) == ["txt one", "txt two", "json one", "json two"]


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_corpus(f)
    f.write_text('{"text": "ok"}\n\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r'bad.jsonl:3: no "text"'):
        read_corpus(f)


def test_read_non_utf8_is_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café résumé\n\nok \ufffd kept".encode("utf-8").replace("é".encode(), b"\xe9"))
    corpus = read_corpus(f)
    assert corpus == ["caf\ufffd r\ufffdsum\ufffd", "ok \ufffd kept"]
    assert corpus.replaced_chars == 3  # the U+FFFD that was in the file is not counted


def test_read_empty_and_missing(tmp_path):
    with pytest.raises(UserError, match="no such file or directory: .*nope"):
        read_corpus(tmp_path / "nope")
    (tmp_path / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="the corpus at .* is empty"):
        read_corpus(tmp_path / "blank.txt")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.py").write_text("x = 1", encoding="utf-8")
    with pytest.raises(UserError, match="the corpus at .*sub is empty"):
        read_corpus(tmp_path / "sub")


def test_read_wikitext_articles(tmp_path):
    f = tmp_path / "wiki.txt"
    f.write_text(" \n = Lobster = \n \n Lobsters are blue . \n \n = = Description = = \n \n Big claws . \n"
                 " \n = Robert = \n \n An actor . \n", encoding="utf-8")
    assert read_corpus(f) == ["Lobster\nLobsters are blue .\nDescription\nBig claws .", "Robert\nAn actor ."]


def _wikitext_like(path: Path, articles: int) -> Path:
    """A file in WikiText-2's raw layout (' = Title = ' articles, ' = = Section = = ' headings, ' @-@ ' tokens)."""
    lines = [" "]
    for a in range(articles):
        title = "Homarus gammarus" if a == 0 else f"Article {a}"
        lines += [f" = {title} = ", " ", f" {title} is a topic @-@ number {a} . ", " ",
                  " = = Description = = ", " ", " It has sections , and = signs inside text = fine . ", " "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_wikitext_validation_split(tmp_path):
    """The shared WikiText-2 validation split (60 articles) where this machine has it; otherwise a file in its
    exact layout with 60 articles: the same reader path either way."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
    if not path.is_file():
        path = _wikitext_like(tmp_path / "valid.txt", 60)
    docs = read_corpus(path)
    assert len(docs) == 60  # the articles of the WikiText-2 validation split
    assert docs[0].startswith("Homarus gammarus\n") and not any(d.startswith("=") for d in docs)
    assert all("\n = = " not in d for d in docs)  # section headings became plain lines


# ---------------------------------------------------------------------------------------------- build_datasets
@pytest.mark.parametrize("seq_len", [3, 4, 7, 17, 64])
def test_packed_rows_lose_no_token(seq_len):
    docs = _docs(30) + ["", "x"]
    tok = PieceTokenizer()
    train, val = build_datasets(docs, tok, seq_len=seq_len, pack=True, val_fraction=0.0)
    assert len(val) == 0
    _check_rows(train, seq_len)
    assert (train.lengths[:-1] == seq_len).all()  # only the last row is partial
    stream = []
    for doc in [d for d in tok.encode_batch(docs) if d]:
        stream += ([SEP] if stream else []) + doc
    assert sum(_contents(train), []) == stream


@pytest.mark.parametrize("seq_len", [3, 5, 16, 128])
def test_unpacked_rows_split_long_documents(seq_len):
    docs = _docs(30, seed=1)
    tok = PieceTokenizer()
    train, _ = build_datasets(docs, tok, seq_len=seq_len, pack=False, val_fraction=0.0)
    _check_rows(train, seq_len)
    rows, body = _contents(train), seq_len - 2
    expected = []
    for doc in [d for d in tok.encode_batch(docs) if d]:  # one document -> ceil(len / body) rows, in order
        expected += [doc[i:i + body] for i in range(0, len(doc), body)]
    assert rows == expected


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("seq_len", [4, 9, 32])
def test_word_ids_mark_whole_words(pack, seq_len):
    docs = _docs(25, seed=2)
    tok = PieceTokenizer()
    train, _ = build_datasets(docs, tok, seq_len=seq_len, pack=pack, val_fraction=0.0, whole_word=True)
    plain, _ = build_datasets(docs, tok, seq_len=seq_len, pack=pack, val_fraction=0.0)
    assert torch.equal(train.input_ids, plain.input_ids) and train.word_ids.dtype == torch.int32
    # the (document, word) key of every token of the stream the rows were cut from; None for separators
    ids, words = tok.encode_batch_with_words(docs)
    keys = []
    for d, (doc, w) in enumerate(zip(ids, words)):
        if doc:
            keys += ([None] if keys and pack else []) + [(d, x) for x in w]
    pos = 0
    for i in range(len(train)):
        n, wid = int(train.lengths[i]), train.word_ids[i].tolist()
        item = train[i]
        assert torch.equal(item["word_ids"], train.word_ids[i].long())
        assert wid[0] == -1 and wid[n - 1] == -1 and all(w == -1 for w in wid[n:])
        row_keys = keys[pos:pos + n - 2]
        pos += n - 2
        pairs = set(zip(row_keys, wid[1:n - 1]))
        assert all((k is None) == (w == -1) for k, w in pairs)
        real = {(k, w) for k, w in pairs if k is not None}
        assert len({k for k, _ in real}) == len(real) == len({w for _, w in real})  # a bijection word <-> id
        assert all(0 <= w < seq_len for _, w in real)
    assert pos == len(keys)


def test_split_is_disjoint_deterministic_and_sized():
    docs = [f"doc {i} " + "x" * (i % 7 + 1) for i in range(100)]
    tok = PieceTokenizer()

    def split(seed, frac=0.05):
        train, val = build_datasets(docs, tok, seq_len=8, pack=False, val_fraction=frac, seed=seed)
        # with pack=False and short docs every document is exactly one row
        return [tuple(r) for r in _contents(train)], [tuple(r) for r in _contents(val)]

    train, val = split(0)
    assert len(val) == 5 and len(train) == 95
    every = [tuple(d) for d in tok.encode_batch(docs)]
    assert sorted(train + val) == sorted(every)
    assert split(0) == (train, val)
    assert split(1)[1] != val
    assert split(0, frac=0.0)[1] == []
    _, val_small = build_datasets(docs[:2], tok, seq_len=8, val_fraction=0.01)
    assert len(val_small) == 1  # at least one val document when there are >= 2
    train_one, val_one = build_datasets(docs[:1], tok, seq_len=8, val_fraction=0.5)
    assert len(train_one) == 1 and len(val_one) == 0


def test_build_errors():
    tok = PieceTokenizer()
    with pytest.raises(UserError, match="seq_len"):
        build_datasets(["a b"], tok, seq_len=2)
    with pytest.raises(UserError, match="no documents"):
        build_datasets([], tok)
    with pytest.raises(UserError, match="no tokens"):
        build_datasets(["", "  "], tok, val_fraction=0.0)
    with pytest.raises(UserError, match="val_fraction"):
        build_datasets(["a"], tok, val_fraction=1.0)


def test_real_tokenizer_end_to_end():
    from mlmfast.tokenizer import train_tokenizer

    docs = builtin_corpus()[:400]
    tok = train_tokenizer(docs, vocab_size=800)
    train, val = build_datasets(docs, tok, seq_len=64, whole_word=True, seed=3)
    _check_rows(train, 64)
    assert len(val) > 0 and train.word_ids is not None
    batch = next(iter(make_loader(train, batch_size=4)))
    assert batch["input_ids"].shape == (4, 64) and batch["word_ids"].shape == (4, 64)


# ---------------------------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def dataset():
    train, _ = build_datasets(_docs(60, seed=4), PieceTokenizer(), seq_len=16, val_fraction=0.0, whole_word=True)
    return train


def _batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_collate_shapes_and_pickle(dataset):
    batch = collate([dataset[0], dataset[1], dataset[2]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["word_ids"].shape == (3, 16)
    assert batch["lengths"].tolist() == dataset.lengths[:3].tolist()
    assert pickle.loads(pickle.dumps(collate)) is collate


def test_loader_is_deterministic_per_seed_and_epoch(dataset):
    a = _batches(make_loader(dataset, batch_size=8, seed=5, epoch=0))
    assert _same(a, _batches(make_loader(dataset, batch_size=8, seed=5, epoch=0)))
    assert not _same(a, _batches(make_loader(dataset, batch_size=8, seed=5, epoch=1)))
    assert len(a) == len(dataset) // 8
    ordered = _batches(make_loader(dataset, batch_size=8, shuffle=False))
    assert torch.equal(ordered[0]["input_ids"], dataset.input_ids[:8].long())


@pytest.mark.parametrize("drop_last", [True, False])
def test_start_batch_resumes_exactly(dataset, drop_last):
    full = _batches(make_loader(dataset, batch_size=7, seed=1, epoch=2, drop_last=drop_last))
    for k in (0, 1, 3, len(full)):
        resumed = make_loader(dataset, batch_size=7, seed=1, epoch=2, drop_last=drop_last, start_batch=k)
        assert len(resumed) == len(full) - k
        assert _same(_batches(resumed), full[k:])
    loader = make_loader(dataset, batch_size=7, seed=1, epoch=2, drop_last=drop_last, start_batch=3)
    loader.sampler.set_epoch(3)  # the next epoch starts from its beginning
    assert _same(_batches(loader), _batches(make_loader(dataset, batch_size=7, seed=1, epoch=3,
                                                        drop_last=drop_last)))


def test_workers_give_the_same_batches_quietly(dataset, capfd):
    from mlmfast.tokenizer import train_tokenizer

    tok = train_tokenizer(builtin_corpus()[:200], vocab_size=500)
    tok.encode_batch(builtin_corpus()[:500])  # `tokenizers` has used its thread pool before the fork
    serial = _batches(make_loader(dataset, batch_size=8, seed=2, start_batch=1))
    loader = make_loader(dataset, batch_size=8, seed=2, start_batch=1, num_workers=2)
    assert loader.persistent_workers
    assert _same(_batches(loader), serial)
    loader.sampler.set_epoch(1)
    assert _same(_batches(loader), _batches(make_loader(dataset, batch_size=8, seed=2, epoch=1)))
    del loader
    assert "huggingface/tokenizers" not in capfd.readouterr().err


def test_loader_errors(dataset):
    with pytest.raises(UserError, match="--batch-size"):
        make_loader(dataset, batch_size=len(dataset) + 1)
    empty = MLMDataset(torch.zeros(0, 8, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    with pytest.raises(UserError, match="empty"):
        make_loader(empty, batch_size=1)
    with pytest.raises(UserError, match="resume"):
        make_loader(dataset, batch_size=4, start_batch=len(dataset))
    assert len(ResumableSampler(10, start_index=4)) == 6
