"""`mlmfast prepare`: shards, manifest, split, checks, the memory-mapped dataset, its epoch order and the CLI."""
import argparse
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from mlmfast.data import _build_rows, build_datasets, make_loader, read_corpus
from mlmfast.errors import UserError
from mlmfast.prepare import PreparedCorpus, _val_mask, add_prepare_parser, is_prepared_dir, prepare_corpus
from mlmfast.tokenizer import SPECIAL_TOKENS, MLMTokenizer, train_tokenizer


# ---------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def docs(corpus_file):
    return read_corpus(corpus_file)


@pytest.fixture(scope="module")
def tok_dir(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(docs, vocab_size=1000).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return MLMTokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def prepared(corpus_file, tok_dir, tmp_path_factory):
    """The corpus in shards of <= 4000 tokens, 10% val."""
    out = tmp_path_factory.mktemp("prep") / "out"
    prepare_corpus([corpus_file], tok_dir, out, workers=1, shard_tokens=4000, val_fraction=0.1, progress=False)
    return out


def prep(data, tok_dir, out, **kw) -> dict:
    kw.setdefault("workers", 1)
    return prepare_corpus([str(d) for d in data], tok_dir, out, progress=False, **kw)


def split_docs(path: Path, split: str) -> list[list[int]]:
    """The documents (token id lists) of a split, read back from its shards; checks the [SEP]s between them."""
    m = json.loads((path / "manifest.json").read_text())
    out = []
    for shard in m["splits"][split]["shards"]:
        stream = np.fromfile(path / shard["file"], dtype=m["dtype"]).astype(np.int64)
        offsets = np.load(path / shard["index"])
        assert offsets.dtype == np.int64 and offsets[0] == 0 and len(offsets) == shard["documents"]
        assert (stream[offsets[1:] - 1] == m["sep_id"]).all()
        ends = np.append(offsets[1:] - 1, len(stream))
        out.extend(stream[a:b].tolist() for a, b in zip(offsets, ends))
    return out


def expected_docs(texts, tok) -> list[list[int]]:
    return [ids for ids in tok.encode_batch(list(texts)) if ids]


def rows(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    ids = torch.stack([it["input_ids"] for it in items]) if items else torch.zeros(0, ds.seq_len, dtype=torch.long)
    return ids, torch.tensor([it["length"] for it in items], dtype=torch.long)


def all_files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def without_date(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


# ---------------------------------------------------------------------- rows
@pytest.mark.parametrize("seq_len", [5, 17, 128])
@pytest.mark.parametrize("pack", [True, False])
def test_rows_match_build_datasets_one_shard(docs, corpus_file, tok, tok_dir, tmp_path, seq_len, pack):
    prep([corpus_file], tok_dir, tmp_path / "p", val_fraction=0)
    corpus = PreparedCorpus(tmp_path / "p")
    assert len(corpus.manifest["splits"]["train"]["shards"]) == 1
    ds = corpus.dataset("train", seq_len=seq_len, pack=pack)
    ref, _ = build_datasets(docs, tok, seq_len=seq_len, pack=pack, val_fraction=0)
    ids, lengths = rows(ds)
    assert len(ds) == len(ref) and ds.seq_len == seq_len
    assert torch.equal(ids, ref.input_ids.long()) and torch.equal(lengths, ref.lengths.long())
    assert ds.num_tokens == ref.num_tokens
    item, ref_item = ds[len(ds) - 1], ref[len(ref) - 1]
    assert set(item) == {"input_ids", "attention_mask", "length"}
    assert item["input_ids"].dtype == item["attention_mask"].dtype == torch.long
    assert torch.equal(item["attention_mask"], ref_item["attention_mask"])


def test_multi_shard_layout_and_rows(docs, prepared, tok):
    m = PreparedCorpus(prepared).manifest
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 3 and m["shard_tokens"] == 4000
    for shard in shards:  # whole documents, within the limit unless alone
        assert shard["tokens"] <= 4000 or shard["documents"] == 1
    # A shard ends only because its next document would not fit.
    train = split_docs(prepared, "train")
    first_doc = np.cumsum([0] + [s["documents"] for s in shards])
    for shard, nxt in zip(shards[:-1], first_doc[1:-1]):
        assert shard["tokens"] + 1 + len(train[nxt]) > 4000
    all_docs = expected_docs(docs, tok)
    in_val = _val_mask(np.arange(len(all_docs)), 0, 0.1)
    assert train == [d for d, v in zip(all_docs, in_val) if not v]
    assert split_docs(prepared, "val") == [d for d, v in zip(all_docs, in_val) if v]
    assert m["documents"] == len(all_docs) and m["tokens"] == sum(map(len, all_docs))
    assert m["empty_documents"] == len(docs) - len(all_docs)
    # pack=True: each shard's rows are _build_rows of its documents; pack=False: the rows of all documents.
    ds = PreparedCorpus(prepared).dataset("train", seq_len=33, pack=True)
    ids, lengths = rows(ds)
    expected, start = [], 0
    for shard in shards:
        shard_docs = train[start:start + shard["documents"]]
        start += shard["documents"]
        expected.append(_build_rows(shard_docs, None, 33, True, tok.cls_token_id, tok.sep_token_id,
                                    tok.pad_token_id))
    assert torch.equal(ids, torch.cat([e.input_ids for e in expected]).long())
    assert torch.equal(lengths, torch.cat([e.lengths for e in expected]).long())
    unpacked = _build_rows(train, None, 33, False, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    ids, lengths = rows(PreparedCorpus(prepared).dataset("train", seq_len=33, pack=False))
    assert torch.equal(ids, unpacked.input_ids.long()) and torch.equal(lengths, unpacked.lengths.long())


def test_workers_give_identical_output(corpus_file, tok_dir, tmp_path):
    kw = dict(shard_tokens=3000, val_fraction=0.2)
    m1 = prep([corpus_file], tok_dir, tmp_path / "w1", workers=1, **kw)
    m3 = prep([corpus_file], tok_dir, tmp_path / "w3", workers=3, **kw)
    assert len(m1["splits"]["val"]["shards"]) > 1
    assert without_date(m1) == without_date(m3)
    f1, f3 = all_files(tmp_path / "w1"), all_files(tmp_path / "w3")
    f1.pop("manifest.json"), f3.pop("manifest.json")
    assert f1 == f3


# ---------------------------------------------------------------------- dtypes
def test_small_vocab_is_uint16(prepared):
    m = PreparedCorpus(prepared).manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] <= 65536
    shard = m["splits"]["train"]["shards"][0]
    assert (prepared / shard["file"]).stat().st_size == 2 * shard["tokens"]


def test_large_vocab_is_uint32(tmp_path):
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({f"w{i}": i for i in range(len(vocab), 70_000)})
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    MLMTokenizer(backend).save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("w69999 w5\nw65536\n\nw7 w65535\n")
    m = prep([tmp_path / "c.txt"], tmp_path / "tok", tmp_path / "p", val_fraction=0)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_000
    assert split_docs(tmp_path / "p", "train") == [[69999, 5, 65536], [7, 65535]]
    item = PreparedCorpus(tmp_path / "p").dataset(seq_len=8)[0]
    assert item["input_ids"].tolist() == [2, 69999, 5, 65536, 3, 7, 65535, 3]
    ids, lengths = rows(PreparedCorpus(tmp_path / "p").dataset(seq_len=3, pack=False))  # one token per row
    assert ids[:, 1].tolist() == [69999, 5, 65536, 7, 65535] and lengths.tolist() == [3] * 5


# ---------------------------------------------------------------------- validation split
def test_val_split_deterministic_disjoint(corpus_file, tok_dir, prepared, tmp_path):
    again = prep([corpus_file], tok_dir, tmp_path / "again", shard_tokens=4000, val_fraction=0.1)
    assert without_date(again) == without_date(PreparedCorpus(prepared).manifest)
    other = prep([corpus_file], tok_dir, tmp_path / "seed1", shard_tokens=4000, val_fraction=0.1, seed=1)
    val0, val1 = split_docs(prepared, "val"), split_docs(tmp_path / "seed1", "val")
    assert val0 != val1
    for path in (prepared, tmp_path / "seed1"):
        m = PreparedCorpus(path).manifest
        n_val = m["splits"]["val"]["documents"]
        assert 0.05 * m["documents"] < n_val < 0.15 * m["documents"]
        assert n_val + m["splits"]["train"]["documents"] == m["documents"]
    assert other["splits"]["val"]["documents"] == len(val1)


def test_val_split_small_and_zero(tmp_path, tok_dir):
    (tmp_path / "c.txt").write_text("one document here\n\nanother document\n\na third document\n")
    m = prep([tmp_path / "c.txt"], tok_dir, tmp_path / "p", val_fraction=0.005)
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 2
    m = prep([tmp_path / "c.txt"], tok_dir, tmp_path / "z", val_fraction=0)
    assert m["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}
    assert not list((tmp_path / "z").glob("val-*"))
    assert len(PreparedCorpus(tmp_path / "z").dataset("val")) == 0
    (tmp_path / "one.txt").write_text("a single document\n")
    m = prep([tmp_path / "one.txt"], tok_dir, tmp_path / "one", val_fraction=0.5)
    assert m["splits"]["train"]["documents"] == 1 and m["splits"]["val"]["documents"] == 0


# ---------------------------------------------------------------------- reading the corpus
def test_invalid_utf8_counted(tmp_path, tok_dir, tok):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n\nmore text\xff\xfe here\n")
    m = prep([tmp_path / "bad.txt"], tok_dir, tmp_path / "p", val_fraction=0)
    assert m["replaced_chars"] == 3 == read_corpus(tmp_path / "bad.txt").replaced_chars
    assert split_docs(tmp_path / "p", "train") == expected_docs(read_corpus(tmp_path / "bad.txt"), tok)


def test_directory_with_empty_files_jsonl_and_wikitext(tmp_path, tok_dir, tok):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("\n\nfirst paragraph\nstill first\n\n\n\nsecond paragraph\n\n")
    (data / "b.txt").write_text("")
    (data / "c.md").write_text("\n \n\n")
    (data / "sub" / "d.jsonl").write_text('{"text": "json one"}\n\n{"text": "  "}\n{"text": "json two"}\n')
    (data / "sub" / "e.txt").write_text(" = Title = \n\n text of it \n\n = = Section = = \n more \n = Next = \n x \n")
    (data / ".hidden.txt").write_text("not read\n")
    m = prep([data], tok_dir, tmp_path / "p", val_fraction=0)
    corpus = read_corpus(data)
    assert m["source_files"] == corpus.files and len(m["source_files"]) == 5
    assert split_docs(tmp_path / "p", "train") == expected_docs(corpus, tok)
    assert m["documents"] == len(corpus) == 6


def test_output_inside_the_corpus_directory_is_not_read(tmp_path, tok_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("some text\n\nmore text\n")
    first = prep([data], tok_dir, data / "prepared", val_fraction=0)
    second = prep([data], tok_dir, data / "prepared", val_fraction=0, overwrite=True)
    assert second["source_files"] == first["source_files"] == [str(data / "a.txt")]


def test_corpus_without_text_is_an_error(tmp_path, tok_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("")
    (data / "b.txt").write_text("\n  \n\n")
    with pytest.raises(UserError, match="empty"):
        prep([data], tok_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no output, no temporary directory left
    with pytest.raises(UserError, match="no such file"):
        prep([tmp_path / "missing.txt"], tok_dir, tmp_path / "out")


# ---------------------------------------------------------------------- checks
def test_truncated_or_missing_shard(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="train-00001.bin"):
        PreparedCorpus(copy)
    shard.unlink()
    with pytest.raises(UserError, match="train-00001.bin is missing"):
        PreparedCorpus(copy)


def test_not_prepared_and_unknown_version(prepared, tmp_path):
    assert is_prepared_dir(prepared) and not is_prepared_dir(tmp_path)
    with pytest.raises(UserError, match="not a prepared corpus"):
        PreparedCorpus(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    m = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(UserError, match="format version 99"):
        PreparedCorpus(copy)


def test_verify_finds_a_flipped_byte(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    corpus = PreparedCorpus(copy)
    corpus.verify()
    data = bytearray((copy / "val-00000.bin").read_bytes())
    data[5] ^= 1
    (copy / "val-00000.bin").write_bytes(bytes(data))
    with pytest.raises(UserError, match="val-00000.bin is corrupt"):
        corpus.verify()


def test_check_tokenizer(prepared, docs, tok):
    corpus = PreparedCorpus(prepared)
    corpus.check_tokenizer(tok)  # the original directory's tokenizer
    corpus.check_tokenizer(corpus.tokenizer())  # and the copy
    assert corpus.tokenizer().fingerprint() == tok.fingerprint()
    cased = train_tokenizer(docs, vocab_size=1000, lowercase=False)
    assert cased.vocab_size > max(s["max_id"] for s in corpus.manifest["splits"]["train"]["shards"])
    with pytest.raises(UserError, match="prepared with tokenizer"):
        corpus.check_tokenizer(cased)
    with pytest.raises(UserError, match="token ids out of range"):
        corpus.check_tokenizer(train_tokenizer(docs, vocab_size=100))


# ---------------------------------------------------------------------- loading
def test_dataloader_workers_and_pickle(prepared):
    ds = PreparedCorpus(prepared).dataset("train", seq_len=32)
    serial = list(make_loader(ds, batch_size=8, seed=3, num_workers=0))
    parallel = list(make_loader(ds, batch_size=8, seed=3, num_workers=2))
    assert len(serial) == len(parallel) == len(ds) // 8
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = ds[5]
    state = pickle.dumps(ds)
    assert b"memmap" not in state and len(state) < 10_000
    clone = pickle.loads(state)
    assert torch.equal(clone[5]["input_ids"], first["input_ids"]) and clone[-1]["length"] == ds[len(ds) - 1]["length"]
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("pack", [True, False])
def test_epoch_order(prepared, pack):
    ds = PreparedCorpus(prepared).dataset("train", seq_len=16, pack=pack)
    n = len(ds)
    order = ds.epoch_order(seed=7, epoch=0, buffer_rows=13)
    assert len(order) == n
    full = list(order)
    assert sorted(full) == list(range(n)) and full != list(range(n))
    assert [order[k] for k in range(n)] == full  # random access == iteration
    assert [order[k] for k in reversed(range(n))] == full[::-1]
    assert order[10:50] == full[10:50] and order[-3:] == full[-3:] and order[-1] == full[-1]
    assert list(order.iter_from(123)) == full[123:] and list(order.iter_from(n)) == []
    assert list(ds.epoch_order(seed=7, epoch=0, buffer_rows=13)) == full  # deterministic
    assert list(ds.epoch_order(seed=7, epoch=1, buffer_rows=13)) != full
    assert list(ds.epoch_order(seed=8, epoch=0, buffer_rows=13)) != full
    # Shard-major: each shard's rows are consecutive in the order, windows of 13 rows are kept together.
    first_row = np.concatenate([[0], np.cumsum(ds.rows_per_shard)])
    shard_of = np.searchsorted(first_row, full, side="right") - 1
    assert (np.diff(shard_of) != 0).sum() == len(ds.rows_per_shard) - 1
    window = (np.array(full) - first_row[shard_of]) // 13
    assert ((np.diff(window) != 0) | (np.diff(shard_of) != 0)).sum() == (-(-ds.rows_per_shard // 13)).sum() - 1
    with pytest.raises(IndexError):
        order[n]


# ---------------------------------------------------------------------- overwrite rules and CLI
def test_overwrite_rules(tmp_path, tok_dir, corpus_file):
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    prep([corpus_file], tok_dir, out, val_fraction=0)
    with pytest.raises(UserError, match="--overwrite"):
        prep([corpus_file], tok_dir, out, val_fraction=0)
    m = prep([corpus_file], tok_dir, out, val_fraction=0.5, overwrite=True)
    assert PreparedCorpus(out).manifest == m and (out / "val-00000.bin").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a prepared corpus"):
        prep([corpus_file], tok_dir, other, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]  # no temporary directories left


def test_cli(tmp_path, tok_dir, corpus_file, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_parser(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(["prepare", *argv])
        return args.func(args)

    out = str(tmp_path / "out")
    assert run("--data", str(corpus_file), "--tokenizer", str(tok_dir), "--out", out, "--workers", "1",
               "--shard-tokens", "5000", "--val-fraction", "0.1", "--seed", "2", "--no-progress") == 0
    summary = capsys.readouterr().out
    assert "documents" in summary and "tokens/s" in summary and "replaced" in summary
    m = PreparedCorpus(out).manifest
    assert m["seed"] == 2 and m["shard_tokens"] == 5000 and m["val_fraction"] == 0.1
    assert run("--out", out, "--verify", "--tokenizer", str(tok_dir)) == 0
    assert capsys.readouterr().out.startswith("OK")
    (tmp_path / "out" / "train-00000.bin").write_bytes(b"\0\0" * m["splits"]["train"]["shards"][0]["tokens"])
    with pytest.raises(UserError, match="corrupt"):
        run("--out", out, "--verify")
    with pytest.raises(UserError, match="--data and --tokenizer"):
        run("--out", out)
